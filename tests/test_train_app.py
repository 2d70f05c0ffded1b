import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

import lightning_tmd.app as app
from lightning_tmd.app import create_fresh_folder, register_resolvers, remove_unused_run_folder
from lightning_tmd.train import train

ROOT = Path(__file__).resolve().parents[1]


def run_train_app(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`python -m lightning_tmd.train experiment=shapes_smoke ...` of this checkout, run in `cwd`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "lightning_tmd.train", "experiment=shapes_smoke", *overrides],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_fast_dev_run_composed_with_hydra(smoke_cfg):
    cfg = smoke_cfg("trainer.fast_dev_run=true")
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


def test_smoke_experiment_trains_samples_and_checkpoints(smoke_cfg, tmp_path):
    cfg = smoke_cfg()
    train(cfg)
    out = Path(cfg.output_dir)
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert sorted(p.name for p in (out / "tensorboard" / "samples").glob("*.gif")) == [
        "step_0000010.gif", "step_0000020.gif"]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_resume_continues_step_counter_and_optimizer_state(smoke_cfg):
    first = smoke_cfg("trainer.max_steps=10")
    train(first)
    ckpt = Path(first.output_dir) / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    assert saved["global_step"] == 10
    assert saved["optimizer_states"][0]["state"][0]["step"] == 10

    resumed = smoke_cfg("trainer.max_steps=20", f"ckpt_path={ckpt}",
                        f"output_dir={Path(first.output_dir) / 'resumed'}")
    train(resumed)
    final = torch.load(Path(resumed.output_dir) / "checkpoints" / "last.ckpt", weights_only=False)
    assert final["global_step"] == 20
    assert final["optimizer_states"][0]["state"][0]["step"] == 20  # Adam moments continued, not restarted
    assert final["state_dict"]["ema.n_averaged"] == 20
    assert final["lr_schedulers"][0]["last_epoch"] == 20


def test_resuming_in_the_run_folder_from_a_periodic_checkpoint_keeps_last_ckpt_current(smoke_cfg):
    """After a crash a run is resumed in its own folder, often from step_*.ckpt: last.ckpt must then be
    the newest weights, not a stale file beside a new last-v1.ckpt."""
    every = "callbacks.checkpoint.every_n_train_steps=10"
    first = smoke_cfg("trainer.max_steps=20", every)
    train(first)
    checkpoints = Path(first.output_dir) / "checkpoints"
    train(smoke_cfg("trainer.max_steps=30", every, f"ckpt_path={checkpoints / 'step_0000010.ckpt'}"))
    assert sorted(p.name for p in checkpoints.glob("last*")) == ["last.ckpt"]
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"] == 30


def test_a_run_ending_between_periodic_checkpoints_saves_its_final_step(smoke_cfg):
    cfg = smoke_cfg("trainer.max_steps=15", "callbacks.checkpoint.every_n_train_steps=10")
    train(cfg)
    checkpoints = Path(cfg.output_dir) / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("*.ckpt")) == ["last.ckpt", "step_0000010.ckpt"]
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"] == 15


def test_unknown_experiment_is_named(smoke_cfg):
    with pytest.raises(MissingConfigException, match="experiment"):
        smoke_cfg("experiment=no_such_experiment")


@pytest.mark.parametrize(
    ("override", "error", "message"),
    [
        ("model.path=/no/such/folder", FileNotFoundError, "model.path"),
        ("data.size=18", ValueError, "data.size=18"),
        ("model.config.text_dim=32", ValueError, "text_dim"),
        ("text.negative_prompt=null", ValueError, "text.negative_prompt"),
        ("ckpt_path=/no/such.ckpt", FileNotFoundError, "ckpt_path"),
        ("stage.module.high_noise_fraction=1.5", ValueError, "high_noise_fraction=1.5"),
        ("stage.module.high_noise_min=1.0", ValueError, "high_noise_min=1.0"),
        ("stage.module.optim.name=sgd", ValueError, "optim.name='sgd'"),
    ],
)
def test_bad_config_fails_before_training(smoke_cfg, override, error, message):
    with pytest.raises(error, match=message):
        train(smoke_cfg(override))
    assert not (Path(smoke_cfg().output_dir) / "checkpoints").exists()


def test_the_app_logs_its_run_folder_tensorboard_command_checkpoint_and_wall_time(tmp_path):
    run = tmp_path / "run"
    result = run_train_app(tmp_path, "trainer.max_steps=4", "callbacks.samples.every_n_steps=0",
                           "trainer.limit_val_batches=0", f"hydra.run.dir={run}")
    assert result.returncode == 0, result.stderr[-3000:]
    log = (run / "train.log").read_text()
    checkpoint = run / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file()
    for message in (f"Run folder: {run}\n", f"TensorBoard: tensorboard --logdir {run}\n", f"Checkpoint: {checkpoint}\n",
                    "Wall time: 0:00:"):
        assert message in log and message in result.stdout, message
    assert "`Trainer.fit` stopped: `max_steps=4` reached" in log  # Lightning's messages too


def test_a_failed_config_check_leaves_no_run_folder(tmp_path):
    result = run_train_app(tmp_path, "data.size=18")  # the default run folder: runs/shapes_smoke/<time>
    assert result.returncode != 0 and "data.size=18 is not divisible" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_only_a_run_folder_without_outputs_is_removed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "kept").mkdir(parents=True)
    for name in ("a", "b"):
        folder = tmp_path / "runs" / "x" / name
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "config.yaml").write_text("seed: 0\n")
        (folder / "train.log").write_text("Run folder: ...\n")
    (tmp_path / "runs" / "x" / "b" / "checkpoints").mkdir()
    assert not remove_unused_run_folder(tmp_path / "runs" / "x" / "b")
    assert remove_unused_run_folder(tmp_path / "runs" / "x" / "a")
    assert sorted(p.name for p in (tmp_path / "runs" / "x").iterdir()) == ["b"]
    assert not remove_unused_run_folder(tmp_path)  # never the working directory
    (tmp_path / "runs" / "x" / "b" / "checkpoints").rmdir()
    assert remove_unused_run_folder(tmp_path / "runs" / "x" / "b")
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["kept"]  # the parents it empties go too


