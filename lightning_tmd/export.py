"""Export a distilled student as a diffusers folder that `TMDPipeline.from_pretrained` loads and samples
without Lightning or Hydra (the folder layout is described in `lightning_tmd.diffusers_pipeline`).

    python -m lightning_tmd.export ckpt=runs/shapes_tmd/<run>/checkpoints/last.ckpt out=exports/shapes_tmd
    python -m lightning_tmd.export ckpt=... out=... dtype=bfloat16 text_encoder=false overwrite=true

Any student checkpoint exports: stage 1 (StudentModule), stage 2 (DMDModule, with a TMD or a DMD2-v
student) and the KD warm-up (OnePassStudent). The weights are the student's sampling weights: its EMA
when the run kept one. The run's text encoder (vocabulary settings, or a transformers encoder saved
whole), the negative prompt's embedding and, for latent-space students, the VAE go with it.
"""

from __future__ import annotations

import inspect
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from diffusers import AutoencoderKLWan
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_tmd.app import CONFIG_DIR, describe
from lightning_tmd.checkpoints import sampling_weights
from lightning_tmd.diffusers_pipeline import RUN_CONFIG_FILE, TMDPipeline, TMDStudentModel
from lightning_tmd.generators import clip_shape, run_config
from lightning_tmd.modules.dmd import STUDENTS, DMDModule, student_settings
from lightning_tmd.modules.one_pass import OnePassStudent
from lightning_tmd.modules.student import StudentModule
from lightning_tmd.nets.codec import resolve_vae_folder
from lightning_tmd.nets.text import PretrainedTextEncoder, PromptEncoder, VocabTextEncoder
from lightning_tmd.nets.wan_folder import transformer_config

DTYPES = ("float32", "bfloat16")
TMD_SETTINGS = ("head_blocks", "inner_steps", "inner_shift", "fusion", "inner_target", "clean_estimate")


@dataclass
class StudentCheckpoint:
    """What export needs from a student checkpoint."""

    kind: str  # "tmd" | "one_pass"
    settings: dict[str, Any]  # the student module's arguments, defaults filled in
    weights: dict[str, torch.Tensor]  # its sampling net's weights (EMA when kept)
    config: dict[str, Any]  # the run's resolved config


@dataclass
class ExportedText:
    """How the run embedded prompts, the negative prompt's embedding (S, D) and the encoder to ship."""

    settings: dict[str, Any]
    negative: torch.Tensor
    text_encoder: Any = None
    tokenizer: Any = None


def argument_defaults(module_class: type) -> dict[str, Any]:
    """The default values of a module's constructor arguments."""
    parameters = inspect.signature(module_class.__init__).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def read_student(path: Path) -> StudentCheckpoint:
    """The student of a stage-1, stage-2 or KD checkpoint; ValueError for any other checkpoint."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    config = run_config(checkpoint, path)
    target = config["stage"]["module"]["_target_"]
    module_class = get_class(target)
    hparams = dict(checkpoint["hyper_parameters"])
    if issubclass(module_class, DMDModule):
        kind, args = student_settings(hparams["student"])
        owner = "student."
        args["model"] = hparams["model"]
    elif issubclass(module_class, StudentModule):
        kind, args, owner = "tmd", hparams, ""
    elif issubclass(module_class, OnePassStudent):
        kind, args, owner = "one_pass", hparams, ""
    else:
        raise ValueError(
            f"ckpt: '{path}' holds a {module_class.__name__}, not a student: export a student checkpoint, of stage 1 "
            "(stage=tm, StudentModule), stage 2 (stage=dmd, DMDModule) or the KD warm-up (stage=kd, OnePassStudent)"
        )
    weights = sampling_weights(checkpoint["state_dict"], owner)
    if not weights:
        raise ValueError(f"ckpt: '{path}' holds no weights under '{owner}net.' or '{owner}ema.module.'")
    return StudentCheckpoint(kind, {**argument_defaults(STUDENTS[kind]), **args}, weights, config)


def transformer_kwargs(model: dict[str, Any]) -> dict[str, Any]:
    """The `WanTransformer3DModel` arguments of the run's model group (read from model.path when set)."""
    if model.get("path"):
        return {k: v for k, v in transformer_config(model["path"]).items() if not k.startswith("_")}
    return dict(model["config"])


def student_model_config(student: StudentCheckpoint, transformer: dict[str, Any],
                         text: ExportedText) -> dict[str, Any]:
    """The `TMDStudentModel` arguments: architecture, sampler defaults, clip shape and text settings."""
    s = student.settings
    config = {"kind": student.kind, "transformer": transformer,
              "sample_shape": list(clip_shape(student.config, transformer["out_channels"])),
              "position_frequencies": int(student.settings["model"].get("position_frequencies") or 0),
              "prediction": student.settings["model"].get("prediction") or "velocity",
              "sigma_data": float(student.settings["model"].get("sigma_data") or 1.0),
              "text": text.settings, "negative_prompt_shape": list(text.negative.shape),
              "outer_steps": s["outer_steps"], "outer_shift": s["outer_shift"], "t_max": s["t_max"]}
    if student.kind == "tmd":
        config.update({name: s[name] for name in TMD_SETTINGS})
    return config


