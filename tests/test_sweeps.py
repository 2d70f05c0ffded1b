"""Sweeps: folder names that parse back as paths, the train app's objective, HParams data, resumed run folders."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_tmd.app import checkpoint_run_folder
from lightning_tmd.train import main, objective_value

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def sweep_subfolder(*overrides: str) -> str:
    """The sweep subfolder name (`hydra.job.override_dirname`) of a job with these overrides."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    return cfg.hydra.job.override_dirname


def test_a_sweep_subfolder_parses_back_as_a_ckpt_path():
    plain = sweep_subfolder("experiment=shapes_smoke", "seed=0", "trainer.max_steps=20", "stage.module.optim.lr=1e-4",
                            "ckpt_path=runs/x/checkpoints/last.ckpt")
    assert plain == "seed-0+stage.module.optim.lr-1e-4+trainer.max_steps-20"
    odd = sweep_subfolder("seed=0", "+tag=data/shapes-v2.1", "stage.module.optim.lr=-1.5e-4")
    assert odd == "+tag-data/shapes-v2.1+seed-0+stage.module.optim.lr--1.5e-4"
    for name in (plain, odd):
        path = f"multirun/shapes_smoke/2026-01-01_00-00-00/{name}/checkpoints/last.ckpt"
        override = OverridesParser.create().parse_overrides([f"ckpt_path={path}"])[0]
        assert override.key_or_group == "ckpt_path" and override.value() == path


def last_scalar(folder: Path, tag: str) -> tuple[int, float]:
    """The last (step, value) of a TensorBoard scalar in `folder`'s event files."""
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    last = events.Scalars(tag)[-1]
    return last.step, last.value


def test_the_app_returns_its_objective_the_final_logged_metric(smoke_cfg, tmp_path):
    cfg = smoke_cfg("trainer.max_steps=3", "trainer.log_every_n_steps=1", "callbacks.samples.every_n_steps=0",
                    "trainer.limit_val_batches=0")
    assert cfg.objective == "train/loss"
    value = main.__wrapped__(cfg)  # the app's function without Hydra's argument parsing
    assert isinstance(value, float)
    assert last_scalar(tmp_path / "tensorboard", "train/loss") == (2, pytest.approx(value))


def test_an_objective_the_run_did_not_log_names_the_key_and_the_metrics(smoke_cfg):
    with pytest.raises(ValueError, match="objective: the run logged no metric 'val/fid'.* train/loss"):
        objective_value(smoke_cfg("objective=val/fid"), {"train/loss": 0.5, "train/mse": 0.1})
    assert math.isnan(objective_value(smoke_cfg(), {}))  # a run that trained no step (resumed at max_steps)


def run_train_app(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m lightning_tmd.train experiment=shapes_smoke ...` of this checkout, run in `cwd`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "lightning_tmd.train", *args, "experiment=shapes_smoke",
                           "callbacks.samples.every_n_steps=0", "trainer.limit_val_batches=0",
                           "trainer.log_every_n_steps=1"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


QUICK = "callbacks.samples.every_n_steps-0+trainer.limit_val_batches-0+trainer.log_every_n_steps-1"  # run_train_app's


def test_a_sweep_logs_each_runs_hparams_with_its_final_metrics(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_train_app(tmp_path, "-m", "trainer.max_steps=2,3", f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = {steps: sweep / f"{QUICK}+trainer.max_steps-{steps}" for steps in (2, 3)}
    assert sorted(p for p in sweep.iterdir() if p.is_dir()) == list(jobs.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]  # no default run folder beside it
    metrics = ["final/train/loss", "final/s_per_iteration", "final/clips_per_s"]
    for steps in (2, 3):
        assert len(list((jobs[steps] / "tensorboard").glob("events.out.tfevents.*"))) == 1
        events = EventAccumulator(str(jobs[steps] / "tensorboard"))
        events.Reload()
        hparams = events.PluginTagToContent("hparams")
        assert "_hparams_/session_start_info" in hparams
        assert all(name.encode() in hparams["_hparams_/experiment"] for name in metrics)
        assert {*metrics, "perf/s_per_iteration", "perf/clips_per_s"} <= set(events.Tags()["scalars"])
        assert events.Scalars("final/train/loss")[-1].step == steps
        assert b"stage/module/optim/lr" in hparams["_hparams_/session_start_info"]  # the config, flattened


def test_a_tmd_student_run_logs_its_effective_nfe_with_its_hparams(smoke_student_checkpoint):
    folder = smoke_student_checkpoint.parent.parent / "tensorboard"
    step, nfe = last_scalar(folder, "final/effective_nfe")
    assert step == 5 and nfe > 0
    events = EventAccumulator(str(folder))
    events.Reload()
    assert b"final/effective_nfe" in events.PluginTagToContent("hparams")["_hparams_/experiment"]


def test_the_run_folder_of_a_checkpoint(tmp_path):
    run = tmp_path / "runs" / "smoke" / "2026-01-01_00-00-00"
    (run / "checkpoints" / "last.ckpt").mkdir(parents=True)  # a sharded checkpoint is a folder
    (run / "checkpoints" / "step_0000010.ckpt").write_bytes(b"")
    (tmp_path / "teacher.ckpt").write_bytes(b"")
    assert checkpoint_run_folder(str(run / "checkpoints" / "last.ckpt")) == run
    assert checkpoint_run_folder(f"{run}/checkpoints/last.ckpt/") == run
    assert checkpoint_run_folder(str(run / "checkpoints" / "step_0000010.ckpt")) == run
    for outside in (None, "", str(tmp_path / "teacher.ckpt"), str(run / "checkpoints" / "missing.ckpt")):
        assert checkpoint_run_folder(outside) is None, outside


def test_a_resumed_run_goes_on_in_its_folder_and_tensorboard_curve(tmp_path):
    first = run_train_app(tmp_path, "trainer.max_steps=4")
    assert first.returncode == 0, first.stderr[-3000:]
    (run,) = (tmp_path / "runs" / "shapes_smoke").iterdir()
    last = run.relative_to(tmp_path) / "checkpoints" / "last.ckpt"
    resumed = run_train_app(tmp_path, "trainer.max_steps=8", f"ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert list((tmp_path / "runs" / "shapes_smoke").iterdir()) == [run]  # no new run folder
    assert f"Run folder: {run}\n" in resumed.stdout
    assert last_scalar(run / "tensorboard", "train/loss")[0] == 7  # steps 0 ... 7: one curve
    assert last_scalar(run / "tensorboard", "final/train/loss")[0] == 8
    assert torch.load(tmp_path / last, weights_only=False)["global_step"] == 8
