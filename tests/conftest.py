"""Shared test helpers: Hydra composition of the project's configs and tiny nets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

CONF = Path(__file__).resolve().parents[1] / "conf"

TINY_WAN = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=3, out_channels=3,
    text_dim=16, freq_dim=16, ffn_dim=32, num_layers=3,
)


def compose_train(overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose conf/train.yaml with overrides, writing into `output_dir`."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"output_dir={output_dir}", *overrides])


@pytest.fixture
def smoke_cfg(tmp_path):
    def make(*overrides: str) -> DictConfig:
        return compose_train(["experiment=shapes_smoke", *overrides], tmp_path)

    return make


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
    GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def smoke_checkpoint(tmp_path_factory) -> Path:
    """A shapes_smoke teacher trained once per test session."""
    from lightning_tmd.train import train

    out = tmp_path_factory.mktemp("smoke_run")
    train(compose_train(["experiment=shapes_smoke", "callbacks.samples.every_n_steps=0"], out))
    GlobalHydra.instance().clear()
    return out / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def smoke_student_checkpoint(tmp_path_factory, smoke_checkpoint) -> Path:
    """A 5-step stage-1 student of the smoke teacher, trained once per test session."""
    from lightning_tmd.train import train

    out = tmp_path_factory.mktemp("smoke_tm_run")
    train(compose_train(["experiment=shapes_smoke_tm", f"stage.module.teacher_ckpt={smoke_checkpoint}",
                         "trainer.max_steps=5"], out))
    GlobalHydra.instance().clear()
    return out / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def tiny_judge(tmp_path_factory):
    """A judge for the smoke clips (4 frames of 16 x 16), trained once per test session."""
    from lightning_tmd.metrics.judge import train_judge

    path = tmp_path_factory.mktemp("judge") / "judge.pt"
    net, accuracy = train_judge(path, frames=4, size=16, max_objects=2, steps=1500, batch_size=32, num_val=256,
                                width=16, num_features=64)
    return path, net, accuracy


@pytest.fixture(scope="session")
def tiny_outline_judge(tmp_path_factory):
    """The outline judge variant (clips of random object areas) for one-object smoke clips, trained once per session
    (at 16 x 16 an outline is a few pixels: it takes ~3 000 steps to read them, against ~1 500 for size)."""
    from lightning_tmd.metrics.judge import train_judge

    path = tmp_path_factory.mktemp("outline_judge") / "judge.pt"
    net, accuracy = train_judge(path, frames=4, size=16, max_objects=1, steps=3000, batch_size=32, num_val=256,
                                width=16, num_features=64, variant="outline")
    return path, net, accuracy
