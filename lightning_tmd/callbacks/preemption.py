"""Pre-emption: SIGTERM (a cluster's notice before it kills a job) or Ctrl+C lets the current iteration finish,
saves `last.ckpt` of that iteration and stops the run with exit code 128 + signal (143 for SIGTERM, 130 for
SIGINT), so a scheduler sees a job that did not finish. Resuming from that checkpoint continues exactly."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


class RunInterrupted(SystemExit):
    """The run stopped on a signal after saving its checkpoint; the exit code is 128 + the signal number."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        super().__init__(128 + signum)
        self.signal_name = signal.Signals(signum).name
        self.step, self.checkpoint = step, checkpoint

    def __str__(self) -> str:
        saved = f"saved {self.checkpoint}" if self.checkpoint else "no checkpoint folder (checkpointing is off)"
        return f"stopped by {self.signal_name} after step {self.step}; {saved}"


class StopOnSignal(Callback):
    """Turn SIGTERM and SIGINT into a stop at the end of the current training iteration, with a checkpoint.

    The checkpoint is written where periodic checkpoints are (`on_train_batch_end`, the same state), as
    `<checkpoint dirpath>/last.ckpt`. A second Ctrl+C stops at once (Lightning's KeyboardInterrupt, exit code 1,
    nothing saved). A signal during validation or sample videos waits for the end of the next iteration. With
    several data-parallel ranks the stop is decided together (any rank that got the signal stops all).
    Lightning's own SIGTERM handling (stop without saving, exit code 0) is replaced while training runs."""

    def __init__(self, signals: tuple[str, ...] = ("SIGTERM", "SIGINT")) -> None:
        self.signals = [signal.Signals[name] for name in signals]
        self.received: int | None = None
        self.previous: dict[int, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.received, self.trainer = (signal.SIGTERM if trainer.received_sigterm else None), trainer
        if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
            log.warning("training runs outside the main thread: SIGTERM / Ctrl+C will not save a checkpoint")
            return
        for signum in self.signals:
            self.previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self.handle)

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl+C: stop now
        if self.received is None:
            launcher = self.trainer.strategy.launcher
            if launcher is not None:  # ranks started as subprocesses of this one get the signal too
                launcher.kill(signum)
            log.warning("Received %s: finishing iteration %d, then saving a checkpoint and stopping%s",
                        signal.Signals(signum).name, self.trainer.global_step,
                        " (Ctrl+C again stops at once, without saving)" if signum == signal.SIGINT else "")
        self.received = signum

    def stop_requested(self, trainer: L.Trainer) -> bool:
        if trainer.world_size > 1:
            return trainer.strategy.reduce_boolean_decision(self.received is not None, all=False)
        return self.received is not None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.stop_requested(trainer):
            return
        folder = trainer.checkpoint_callback.dirpath if trainer.checkpoint_callback else None
        path = Path(folder) / "last.ckpt" if folder else None
        if path is not None:
            trainer.save_checkpoint(path)
        error = RunInterrupted(self.received or signal.SIGTERM, trainer.global_step, path)
        log.warning("%s. Resume with ckpt_path=%s", error, path)
        raise error

    def restore_handlers(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.restore_handlers()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.restore_handlers()
