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
