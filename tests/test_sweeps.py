"""Sweeps: folder names that parse back as paths, the train app's objective, HParams data, resumed run folders."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser

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
