"""The non-finite guard: a non-finite loss or gradient skips its optimizer step (every stage, every stage-2 role),
a streak of them stops the run with an error, no checkpoint ever holds a non-finite weight, and a checkpoint that
does is refused as teacher or student."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_train

import lightning_tmd.modules.dmd as dmd_module
from lightning_tmd.callbacks import NonFiniteError, NonFiniteGuard
from lightning_tmd.checkpoints import sampling_state_dict
from lightning_tmd.modules.teacher import TeacherModule
from lightning_tmd.parallel import first_nonfinite
from lightning_tmd.train import train


def nan_loss_at(monkeypatch, steps: set[int]) -> None:
    """Make the teacher's training loss NaN at the given global steps."""
    original = TeacherModule.training_step

    def training_step(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        return loss * float("nan") if self.global_step in steps else loss

    monkeypatch.setattr(TeacherModule, "training_step", training_step)


def saved_checkpoints(folder) -> list:
    return sorted((folder / "checkpoints").glob("*.ckpt"))


def assert_all_finite(paths) -> None:
    assert paths
    for path in paths:
        assert first_nonfinite(torch.load(path, map_location="cpu", weights_only=False)["state_dict"]) is None, path


def test_a_nonfinite_loss_skips_its_step_and_training_goes_on(monkeypatch, tmp_path):
    nan_loss_at(monkeypatch, {3, 4})
    metrics = train(compose_train(["experiment=shapes_smoke", "callbacks.samples.every_n_steps=0",
                                   "trainer.max_steps=12"], tmp_path))
    assert metrics["train/nonfinite_skips"] == 2.0
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert_all_finite(saved_checkpoints(tmp_path))


def test_a_streak_of_nonfinite_steps_stops_the_run_and_keeps_the_last_good_checkpoint(monkeypatch, tmp_path):
    nan_loss_at(monkeypatch, set(range(12, 100)))
    cfg = compose_train(["experiment=shapes_smoke", "callbacks.samples.every_n_steps=0", "trainer.max_steps=30",
                         "callbacks.nonfinite.max_consecutive=3"], tmp_path)
    with pytest.raises(NonFiniteError, match="3 optimizer steps in a row"):
        train(cfg)
    paths = saved_checkpoints(tmp_path)
    assert [p.name for p in paths] == ["last.ckpt", "step_0000010.ckpt"]
    assert torch.load(paths[0], map_location="cpu", weights_only=False)["global_step"] == 10
    assert_all_finite(paths)


def test_stage2_skips_a_nonfinite_student_update_and_keeps_training(monkeypatch, smoke_checkpoint,
                                                                    smoke_student_checkpoint, tmp_path):
    original = dmd_module.vsd_gradient
    calls = []

    def vsd_gradient(*args, **kwargs):
        calls.append(1)
        direction = original(*args, **kwargs)
        return direction * float("nan") if len(calls) == 1 else direction

    monkeypatch.setattr(dmd_module, "vsd_gradient", vsd_gradient)
    cfg = compose_train(["experiment=shapes_smoke_dmd", f"stage.module.teacher_ckpt={smoke_checkpoint}",
                         f"stage.module.student_ckpt={smoke_student_checkpoint}", "callbacks.samples.every_n_steps=0",
                         "trainer.max_steps=10", "callbacks.checkpoint.every_n_train_steps=5"], tmp_path)
    metrics = train(cfg)
    assert len(calls) >= 2  # the student updated again after the skipped one
    assert metrics["train/nonfinite_skips"] == 1.0
    assert_all_finite(saved_checkpoints(tmp_path))


def test_saving_a_nonfinite_weight_is_refused():
    guard = NonFiniteGuard()
    state = {"state_dict": {"net.a": torch.ones(3), "net.b": torch.tensor([1.0, float("inf")])}}

    class Strategy:  # one process: the decision is this rank's
        @staticmethod
        def reduce_boolean_decision(decision, all=True):
            return decision

    class Trainer:
        global_step = 7
        strategy = Strategy()

    with pytest.raises(NonFiniteError, match="'net.b' is not finite"):
        guard.on_save_checkpoint(Trainer(), None, state)
    guard.on_save_checkpoint(Trainer(), None, {"state_dict": {"net.a": torch.ones(3), "step": torch.tensor(3)}})


def test_a_nonfinite_checkpoint_is_refused_as_teacher(smoke_checkpoint, tmp_path):
    checkpoint = torch.load(smoke_checkpoint, map_location="cpu", weights_only=False)
    key = next(k for k in checkpoint["state_dict"] if k.startswith("ema.module.") and k.endswith("weight"))
    checkpoint["state_dict"][key] = torch.full_like(checkpoint["state_dict"][key], float("nan"))
    bad = tmp_path / "diverged.ckpt"
    torch.save(checkpoint, bad)
    with pytest.raises(ValueError, match="non-finite values"):
        sampling_state_dict(str(bad))
    cfg = compose_train(["experiment=shapes_smoke_tm", f"stage.module.teacher_ckpt={bad}"], tmp_path / "run")
    with pytest.raises(ValueError, match="non-finite values"):
        train(cfg)


def test_max_consecutive_must_be_positive():
    with pytest.raises(ValueError, match="max_consecutive"):
        NonFiniteGuard(max_consecutive=0)


def test_the_vsd_direction_does_not_hide_a_nonfinite_score():
    from lightning_tmd.losses import vsd_gradient

    x = torch.zeros(2, 3, 4)
    fake = torch.ones(2, 3, 4)
    fake[1, 0, 0] = float("nan")
    direction = vsd_gradient(x, fake, -torch.ones(2, 3, 4))
    assert torch.isfinite(direction[0]).all() and direction[1].isnan().any()
