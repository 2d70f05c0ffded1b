"""Lightning callbacks the library lacks: sample videos, RNG state and the run config in checkpoints, a
final-step last.ckpt, the non-finite guard, a checkpoint on SIGTERM / Ctrl+C, training speed,
and the hyper-parameters with the final metrics."""

from lightning_tmd.callbacks.checkpoint import RunCheckpoint
from lightning_tmd.callbacks.config import ConfigInCheckpoint
from lightning_tmd.callbacks.hparams import HParamsWithMetrics
from lightning_tmd.callbacks.nonfinite import NonFiniteError, NonFiniteGuard
from lightning_tmd.callbacks.preemption import RunInterrupted, StopOnSignal
from lightning_tmd.callbacks.rng import RNGStateCheckpoint
from lightning_tmd.callbacks.samples import SampleVideos
from lightning_tmd.callbacks.throughput import Throughput

__all__ = ["ConfigInCheckpoint", "HParamsWithMetrics", "NonFiniteError", "NonFiniteGuard", "RNGStateCheckpoint",
           "RunCheckpoint", "RunInterrupted", "SampleVideos", "StopOnSignal", "Throughput"]
