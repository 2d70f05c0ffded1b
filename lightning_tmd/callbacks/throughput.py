"""Training speed as TensorBoard scalars: seconds per iteration and clips per second."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


def batch_size(batch: Any) -> int:
    """The number of clips in a batch (a dict, tuple or tensor whose first tensor's first dim is the batch)."""
    if isinstance(batch, torch.Tensor):
        return len(batch)
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else []
    return next((batch_size(value) for value in values if isinstance(value, (torch.Tensor, dict, list, tuple))), 0)


class Throughput(Callback):
    """Log `perf/s_per_iteration` (wall time from one training batch's end to the next: data loading included,
    validation excluded) and `perf/clips_per_s` (the global batch over that time). `mean_s_per_iteration` and
    `mean_clips_per_s` average the whole run (for the HParams tab)."""

    def __init__(self) -> None:
        self.last: float | None = None
        self.seconds = 0.0
        self.iterations = 0
        self.clips = 0

    def now(self, pl_module: L.LightningModule) -> float:
        if pl_module.device.type == "cuda":  # time finished work, not launched kernels
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        now = self.now(pl_module)
        if self.last is not None:
            seconds, clips = now - self.last, batch_size(batch) * trainer.world_size
            self.seconds, self.iterations, self.clips = self.seconds + seconds, self.iterations + 1, self.clips + clips
            pl_module.log("perf/s_per_iteration", seconds, on_step=True, on_epoch=False)
            pl_module.log("perf/clips_per_s", clips / max(seconds, 1e-9), on_step=True, on_epoch=False)
        self.last = now

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.last = None  # the next interval would hold the validation

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.last = None

    @property
    def mean_s_per_iteration(self) -> float | None:
        return self.seconds / self.iterations if self.iterations else None

    @property
    def mean_clips_per_s(self) -> float | None:
        return self.clips / self.seconds if self.seconds > 0 else None