def test_muon_with_fsdp_is_refused_before_training(smoke_cfg):
    with pytest.raises(ValueError, match="optim.name=muon .* FSDP2"):
        train(smoke_cfg("strategy=fsdp", "stage.module.optim.name=muon"))


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resumed_run_equals_the_uninterrupted_run(smoke_cfg, tmp_path, optimizer):
    option = f"stage.module.optim.name={optimizer}"
    straight = smoke_cfg("trainer.max_steps=20", option, f"output_dir={tmp_path / 'straight'}")
    train(straight)
    first = smoke_cfg("trainer.max_steps=10", option, f"output_dir={tmp_path / 'first'}")
    train(first)
    resumed = smoke_cfg("trainer.max_steps=20", option, f"ckpt_path={tmp_path / 'first/checkpoints/last.ckpt'}",
                        f"output_dir={tmp_path / 'resumed'}")
    train(resumed)

    def weights(cfg):
        return torch.load(Path(cfg.output_dir) / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]

    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_new_run_into_a_used_folder_is_refused_a_resume_is_not_and_overwrite_starts_afresh(smoke_cfg, tmp_path):
    quick = ["callbacks.samples.every_n_steps=0", "trainer.limit_val_batches=0"]
    train(smoke_cfg(*quick, "trainer.max_steps=2"))
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (tmp_path / "train.log").write_text("the first run\n")
    before = snapshot(tmp_path)
    last = tmp_path.absolute() / "checkpoints" / "last.ckpt"
    with pytest.raises(FileExistsError) as refused:
        train(smoke_cfg(*quick, "trainer.max_steps=3"))
    message = str(refused.value)
    for part in (f"output_dir: the run folder '{tmp_path.absolute()}' already holds an earlier run",
                 "checkpoints/last.ckpt", f"resume it with ckpt_path={last}", "hydra.run.dir=", "overwrite=true"):
        assert part in message, part
    assert snapshot(tmp_path) == before  # nothing of the first run touched

    train(smoke_cfg(*quick, "trainer.max_steps=4", f"ckpt_path={last}"))  # resuming in its own folder
    assert torch.load(last, weights_only=False)["global_step"] == 4

    train(smoke_cfg(*quick, "trainer.max_steps=1", "overwrite=true"))
    assert torch.load(last, weights_only=False)["global_step"] == 1  # a new run, not a resumed one
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1  # the earlier events are gone
    assert (tmp_path / "train.log").read_text() == "the first run\n" and (tmp_path / ".hydra" / "config.yaml").is_file()


def test_overwrite_deletes_only_an_earlier_training_run(smoke_cfg, tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="already holds an earlier run \\(notes.txt\\): choose another folder"):
        train(smoke_cfg())
    with pytest.raises(FileExistsError, match="does not look like a training run folder"):
        train(smoke_cfg("overwrite=true"))
    (tmp_path / "checkpoints").mkdir()
    monkeypatch.chdir(tmp_path)  # never the working directory, even one that holds a run
    with pytest.raises(FileExistsError, match="holds the working directory"):
        train(smoke_cfg("overwrite=true"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "notes.txt"]


def test_the_app_refuses_a_second_run_in_its_folder_and_keeps_the_first(smoke_cfg, tmp_path):
    run = tmp_path / "run"
    train(smoke_cfg("callbacks.samples.every_n_steps=0", "trainer.max_steps=1", f"output_dir={run}"))
    before = snapshot(run)
    result = run_train_app(tmp_path, "trainer.max_steps=1", f"hydra.run.dir={run}")
    assert result.returncode != 0 and "already holds an earlier run (checkpoints/last.ckpt" in result.stderr
    assert snapshot(run) == before  # refused before Hydra writes its .hydra/ and log there
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # the explicit folder: no default one made


def test_fresh_folders_are_new_per_process_and_the_same_within_one(tmp_path, monkeypatch):
    base = tmp_path / "runs" / "smoke" / "2026-01-01_00-00-00"
    assert create_fresh_folder(base) == base and base.parent.is_dir()
    assert create_fresh_folder(base) == base.with_name(base.name + "_1")
    monkeypatch.setattr(app, "_FRESH", {})
    register_resolvers()  # registering again changes nothing
    config = OmegaConf.create({"dir": "${tmd_fresh:'" + str(base) + "'}"})
    first = config.dir
    assert first == str(base.with_name(base.name + "_2")) and config.dir == first  # one answer per process
    app._FRESH.clear()  # another process, the same second
    assert OmegaConf.create({"dir": "${tmd_fresh:'" + str(base) + "'}"}).dir == str(base.with_name(base.name + "_3"))


def test_processes_started_in_the_same_second_get_their_own_folders(tmp_path):
    base = tmp_path / "samples" / "2026-01-01_00-00-00"
    code = "import sys; from lightning_tmd.app import fresh_folder; print(fresh_folder(sys.argv[1]))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    processes = [subprocess.Popen([sys.executable, "-c", code, str(base)], env=env, stdout=subprocess.PIPE, text=True)
                 for _ in range(4)]
    folders = [process.communicate(timeout=120)[0].strip() for process in processes]
    assert sorted(folders) == [str(base)] + [f"{base}_{n}" for n in (1, 2, 3)]
