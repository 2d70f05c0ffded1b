"""Load a trained generator with what it needs to sample: its prompt encoder and clip shape. From any
stage's Lightning checkpoint (rebuilt from the run config stored in it), or from a folder written by
`python -m lightning_tmd.export` (a `TMDPipeline`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf
from torch.optim.swa_utils import AveragedModel

from lightning_tmd.checkpoints import read_checkpoint
from lightning_tmd.nets.text import PromptEncoder, TextEmbedding, TextEncoder
from lightning_tmd.parallel import first_nonfinite


@dataclass
class LoadedGenerator:
    module: Any  # a LightningModule, or a TMDPipeline; both have `sample(context, negative_context, noise=...)`
    prompts: PromptEncoder
    clip_shape: tuple[int, ...]
    config: dict[str, Any]
    path: Path
    ema: bool = True  # sampling with the EMA weights (False: the raw training weights)


def load_module(module_class: type, path: str | Path, checkpoint: dict, device: str | torch.device = "cpu") -> Any:
    """`module_class.load_from_checkpoint(path)` (`checkpoint`: its contents, already read) with the constructor
    arguments of an earlier layout upgraded (`upgrade_hparams`), and the nets built whole: a run trained with
    model.meta_init takes its weights from the checkpoint, not from model.path."""
    hparams = checkpoint["hyper_parameters"]
    upgrade = getattr(module_class, "upgrade_hparams", None)
    overrides = upgrade(hparams) if upgrade else {}
    model = hparams.get("model") or {}
    if model.get("meta_init"):
        overrides["model"] = {**model, "meta_init": False}
    return module_class.load_from_checkpoint(path, map_location=device, **overrides)


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


def clip_shape(config: dict[str, Any], channels: int) -> tuple[int, ...]:
    """(C, T, H, W) of the run's training clips: shapes data (frames, size), or latent shards
    (data.expected_latent_shape, else the shape in the shards' meta.json)."""
    data = config["data"]
    if "frames" in data and "size" in data:
        return channels, data["frames"], data["size"], data["size"]
    if data.get("expected_latent_shape"):
        return tuple(data["expected_latent_shape"])
    if data.get("path"):
        from lightning_tmd.data.latents import read_meta

        return tuple(read_meta(data["path"])["latent_shape"])
    raise ValueError("the run config's data group gives no clip shape (frames and size, or a latents folder)")


def load_generator(path: str | Path, device: str | torch.device = "cpu", ema: bool = True) -> LoadedGenerator:
    """Module (eval mode), prompt encoder and clip shape from a Lightning checkpoint or an exported folder.
    `ema=False` samples a checkpoint's raw training weights instead of their EMA."""
    path = Path(path)
    if path.is_dir():
        if not ema:
            raise ValueError(f"ema=false: the exported folder '{path}' holds only its sampling weights; give the "
                             "Lightning checkpoint to sample the raw training weights")
        return load_exported(path, device)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt: no checkpoint file or exported folder at '{path}'")
    checkpoint = read_checkpoint("ckpt", path)
    bad = first_nonfinite(checkpoint["state_dict"])
    if bad is not None:
        raise ValueError(f"ckpt: '{path}' holds non-finite weights ({bad}; a diverged run): sample an earlier "
                         "checkpoint of that run (its checkpoints/step_*.ckpt)")
    config = run_config(checkpoint, path)
    module = load_module(get_class(config["stage"]["module"]["_target_"]), path, checkpoint, device).eval()
    if not ema:
        drop_ema(module)
    text = config["text"]
    prompts = PromptEncoder(instantiate(text["encoder"]), text["negative_prompt"])
    return LoadedGenerator(module, prompts, clip_shape(config, module.net.config.out_channels), config, path, ema)


def drop_ema(module: torch.nn.Module) -> None:
    """Remove every EMA copy in `module`, so that it samples with its raw training weights."""
    for owner in [m for m in module.modules() if isinstance(getattr(m, "ema", None), AveragedModel)]:
        owner.ema = None


class PipelineTextEncoder(TextEncoder):
    """The prompt embedding of an exported pipeline behind the project's `TextEncoder` interface."""

    def __init__(self, pipe: Any) -> None:
        super().__init__()
        text = pipe.student.config.text
        self.pipe, self.dim, self.max_length = pipe, text["dim"], text["max_length"]

    def forward(self, captions: list[str]) -> TextEmbedding:
        return self.pipe.embed_prompts(captions)


def load_exported(path: Path, device: str | torch.device = "cpu") -> LoadedGenerator:
    """A folder written by `lightning_tmd.export`: its `TMDPipeline` (VAE-decoded clips when it has a
    VAE), the prompt encoder of its text encoder and the training clips' shape."""
    from lightning_tmd.diffusers_pipeline import RUN_CONFIG_FILE, TMDPipeline

    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"ckpt: the folder '{path}' has no model_index.json: give a Lightning checkpoint "
                                "file or a folder written by `python -m lightning_tmd.export`")
    pipe = TMDPipeline.from_pretrained(path).to(device)
    pipe.set_progress_bar_config(disable=True)
    if not pipe.has_text_encoder:
        raise ValueError(f"ckpt: the exported folder '{path}' has no text encoder to embed prompts with: export "
                         "it again with text_encoder=true")
    prompts = PromptEncoder(PipelineTextEncoder(pipe), pipe.negative_prompt)
    run_file = path / RUN_CONFIG_FILE
    config = OmegaConf.to_container(OmegaConf.load(run_file)) if run_file.is_file() else {}
    return LoadedGenerator(pipe, prompts, tuple(pipe.student.config.sample_shape), config, path)
