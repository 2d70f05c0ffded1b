"""The run's hyper-parameters with its final metrics in TensorBoard, so the HParams tab compares a sweep."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_tmd.callbacks.throughput import Throughput


def final_metrics(trainer: L.Trainer, pl_module: L.LightningModule, objective: str | None) -> dict[str, float]:
    """The objective's final value, the mean speed and, for students, the effective NFE of their sampler
    (`final/...` tags, so the training curves stay as logged)."""
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    out = {f"final/{objective}": logged[objective]} if objective in logged else {}
    speed = next((c for c in trainer.callbacks if isinstance(c, Throughput)), None)
    if speed and speed.mean_s_per_iteration is not None:
        out["final/s_per_iteration"] = speed.mean_s_per_iteration
        out["final/clips_per_s"] = speed.mean_clips_per_s
    if callable(nfe := getattr(pl_module, "effective_nfe", None)):
        out["final/effective_nfe"] = float(nfe())
    return out


class HParamsWithMetrics(L.Callback):
    """At the end of training (before the loggers close), log `params` with the final metrics: TensorBoard's
    HParams data and a `final/...` scalar per metric at the last step; other loggers get the scalars."""

    def __init__(self, params: dict[str, Any], objective: str | None) -> None:
        self.params = params
        self.objective = objective

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run or trainer.global_step == 0:
            return
        metrics = final_metrics(trainer, pl_module, self.objective)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.log_hyperparams(self.params, metrics, step=trainer.global_step)
            else:
                logger.log_metrics(metrics, step=trainer.global_step)
