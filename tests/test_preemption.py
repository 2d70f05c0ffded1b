"""Pre-emption: SIGTERM or Ctrl+C finishes the iteration, saves last.ckpt, exits 128 + signal, and the resumed run
equals an uninterrupted one bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose_train
from signal_at import SignalAt

from lightning_tmd.callbacks import RunInterrupted, StopOnSignal
from lightning_tmd.train import train

ROOT = Path(__file__).resolve().parents[1]


def stage2(teacher: Path, student: Path) -> list[str]:
    return ["experiment=shapes_smoke_dmd", f"stage.module.teacher_ckpt={teacher}",
            f"stage.module.student_ckpt={student}", "callbacks.samples.every_n_steps=0", "trainer.max_steps=8"]


def assert_same_training_state(a: Path, b: Path) -> None:
    first, second = (torch.load(p, map_location="cpu", weights_only=False) for p in (a, b))
    assert first["global_step"] == second["global_step"]
    assert first["state_dict"].keys() == second["state_dict"].keys()
    for name, value in first["state_dict"].items():
        assert torch.equal(value, second["state_dict"][name]), name
    for opt_a, opt_b in zip(first["optimizer_states"], second["optimizer_states"], strict=True):
        for key, state in opt_a["state"].items():
            for field, value in state.items():
                other = opt_b["state"][key][field]
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(other)), (key, field)


def test_sigterm_saves_exits_nonzero_and_the_resumed_stage2_run_is_bit_identical(
        smoke_checkpoint, smoke_student_checkpoint, tmp_path):
    interrupted = tmp_path / "interrupted"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "lightning_tmd.train", *stage2(smoke_checkpoint, smoke_student_checkpoint),
         f"hydra.run.dir={interrupted}", "+callbacks.signal._target_=signal_at.SignalAt", "+callbacks.signal.step=3"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
    assert "stopped by SIGTERM after step 4" in result.stdout + result.stderr
    last = interrupted / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 4  # iteration 3 finished

    train(compose_train([*stage2(smoke_checkpoint, smoke_student_checkpoint), f"ckpt_path={last}"], interrupted))
    train(compose_train(stage2(smoke_checkpoint, smoke_student_checkpoint), tmp_path / "full"))
    assert_same_training_state(last, tmp_path / "full" / "checkpoints" / "last.ckpt")


def test_ctrl_c_saves_the_finished_iteration_and_exits_130(smoke_cfg, tmp_path):
    cfg = smoke_cfg("callbacks.samples.every_n_steps=0", "trainer.max_steps=6", "+callbacks.signal._target_="
                    "signal_at.SignalAt", "+callbacks.signal.step=2", "+callbacks.signal.signal_name=SIGINT")
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(RunInterrupted) as stop:
        train(cfg)
    assert stop.value.code == 130 and stop.value.step == 3
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are given back


def test_a_second_ctrl_c_stops_at_once():
    callback = StopOnSignal()
    callback.trainer = type("Trainer", (), {"strategy": type("Strategy", (), {"launcher": None})(),
                                            "global_step": 0})()
    callback.received = None
    callback.handle(signal.SIGINT, None)
    with pytest.raises(KeyboardInterrupt):
        callback.handle(signal.SIGINT, None)


def test_signal_names_are_checked():
    with pytest.raises(KeyError):
        StopOnSignal(signals=("SIGNOPE",))
    assert SignalAt(1).signum == signal.SIGTERM
