"""A guard against divergence: non-finite gradients skip their optimizer step, a streak of them stops the run, and
non-finite weights are never written into a checkpoint."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from lightning_tmd.parallel import first_nonfinite, local_value


class NonFiniteError(RuntimeError):
    """Training diverged (a streak of non-finite gradients) or a non-finite weight was about to be saved."""


def grads_finite(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every gradient this optimizer would apply is finite (on this rank's shards)."""
    flags = [torch.isfinite(local_value(p.grad)).all()
             for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    return bool(torch.stack(flags).all()) if flags else True


class NonFiniteGuard(Callback):
    """Skip an optimizer step whose gradients are not all finite (for every optimizer: the automatic loop of the
    teacher, stage 1 and KD, and each role of stage 2), count the skips (`train/nonfinite_skips`), and stop the
    run with `NonFiniteError` after `max_consecutive` skips in a row. All data-parallel ranks take the same
    decision. A checkpoint holding a non-finite weight is refused, so the last good one stays on disk.

    A skipped step sets the optimizer's gradients to None: AdamW and Muon leave those parameters and their
    state untouched; the iteration still counts (the learning-rate schedule and `max_steps` move on).
    """

    def __init__(self, max_consecutive: int = 20) -> None:
        if max_consecutive < 1:
            raise ValueError(f"callbacks.nonfinite.max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.streak = 0

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        finite = trainer.strategy.reduce_boolean_decision(grads_finite(optimizer), all=True)
        if finite:
            self.streak = 0
        else:
            self.skipped += 1
            self.streak += 1
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            rank_zero_warn(f"non-finite gradients at step {trainer.global_step}: optimizer step skipped "
                           f"({self.streak} in a row, {self.skipped} in this run)")
        pl_module.log("train/nonfinite_skips", float(self.skipped), on_step=True, on_epoch=False)
        if self.streak >= self.max_consecutive:
            raise NonFiniteError(
                f"training diverged: {self.streak} optimizer steps in a row had non-finite gradients (step "
                f"{trainer.global_step}); the checkpoints written so far hold finite weights. Lower the learning "
                "rate or check the data, then resume from the last checkpoint; "
                "callbacks.nonfinite.max_consecutive sets the tolerance.")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        key = first_nonfinite(checkpoint.get("state_dict", {}))  # this rank's shards
        if trainer.strategy.reduce_boolean_decision(key is not None, all=False):  # every rank refuses together
            where = f"weight {key!r}" if key is not None else "a weight on another rank"
            raise NonFiniteError(f"refusing to save a checkpoint at step {trainer.global_step}: {where} is "
                                 "not finite; the last checkpoint on disk is intact.")

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "streak": self.streak}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.skipped, self.streak = state_dict["skipped"], state_dict["streak"]
