"""Checkpoint files: a failed save stops the run, a save killed mid-write leaves the previous file loadable, and
resuming from a corrupt file names the checkpoint to use instead."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from conftest import compose_train

import lightning_tmd.checkpoints as checkpoint_module
from lightning_tmd.checkpoints import AtomicCheckpointIO, CheckpointSaveError
from lightning_tmd.train import train

SMOKE = ["experiment=shapes_smoke", "callbacks.samples.every_n_steps=0", "trainer.max_steps=10",
         "callbacks.checkpoint.every_n_train_steps=5"]


def test_a_checkpoint_folder_that_cannot_be_written_fails_the_run(tmp_path):
    blocked = tmp_path / "checkpoints"  # outside the run folder: a file there is no earlier run
    blocked.write_text("a file where the folder should be")
    with pytest.raises(CheckpointSaveError, match="could not write the checkpoint"):
        train(compose_train([*SMOKE, f"callbacks.checkpoint.dirpath={blocked}"], tmp_path / "run"))


def test_a_full_disk_fails_the_run_and_leaves_no_temporary_file(monkeypatch, tmp_path):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.os, "fsync", full)
    with pytest.raises(CheckpointSaveError, match="No space left"):
        train(compose_train(SMOKE, tmp_path))
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_a_save_killed_mid_write_keeps_the_previous_checkpoint(monkeypatch, tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "weights": torch.ones(1000)}, path)

    def killed(obj, f):
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt  # the process dies mid-write

    monkeypatch.setattr(checkpoint_module.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "weights": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["step"] == 1
    # a temporary file left by a real kill (another pid) is removed by the next save
    (tmp_path / ".last.ckpt.999999.tmp").write_bytes(b"partial")
    io.save_checkpoint({"step": 3}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_resuming_from_a_corrupt_checkpoint_names_the_newest_loadable_one(tmp_path):
    train(compose_train(SMOKE, tmp_path))
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: os.path.getsize(last) // 2])  # truncated
    with pytest.raises(ValueError, match=r"not a readable checkpoint.*ckpt_path=.*step_0000010\.ckpt"):
        train(compose_train([*SMOKE, "trainer.max_steps=15", f"ckpt_path={last}"], tmp_path / "resumed"))
