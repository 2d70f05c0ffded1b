"""Lightning callbacks the library lacks: sample-video logging, RNG state in checkpoints."""

from lightning_tmd.callbacks.rng import RNGStateCheckpoint
from lightning_tmd.callbacks.samples import SampleVideos

__all__ = ["RNGStateCheckpoint", "SampleVideos"]
