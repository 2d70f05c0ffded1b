"""Random-number state in checkpoints, so a resumed run draws the same noise as an uninterrupted one."""

from __future__ import annotations

import os
import random
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn

from lightning_tmd.parallel import process_rank


class RNGStateCheckpoint(L.Callback):
    """Saves the Python, NumPy, torch (and CUDA) generator states with each checkpoint and restores
    them on resume (Lightning checkpoints none of them). Stored as tensors and plain values, so
    checkpoints still load with `weights_only=True`.

    At the start of fitting (after the model was built, identically on every rank) each rank's stream
    is re-seeded with seed + rank, so data-parallel ranks draw different noise and times, and rank 0
    draws what a single process draws; each rank's state is saved and restored. `per_rank=False` gives
    every rank the single-process stream (checks and debugging).
    """

    def __init__(self, per_rank: bool = True) -> None:
        self.per_rank = per_rank

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            seed = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed()))
            seed += trainer.global_rank if self.per_rank else 0
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)

    def state_dict(self) -> dict[str, Any]:
        state = local_rng_state()
        _, world = process_rank()
        if world == 1:
            return state
        states = [None] * world
        dist.all_gather_object(states, state)
        return {"ranks": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "ranks" not in state_dict:
            set_local_rng_state(state_dict)
            return
        states = state_dict["ranks"]
        rank, world = process_rank()
        if world != len(states):
            rank_zero_warn(f"the checkpoint holds random states of {len(states)} ranks, this run has {world}: "
                           "the noise after resuming differs from the uninterrupted run")
        set_local_rng_state(states[rank % len(states)])


def local_rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_local_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
