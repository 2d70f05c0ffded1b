"""Checkpoint files: written so that a failure cannot pass silently and a kill cannot leave a truncated file
(`AtomicCheckpointIO`, Lightning's checkpoint I/O plugin), read with errors that say what is wrong
(`read_checkpoint`), and the weights and settings other stages take from them (`sampling_state_dict`,
`sampling_guidance`)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lightning_tmd.parallel import first_nonfinite


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (permissions, full disk, ...)."""


def loadable(path: Path) -> dict | None:
    """The checkpoint at `path` as a dict, or None when it is missing or unreadable (a truncated file)."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception:
        return None


def read_checkpoint(field: str, path: str | Path, mmap: bool = False) -> dict:
    """The Lightning checkpoint at `path` (the config field `field` names it), or an error that says what is wrong:
    missing, not a checkpoint (text, empty, truncated, random bytes), or not a Lightning checkpoint. `mmap`: the
    tensors stay in the file (memory-mapped) until read, e.g. one at a time into a rank's shards."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{field}: no checkpoint file at '{path}'")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as error:
        raise ValueError(f"{field}: '{path}' is not a readable checkpoint (empty, truncated or not a torch file: "
                         f"{type(error).__name__}); give a last.ckpt or step_*.ckpt written by lightning_tmd.train"
                         ) from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{field}: '{path}' is a torch file but not a Lightning checkpoint (no state_dict); give a "
                         "last.ckpt or step_*.ckpt written by lightning_tmd.train")
    return checkpoint


def newest_loadable_periodic(folder: Path) -> Path | None:
    """The newest periodic checkpoint (`step_*.ckpt`) in `folder` that loads, else None."""
    for path in sorted(folder.glob("step_*.ckpt"), reverse=True):
        if loadable(path) is not None:
            return path
    return None


def remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint files written to a temporary file in the destination folder, fsynced, then renamed over the
    target: a kill mid-write leaves the previous file intact and no stray copy elsewhere ($TMPDIR may be on another
    filesystem), and a failed write stops the run with `CheckpointSaveError` (Lightning's own save ignores a
    PermissionError). Loading an unreadable file names the newest loadable periodic checkpoint beside it."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        path = Path(path)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(temporary, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
            fsync_folder(path.parent)
            for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a process killed mid-write
                remove_quietly(stale)
        except OSError as error:
            remove_quietly(temporary)
            raise CheckpointSaveError(f"could not write the checkpoint {path}: {error}. Free space or fix the "
                                      "folder's permissions (the run's output_dir), then resume from the last "
                                      "checkpoint.") from error
        except BaseException:
            remove_quietly(temporary)
            raise

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"ckpt_path: no checkpoint at {path}")
        try:
            return torch.load(path, map_location=map_location or "cpu",
                              weights_only=False if weights_only is None else weights_only)
        except Exception as error:
            newer = newest_loadable_periodic(path.parent)
            hint = (f"resume from the newest loadable periodic checkpoint instead: ckpt_path={newer}" if newer
                    else "no loadable periodic checkpoint (step_*.ckpt) is beside it")
            raise ValueError(f"ckpt_path: {path} is not a readable checkpoint (truncated or corrupt: "
                             f"{type(error).__name__}); {hint}") from error


PAPER_GUIDANCE = 5.0  # the real score's CFG for Wan2.1 (paper, Table 7)


def sampling_guidance(checkpoint: dict[str, Any], default: float = PAPER_GUIDANCE) -> float:
    """The CFG a teacher checkpoint samples with (its `guidance_scale`); `default` for other checkpoints."""
    scale = checkpoint.get("hyper_parameters", {}).get("guidance_scale")
    return default if scale is None else float(scale)


def sampling_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The weights of `module.net` that a checkpoint samples with: its EMA when kept, else the raw net
    (a teacher's `WanNet`, a stage-1 student's `TMDStudent`, ...), memory-mapped from the file."""
    return sampling_weights(read_checkpoint("checkpoint", path, mmap=True)["state_dict"])


def sampling_weights(state: dict[str, torch.Tensor], module: str = "") -> dict[str, torch.Tensor]:
    """The sampling weights of the generator module at `module` (e.g. "student." in a stage-2 state
    dict): its `ema.module.*` when kept, else its `net.*`, with that prefix removed."""
    ema = f"{module}ema.module."
    prefix = ema if any(k.startswith(ema) for k in state) else f"{module}net."
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    bad = first_nonfinite(weights)
    if bad is not None:
        raise ValueError(f"the checkpoint's {prefix}{bad} holds non-finite values (a diverged run): use an earlier "
                         "checkpoint of that run (its checkpoints/step_*.ckpt) or train it again")
    return weights
