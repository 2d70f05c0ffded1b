"""Train one stage: `python -m lightning_tmd.train stage=teacher experiment=shapes_teacher`.

Composes the config, checks it, instantiates data, module, callbacks, loggers and trainer, and
calls `Trainer.fit` (resuming from `ckpt_path=...`).
"""

from __future__ import annotations

import datetime
import logging
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from lightning_tmd.app import (
    CONFIG_DIR,
    describe,
    earlier_run_files,
    holds_working_directory,
    log_lightning_into_run_log,
    remove_paths,
    remove_unused_run_folder,
    used_run_folder_error,
)
from lightning_tmd.callbacks import ConfigInCheckpoint, HParamsWithMetrics
from lightning_tmd.checks import check_config, check_text_width

log = logging.getLogger("lightning_tmd.train")  # not __main__ under `python -m`


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


@rank_zero_only
def announce(message: str, *args: Any) -> None:
    log.info(message, *args)


def check_run_folder(cfg: DictConfig) -> None:
    """A new run (ckpt_path=null) must not write into a folder an earlier run left outputs in: refused, unless
    overwrite=true, which deletes those outputs (Hydra's `.hydra/` and the logs stay). A resumed run may."""
    if cfg.get("ckpt_path") or rank_zero_only.rank != 0:  # other ranks: rank 0 decided
        return
    folder = Path(cfg.output_dir).absolute()
    earlier = earlier_run_files(folder)
    if not earlier:
        return
    if not cfg.get("overwrite"):
        raise used_run_folder_error(folder, earlier)
    check_is_run_folder(folder)
    announce("overwrite=true: deleting the earlier run's %s in %s", describe(earlier, folder, len(earlier)), folder)
    remove_paths(earlier)


def check_is_run_folder(folder: Path) -> None:
    """overwrite=true deletes an earlier training run (it left checkpoints/ or tensorboard/), never another folder
    (the working directory, one of its parents, a folder of other files)."""
    if holds_working_directory(folder) or not any((folder / n).is_dir() for n in ("checkpoints", "tensorboard")):
        raise FileExistsError(
            f"output_dir: '{folder}' does not look like a training run folder (no checkpoints/ or tensorboard/, or it "
            "holds the working directory), and overwrite=true only replaces an earlier run: choose another folder "
            "(hydra.run.dir=<new folder>)")


def objective_value(cfg: DictConfig, metrics: dict[str, float]) -> float:
    """The value of the metric `cfg.objective` names (what the app returns to a Hydra sweeper)."""
    name = cfg.get("objective")
    if not metrics:  # no step trained (e.g. resumed at max_steps): nothing to report, not a config mistake
        log.warning("objective: the run logged no metrics (it trained no step): %s is nan", name)
        return float("nan")
    if name not in metrics:
        raise ValueError(f"objective: the run logged no metric '{name}'; set objective= to one it logged: "
                         + ", ".join(sorted(metrics)))
    return metrics[name]


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the configured stage; returns the final logged metrics."""
    started = time.perf_counter()
    check_config(cfg)
    check_run_folder(cfg)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    check_text_width(datamodule.prompts.dim, cfg)
    folder = Path(cfg.output_dir).absolute()
    announce("Run folder: %s", folder)
    announce("TensorBoard: tensorboard --logdir %s", folder)
    module = instantiate(cfg.stage.module, _convert_="all")
    callbacks = [instantiate(c) for c in cfg.get("callbacks", {}).values()]
    callbacks.append(ConfigInCheckpoint(OmegaConf.to_container(cfg, resolve=True)))
    hparams = flat_hparams(cfg)  # logged at the start (hparams.yaml) and with the final metrics at the end
    callbacks.append(HParamsWithMetrics(hparams, cfg.get("objective")))
    loggers = [instantiate(c) for c in cfg.get("logger", {}).values()]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in trainer.loggers:
        logger.log_hyperparams(hparams)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    checkpoint = trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback else ""
    announce("Checkpoint: %s", Path(checkpoint).absolute() if checkpoint else "none written (checkpointing is off)")
    announce("Wall time: %s (step %d)", datetime.timedelta(seconds=round(time.perf_counter() - started)),
             trainer.global_step)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float:
    """The train app; returns the objective's final value (Hydra's sweepers minimize or maximize it)."""
    log_lightning_into_run_log()
    try:
        value = objective_value(cfg, train(cfg))
        announce("Objective %s: %.6g", cfg.objective, value)
        return value
    except BaseException:  # a failed config check (or any failure before the run wrote anything)
        if rank_zero_only.rank == 0:
            remove_unused_run_folder(Path(HydraConfig.get().runtime.output_dir))
        raise


if __name__ == "__main__":
    main()
