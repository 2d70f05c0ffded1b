"""Checks of a composed config that fail fast, before anything heavy is built.

Each error names the config field and the fix.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from lightning_tmd.nets.wan import transformer_config


def model_settings(cfg: DictConfig) -> dict:
    """The transformer's config: read from `model.path` when set (no weights loaded), else `model.config`."""
    if cfg.model.get("path"):
        return transformer_config(cfg.model.path)
    return dict(cfg.model.config)


def check_config(cfg: DictConfig) -> None:
    """Config combinations that cannot work: raise before data, models or trainers are built."""
    model = model_settings(cfg)
    pt, ph, pw = model["patch_size"]
    frames, size = cfg.data.get("frames"), cfg.data.get("size")
    if size is not None and (size % ph or size % pw):
        raise ValueError(
            f"data.size={size} is not divisible by the patch size {ph}x{pw} (model.config.patch_size): "
            f"choose a clip size that is a multiple of {max(ph, pw)}"
        )
    if frames is not None and frames % pt:
        raise ValueError(f"data.frames={frames} is not divisible by the temporal patch size {pt}")
    if cfg.text.get("negative_prompt") is None:
        raise ValueError(
            "text.negative_prompt is missing: set it (Wan's official negative prompt for Wan configs, "
            "'' for the shapes benchmark)"
        )
    if cfg.get("ckpt_path") and not Path(cfg.ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path: no checkpoint file at '{cfg.ckpt_path}'")
    if cfg.stage.get("name") == "tm":
        check_student(cfg, model)


def check_student(cfg: DictConfig, model: dict) -> None:
    """Stage 1 needs a teacher (a checkpoint or model.path), a head shorter than the teacher, and a
    teacher checkpoint trained with the same model and text encoder as this run."""
    module = cfg.stage.module
    blocks = model["num_layers"]
    if not 1 <= module.head_blocks < blocks:
        raise ValueError(f"stage.module.head_blocks={module.head_blocks} must be in 1..{blocks - 1} "
                         f"(the teacher has {blocks} blocks)")
    teacher = module.get("teacher_ckpt")
    if not teacher:
        if not cfg.model.get("path"):
            raise ValueError("stage.module.teacher_ckpt is null and model.path is unset: the student needs a "
                             "teacher. Train one (stage=teacher) and set stage.module.teacher_ckpt=<its last.ckpt>, "
                             "or point model.path at a Wan diffusers folder")
        return
    if not Path(teacher).is_file():
        raise FileNotFoundError(f"stage.module.teacher_ckpt: no checkpoint file at '{teacher}'. Train the teacher "
                                "first: python -m lightning_tmd.train stage=teacher experiment=shapes_teacher")
    trained = torch.load(teacher, map_location="cpu", weights_only=False).get("run_config")
    if trained is None:
        return
    ours = OmegaConf.to_container(cfg, resolve=True)
    for group, field in (("model", "config"), ("text", "encoder"), ("text", "negative_prompt")):
        theirs, mine = trained[group].get(field), ours[group].get(field)
        if theirs != mine:
            raise ValueError(f"{group}.{field}: {mine} differs from the teacher's ({theirs}) in "
                             f"stage.module.teacher_ckpt; the student must use the teacher's {group}")


def check_text_width(text_dim: int, cfg: DictConfig) -> None:
    """The text encoder's width must equal the transformer's `text_dim`."""
    expected = model_settings(cfg)["text_dim"]
    if text_dim != expected:
        raise ValueError(
            f"text encoder width {text_dim} != model text_dim {expected} (model.config.text_dim): "
            "pick a text encoder of that width or set model.config.text_dim to match"
        )
