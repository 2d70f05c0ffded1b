"""`RunCheckpoint`: Lightning's periodic checkpoints that also keep a run's final step (the files themselves
are written by `lightning_tmd.checkpoints.AtomicCheckpointIO`)."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class RunCheckpoint(ModelCheckpoint):
    """Lightning's `ModelCheckpoint`, plus one rule: when training ends between two periodic saves
    (`max_steps` not a multiple of `every_n_train_steps`), `last.ckpt` is written at the final step.
    Lightning's own end-of-training save only runs when no last checkpoint was written at all, so a run
    of 2 600 steps saved every 500 would otherwise end with a `last.ckpt` of step 2 500."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and trainer.global_step != self._last_global_step_saved:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        else:
            super().on_train_end(trainer, pl_module)
