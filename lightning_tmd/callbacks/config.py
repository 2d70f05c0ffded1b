"""The run's resolved config inside every checkpoint, so `sample` / `evaluate` can rebuild the text
encoder and clip shape from a checkpoint alone."""

from __future__ import annotations

from typing import Any

import lightning as L


class ConfigInCheckpoint(L.Callback):
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint["run_config"] = self.config
