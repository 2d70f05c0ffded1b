"""Sweeps: folder names that parse back as paths, the train app's objective, HParams data, resumed run folders."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_tmd.train import main, objective_value

CONF = Path(__file__).resolve().parents[1] / "conf"


def sweep_subfolder(*overrides: str) -> str:
    """The sweep subfolder name (`hydra.job.override_dirname`) of a job with these overrides."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    return cfg.hydra.job.override_dirname


def test_a_sweep_subfolder_parses_back_as_a_ckpt_path():
    plain = sweep_subfolder("experiment=shapes_smoke", "seed=0", "trainer.max_steps=20", "stage.module.lr=1e-4",
                            "ckpt_path=runs/x/checkpoints/last.ckpt")
    assert plain == "seed-0+stage.module.lr-1e-4+trainer.max_steps-20"
    odd = sweep_subfolder("seed=0", "+tag=data/shapes-v2.1", "stage.module.lr=-1.5e-4")
    assert odd == "+tag-data/shapes-v2.1+seed-0+stage.module.lr--1.5e-4"
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
