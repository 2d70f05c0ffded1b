"""Train one stage: `python -m lightning_tmd.train stage=teacher experiment=shapes_teacher`.

Composes the config, checks it, instantiates data, module, callbacks, loggers and trainer, and
calls `Trainer.fit` (resuming from `ckpt_path=...`).
"""

from __future__ import annotations

from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_tmd.app import CONFIG_DIR
from lightning_tmd.callbacks import ConfigInCheckpoint
from lightning_tmd.checks import check_config, check_text_width


def flat_hparams(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config flattened to `a/b/c: value` for TensorBoard's hparams tab."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}/{key}" if prefix else str(key))
        else:
            out[prefix] = node if isinstance(node, (int, float, str, bool)) else str(node)

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the configured stage; returns the final logged metrics."""
    check_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    check_text_width(datamodule.prompts.dim, cfg)
    module = instantiate(cfg.stage.module, _convert_="all")
    callbacks = [instantiate(c) for c in cfg.get("callbacks", {}).values()]
    callbacks.append(ConfigInCheckpoint(OmegaConf.to_container(cfg, resolve=True)))
    loggers = [instantiate(c) for c in cfg.get("logger", {}).values()]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in trainer.loggers:
        logger.log_hyperparams(flat_hparams(cfg))
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