def export_text(text: dict[str, Any], ship_encoder: bool) -> ExportedText:
    """Instantiate the run's text encoder; embed the negative prompt with it."""
    encoder = instantiate(text["encoder"])
    prompts = PromptEncoder(encoder, text.get("negative_prompt"))
    negative = prompts.negative(1).states[0].float().clone()
    settings = {"dim": encoder.dim, "max_length": encoder.max_length, "negative_prompt": prompts.negative_prompt}
    if isinstance(encoder, VocabTextEncoder):
        return ExportedText({"kind": "vocab", "seed": encoder.seed, **settings}, negative)
    if isinstance(encoder, PretrainedTextEncoder):
        parts = (encoder.model, encoder.tokenizer) if ship_encoder else (None, None)
        return ExportedText({"kind": "transformers", "hidden_layer": encoder.hidden_layer, **settings}, negative,
                            *parts)
    return ExportedText({"kind": "embeddings", **settings}, negative)


def vae_folder(option: str | None, config: dict[str, Any], channels: int) -> Path | None:
    """The VAE to ship: `vae=`, else the run's data.vae_path, else <model.path>/vae when it exists. Its
    latent channels must be the student's."""
    data_vae, model_path = config.get("data", {}).get("vae_path"), config.get("model", {}).get("path")
    if option:
        field, folder = "vae", resolve_vae_folder(option, "vae")
    elif data_vae:
        field, folder = "data.vae_path", resolve_vae_folder(data_vae, "data.vae_path")
    elif model_path and (Path(model_path) / "vae").is_dir():
        field, folder = "model.path", resolve_vae_folder(model_path, "model.path")
    else:
        return None
    z_dim = json.loads((folder / "config.json").read_text()).get("z_dim")
    if z_dim != channels:
        raise ValueError(f"{field}: the VAE in '{folder}' has {z_dim} latent channels but the student samples "
                         f"{channels} channels: give the VAE the run's latents came from")
    return folder


def cast_weights(state: dict[str, torch.Tensor], dtype: torch.dtype, keep: list[str]) -> dict[str, torch.Tensor]:
    """Floating tensors to `dtype`, except those of modules in `keep` (they stay float32)."""
    def target(name: str) -> torch.dtype:
        return torch.float32 if any(m in name.split(".") for m in keep) else dtype

    return {k: v.to(target(k)) if v.is_floating_point() else v for k, v in state.items()}


def build_student_model(config: dict[str, Any], weights: dict[str, torch.Tensor], negative: torch.Tensor,
                        dtype: torch.dtype) -> TMDStudentModel:
    """The student with the exported weights (built on the meta device: no random initialisation)."""
    with torch.device("meta"):
        model = TMDStudentModel(**config)
    state = {**{f"net.{k}": v for k, v in weights.items()}, "negative_prompt_embeds": negative}
    model.load_state_dict(cast_weights(state, dtype, model._keep_in_fp32_modules), strict=True, assign=True)
    return model.eval()


def check_out_folder(out: Path, overwrite: bool) -> None:
    """`out` must be missing, empty or, with overwrite=true, an earlier export (it holds model_index.json): never
    another folder (a training run, the working directory), which overwrite would delete."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out: '{out}' is a file: choose a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / "model_index.json").is_file():
        kind = "a training run" if (out / "checkpoints").is_dir() else "no earlier export"
        raise FileExistsError(
            f"out: '{out}' holds {describe(sorted(out.iterdir()), out)} but no model_index.json: it looks like {kind}, "
            "and overwrite=true only replaces an earlier export: choose another out (a new or empty folder)")
    if not overwrite:
        raise FileExistsError(f"out: '{out}' holds an earlier export: choose another folder or pass overwrite=true "
                              "to replace it")


def export(cfg: DictConfig) -> Path:
    """Write the export folder `cfg.out` from the student checkpoint `cfg.ckpt`; returns the folder."""
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype={cfg.dtype!r}: use one of {DTYPES}")
    ckpt, out = Path(cfg.ckpt), Path(cfg.out)
    if ckpt.is_dir():
        raise FileNotFoundError(f"ckpt: '{ckpt}' is a folder (a sharded checkpoint?): consolidate it into one file "
                                "first (python -m lightning.pytorch.utilities.consolidate_checkpoint <folder>)")
    if not ckpt.is_file():
        raise FileNotFoundError(f"ckpt: no checkpoint file at '{ckpt}'")
    check_out_folder(out, cfg.overwrite)
    student = read_student(ckpt)
    transformer = transformer_kwargs(student.settings["model"])
    vae_path = vae_folder(cfg.get("vae"), student.config, transformer["out_channels"])
    text = export_text(student.config["text"], cfg.text_encoder)
    config = student_model_config(student, transformer, text)
    model = build_student_model(config, student.weights, text.negative, getattr(torch, cfg.dtype))
    vae = AutoencoderKLWan.from_pretrained(vae_path, local_files_only=True) if vae_path else None
    pipe = TMDPipeline(student=model, text_encoder=text.text_encoder, tokenizer=text.tokenizer, vae=vae)

    partial = out.with_name(f".{out.name}.partial")  # a failed export leaves `out` as it was
    shutil.rmtree(partial, ignore_errors=True)
    pipe.save_pretrained(partial)
    OmegaConf.save(OmegaConf.create(student.config), partial / RUN_CONFIG_FILE)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    steps = f"M={config['outer_steps']}" + (f", N={config['inner_steps']}" if student.kind == "tmd" else "")
    parts = [name for name, part in (("text encoder", text.text_encoder), ("VAE", vae)) if part is not None]
    print(f"exported the {student.kind} student ({steps}, {cfg.dtype}{''.join(', ' + p for p in parts)}) to {out}")
    return out


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="export")
def main(cfg: DictConfig) -> None:
    export(cfg)


if __name__ == "__main__":
    main()
