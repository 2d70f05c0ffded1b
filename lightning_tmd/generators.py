"""Load a trained generator (any stage's checkpoint) with what it needs to sample: its prompt
encoder and clip shape, rebuilt from the run config stored in the checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from lightning_tmd.nets.text import PromptEncoder


@dataclass
class LoadedGenerator:
    module: L.LightningModule
    prompts: PromptEncoder
    clip_shape: tuple[int, ...]
    config: dict[str, Any]
    path: Path


def run_config(checkpoint: dict, path: Path) -> dict[str, Any]:
    """The resolved run config: stored in the checkpoint, else the run folder's `.hydra/config.yaml`."""
    if "run_config" in checkpoint:
        return checkpoint["run_config"]
    hydra_file = path.resolve().parent.parent / ".hydra" / "config.yaml"
    if not hydra_file.is_file():
        raise FileNotFoundError(f"ckpt: '{path}' holds no run config and no {hydra_file} exists beside it")
    cfg = OmegaConf.load(hydra_file)
    cfg.output_dir = str(hydra_file.parent.parent)
    return OmegaConf.to_container(cfg, resolve=True)


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> LoadedGenerator:
    """Module (eval mode), prompt encoder and clip shape from a Lightning checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt: no checkpoint file at '{path}'")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    config = run_config(checkpoint, path)
    module_class = get_class(config["stage"]["module"]["_target_"])
    module = module_class.load_from_checkpoint(path, map_location=device).eval()
    text = config["text"]
    prompts = PromptEncoder(instantiate(text["encoder"]), text["negative_prompt"])
    data = config["data"]
    channels = module.net.config.in_channels
    clip_shape = (channels, data["frames"], data["size"], data["size"])
    return LoadedGenerator(module, prompts, clip_shape, config, path)
