"""The pipeline app: teacher -> stage 1 -> stage 2 -> baselines -> evaluation in one run folder, skipping
finished stages, resuming a killed one, and refusing bad input before any work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import CONF
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from lightning_tmd.pipeline import Pipeline, pipeline, run_stage_process, start_overrides, stop_reason

ROOT = Path(__file__).resolve().parents[1]


def pipeline_cfg(root: Path, *overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("pipeline", overrides=["pipeline=shapes_quick", f"root={root}", *overrides])


def test_quick_pipeline_end_to_end_then_skips_every_finished_stage(tiny_judge, tmp_path):
    evaluation = ["num_samples=16", f"judge.path={tiny_judge[0]}", "latency.repeats=1", "latency.batch_size=2"]
    overrides = ["pipeline.students=[[2,2]]", f"pipeline.evaluation.overrides={json.dumps(evaluation)}"]
    result = pipeline(pipeline_cfg(tmp_path, *overrides))
    folder = tmp_path / "shapes_quick"
    stages = ["teacher", "stage1_m2n2", "stage2_m2n2", "kd", "dmd2v_m1", "dmd2v_m2"]
    for name in stages:
        assert (folder / name / "checkpoints" / "last.ckpt").is_file(), name
        assert result["stages"][name]["status"] == "trained"
        assert list((folder / name / "tensorboard").glob("events.out.tfevents.*")), name  # one log root
    for name in ("results.md", "results.json", "samples.gif", "pipeline.yaml", "pipeline.log"):
        assert (folder / name).is_file(), name
    rows = json.loads((folder / "results.json").read_text())["evaluation"]["rows"]
    assert {r["model"] for r in rows} >= {"teacher", *stages[1:]}
    assert "| stage2_m2n2 |" in (folder / "results.md").read_text()
    # the same command again: every training stage is skipped, only the evaluation runs
    again = pipeline(pipeline_cfg(tmp_path, *overrides))
    assert all(again["stages"][name]["status"].startswith("skipped") for name in stages)


def test_a_killed_pipeline_resumes_the_interrupted_stage_from_its_checkpoint(smoke_checkpoint, tmp_path):
    overrides = [f"pipeline.teacher_ckpt={smoke_checkpoint}", "pipeline.students=[[2,2]]", "pipeline.baselines=[]",
                 "pipeline.until=stage2_m2n2",
                 'pipeline.overrides.stage2=["trainer.max_steps=400","callbacks.checkpoint.every_n_train_steps=5"]']
    command = [sys.executable, "-m", "lightning_tmd.pipeline", "pipeline=shapes_quick", f"root={tmp_path}", *overrides]
    process = subprocess.Popen(command, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "shapes_quick" / "stage2_m2n2" / "checkpoints"
    deadline = time.time() + 300
    while not list(checkpoints.glob("step_*.ckpt")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # the pipeline and its stage-2 process
    process.wait()
    assert list(checkpoints.glob("step_*.ckpt")), "stage 2 never wrote a checkpoint"

    result = pipeline(pipeline_cfg(tmp_path, *overrides))
    assert result["stages"]["stage1_m2n2"]["status"].startswith("skipped")
    resumed = result["stages"]["stage2_m2n2"]["resumed_from"]
    assert resumed is not None and Path(resumed).parent == checkpoints
    final = torch.load(checkpoints / "last.ckpt", weights_only=False)
    assert final["global_step"] == 400 and final["dmd_iteration"] == 400
    log = (tmp_path / "shapes_quick" / "pipeline.log").read_text()
    assert "stage 2 of 2, stage2_m2n2: resuming from" in log


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (["pipeline.until=stage9"], ValueError, "pipeline.until=stage9: no such stage"),
        (["pipeline.baselines=[dmd3]"], ValueError, r"pipeline.baselines: \['dmd3'\] unknown"),
        (["pipeline.experiments.stage1=no_such_experiment"], ValueError, "stage1_m2n2: its config does not compose"),
        (["pipeline.students=[[0,2]]"], ValueError, "pipeline.students"),
        (["pipeline.teacher_ckpt=/no/such.ckpt"], FileNotFoundError, "pipeline.teacher_ckpt"),
    ],
)
def test_bad_pipeline_input_fails_before_any_work(overrides, error, message, tmp_path):
    with pytest.raises(error, match=message):
        Pipeline(pipeline_cfg(tmp_path, *overrides)).check()
    assert not (tmp_path / "shapes_quick" / "teacher").exists()


def test_a_student_checkpoint_is_no_teacher_and_folders_are_not_mixed(smoke_checkpoint, smoke_student_checkpoint,
                                                                      tmp_path):
    with pytest.raises(ValueError, match="is a tm checkpoint, not a teacher's"):
        Pipeline(pipeline_cfg(tmp_path, f"pipeline.teacher_ckpt={smoke_student_checkpoint}")).check()
    Pipeline(pipeline_cfg(tmp_path, f"pipeline.teacher_ckpt={smoke_checkpoint}")).check()  # writes its config
    with pytest.raises(ValueError, match=r"holds another pipeline .*\['seed'\].*pipeline.name.*force=true"):
        Pipeline(pipeline_cfg(tmp_path, f"pipeline.teacher_ckpt={smoke_checkpoint}", "pipeline.seed=1")).check()
    teacher = f"pipeline.teacher_ckpt={smoke_checkpoint}"
    Pipeline(pipeline_cfg(tmp_path, teacher, "pipeline.seed=1", "force=true")).check()
    # stopping earlier is the same pipeline
    Pipeline(pipeline_cfg(tmp_path, f"pipeline.teacher_ckpt={smoke_checkpoint}", "pipeline.seed=1",
                          "pipeline.until=stage1_m2n2")).check()


def test_a_stage_killed_before_its_first_checkpoint_starts_afresh_in_its_folder(smoke_checkpoint, tmp_path):
    stage = tmp_path / "shapes_quick" / "stage1_m2n2"
    assert start_overrides(stage, None) == []  # a new folder
    (stage / ".hydra").mkdir(parents=True)
    (stage / "train.log").write_text("killed\n")
    assert start_overrides(stage, None) == []  # Hydra's files only: nothing to overwrite
    (stage / "tensorboard").mkdir()
    (stage / "tensorboard" / "events.out.tfevents.1").write_text("the killed attempt")
    (stage / "checkpoints").mkdir()
    (stage / "checkpoints" / "last.ckpt").write_bytes(smoke_checkpoint.read_bytes()[:2000])  # killed mid-write
    assert start_overrides(stage, stage / "checkpoints" / "step_0000005.ckpt") == [
        f"ckpt_path={stage / 'checkpoints' / 'step_0000005.ckpt'}"]
    assert start_overrides(stage, None) == ["overwrite=true"]

    result = pipeline(pipeline_cfg(tmp_path, f"pipeline.teacher_ckpt={smoke_checkpoint}", "pipeline.students=[[2,2]]",
                                   "pipeline.baselines=[]", "pipeline.until=stage1_m2n2",
                                   'pipeline.overrides.stage1=["trainer.max_steps=2"]'))
    record = result["stages"]["stage1_m2n2"]
    assert record["status"] == "trained" and record["resumed_from"] is None
    assert torch.load(stage / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    assert not (stage / "tensorboard" / "events.out.tfevents.1").exists()


def test_a_signal_to_the_pipeline_reaches_the_running_stage_once_and_its_exit_code_comes_back():
    child = ("import signal, sys, time\n"
             "got = []\n"
             "signal.signal(signal.SIGTERM, lambda *a: got.append(1))\n"
             "deadline = time.time() + 60\n"
             "while not got and time.time() < deadline: time.sleep(0.05)\n"
             "time.sleep(0.5)\n"
             "sys.exit(128 + 15 if len(got) == 1 else 1)\n")
    before = signal.getsignal(signal.SIGTERM)
    threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
    code = run_stage_process([sys.executable, "-c", child])
    assert code == 143 and "stopped by SIGTERM" in stop_reason(code)
    assert signal.getsignal(signal.SIGTERM) is before
    killed = run_stage_process([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    assert killed == 137 and stop_reason(killed).startswith("killed by SIGKILL")
    assert stop_reason(1).startswith("failed with exit code 1")
