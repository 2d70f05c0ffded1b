"""Checks of a composed config that fail fast, before anything heavy is built.

Each error names the config field and the fix. One setting is filled in here rather than checked: stage 2's
TMD student takes the shape its stage-1 checkpoint was trained with (`check_dmd`).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from lightning_tmd.checkpoints import read_checkpoint
from lightning_tmd.data.shapes import clip_key
from lightning_tmd.nets.wan import META_INIT_NEEDS_PATH
from lightning_tmd.nets.wan_folder import transformer_config
from lightning_tmd.optim import OptimizerSettings


def model_settings(cfg: DictConfig) -> dict:
    """The transformer's config: read from `model.path` when set (no weights loaded), else `model.config`."""
    if OmegaConf.is_missing(cfg.model, "path"):
        raise ValueError(f"model.path is required for model={cfg.model.get('name')}: point it at a local diffusers "
                         "folder with the layout of the official Wan2.1-T2V-*-Diffusers repositories (transformer/, "
                         "vae/, text_encoder/, tokenizer/); weights are never downloaded")
    if cfg.model.get("path"):
        return transformer_config(cfg.model.path)
    return dict(cfg.model.config)


def check_positive(field: str, value: Any, kind: type = int) -> None:
    """`value` (the config field `field`) must be a positive int (kind=int) or a positive finite number."""
    number = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, number) or not (value > 0 and value != float("inf")):
        what = "a positive integer" if kind is int else "a positive number"
        raise ValueError(f"{field}={value!r} must be {what}")


def check_device(field: str, device: str) -> None:
    """A CUDA device needs a visible GPU."""
    if str(device).startswith(("cuda", "gpu")) and not torch.cuda.is_available():
        raise ValueError(f"{field}={device} but no CUDA GPU is visible: use {field}=cpu or run on a GPU machine")


def check_values(cfg: DictConfig) -> None:
    """Types and signs of the settings every stage reads: steps, batch sizes, learning rates, seed, accelerator."""
    if isinstance(cfg.get("seed"), bool) or not isinstance(cfg.get("seed"), int):
        raise ValueError(f"seed={cfg.get('seed')!r} must be an integer")
    check_positive("trainer.max_steps", cfg.trainer.get("max_steps"))
    for key in ("batch_size", "val_batch_size"):
        if cfg.data.get(key) is not None:
            check_positive(f"data.{key}", cfg.data[key])
    module = cfg.stage.module
    for key in ("optim", "student.optim", "critic.optim"):
        settings = OmegaConf.select(module, key)
        if settings is not None:
            OptimizerSettings.resolve({}, OmegaConf.to_container(settings), f"stage.module.{key}")
    for key in ("optim.lr", "student.optim.lr", "critic.optim.lr", "critic.lr_discriminator"):
        value = OmegaConf.select(module, key)
        if value is not None:
            check_positive(f"stage.module.{key}", value, float)
    check_device("trainer.accelerator", cfg.trainer.get("accelerator", "auto"))


LATENT_DATA_MODULES = (".LatentsDataModule", ".LatentTeacherPairsDataModule")


def check_empty_nets(cfg: DictConfig) -> None:
    """model.meta_init: the nets are built empty and read from model.path after sharding, so the weights come from
    model.path, not from a teacher checkpoint (which every rank would read whole)."""
    if not cfg.model.get("meta_init"):
        return
    if not cfg.model.get("path"):
        raise ValueError(META_INIT_NEEDS_PATH)
    for field in ("stage.module.teacher_ckpt", "data.teacher_ckpt"):
        if path := OmegaConf.select(cfg, field):
            raise ValueError(f"{field}={path} with model.meta_init=true: the teacher is read from model.path after "
                             f"sharding; leave {field} null or set model.meta_init=false")


def check_config(cfg: DictConfig) -> None:
    """Config combinations that cannot work: raise before data, models or trainers are built."""
    check_empty_nets(cfg)
    model = model_settings(cfg)  # a Wan config without its weights folder says so before anything else
    check_values(cfg)
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
    if str(cfg.data.get("_target_", "")).endswith(LATENT_DATA_MODULES):
        from lightning_tmd.data.latents import check_latents_fit_model

        check_latents_fit_model(cfg.data.path, model)
    if cfg.get("ckpt_path") and not is_checkpoint(cfg.ckpt_path):
        raise FileNotFoundError(f"ckpt_path: no checkpoint file (or sharded checkpoint folder) at '{cfg.ckpt_path}'")
    stage = cfg.stage.get("name")
    if stage == "teacher":
        check_teacher(cfg)
    elif stage == "tm":
        check_student(cfg, model)
    elif stage == "dmd":
        check_dmd(cfg, model)
    elif stage == "kd":
        check_kd(cfg)


def is_checkpoint(path: str) -> bool:
    """A Lightning checkpoint file, or the folder of a sharded one (strategy=fsdp; it holds meta.pt)."""
    return Path(path).is_file() or (Path(path) / "meta.pt").is_file()


def check_not_sharded(field: str, path: str) -> None:
    if (Path(path) / "meta.pt").is_file():
        raise ValueError(f"{field}: '{path}' is a sharded (strategy=fsdp) checkpoint folder; convert it to one file "
                         f"first: python -m lightning.pytorch.utilities.consolidate_checkpoint {path}")


TRAIN_TEACHER = "python -m lightning_tmd.train stage=teacher experiment=shapes_teacher"


def check_teacher_source(cfg: DictConfig, field: str, path: str | None) -> None:
    """A stage that needs a teacher: `path` (a checkpoint, named by `field`) or model.path; the
    checkpoint must have been trained with this run's model config, text encoder and negative prompt."""
    if not path:
        if not cfg.model.get("path"):
            raise ValueError(f"{field} is null and model.path is unset: this stage needs a teacher. Train one "
                             f"(stage=teacher) and set {field}=<its last.ckpt>, or point model.path at a Wan "
                             "diffusers folder")
        return
    check_matching_checkpoint(cfg, field, path, f"Train the teacher first: {TRAIN_TEACHER}")


def check_matching_checkpoint(cfg: DictConfig, field: str, path: str, hint: str) -> dict:
    """The checkpoint at `path` exists and was trained with this run's model, text encoder, negative
    prompt and (shapes data) clips; returns it (loaded on the CPU)."""
    check_not_sharded(field, path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"{field}: no checkpoint file at '{path}'. {hint}")
    checkpoint = read_checkpoint(field, path)
    trained = checkpoint.get("run_config")
    if trained is not None:
        ours = OmegaConf.to_container(cfg, resolve=True)
        defaults = {"position_frequencies": 0, "prediction": "velocity", "sigma_data": 1.0}
        for group, key in (("model", "config"), ("model", "position_frequencies"), ("model", "prediction"),
                           ("model", "sigma_data"), ("text", "encoder"), ("text", "negative_prompt")):
            theirs, mine = trained[group].get(key), ours[group].get(key)
            if key in defaults:  # runs from before the setting existed have none
                theirs, mine = theirs or defaults[key], mine or defaults[key]
            if key == "encoder":  # an unset option equals its absence (runs from before it existed)
                theirs, mine = without_nulls(theirs), without_nulls(mine)
            if theirs != mine:
                raise ValueError(f"{group}.{key}: {mine} differs from the one {field} was trained with "
                                 f"({theirs}); use that checkpoint's {group}")
        check_same_clips(field, trained.get("data", {}), ours["data"])
    return checkpoint


def without_nulls(config: Any) -> Any:
    """A config dict without its null entries."""
    return {k: v for k, v in config.items() if v is not None} if isinstance(config, dict) else config


def check_same_clips(field: str, trained: dict, ours: dict) -> None:
    """Shapes clips (frames, size, objects, speed) must match those the checkpoint at `field` learnt."""
    keys = ("frames", "size", "max_objects")
    if not all(k in trained and k in ours for k in keys):
        return  # latents or other data: their own checks apply
    theirs, mine = clip_key(trained), clip_key(ours)
    for key in theirs:
        if theirs[key] != mine[key]:
            raise ValueError(f"data.{key}={mine[key]} but {field} was trained on clips with {key}={theirs[key]}: "
                             f"set data.{key}={theirs[key]} or use a checkpoint trained on these clips")


def check_head_blocks(head_blocks: int, blocks: int, field: str) -> None:
    if not 1 <= head_blocks < blocks:
        raise ValueError(f"{field}={head_blocks} must be in 1..{blocks - 1} (the teacher has {blocks} blocks)")


def check_teacher(cfg: DictConfig) -> None:
    """The share and range of the high-noise training times and the optimizer (a key the config lacks takes the
    module's default)."""
    from lightning_tmd.modules.teacher import TeacherModule

    defaults = inspect.signature(TeacherModule).parameters
    module = cfg.stage.module
    fraction, low = (module.get(key, defaults[key].default) for key in ("high_noise_fraction", "high_noise_min"))
    if not 0 <= fraction <= 1:
        raise ValueError(f"stage.module.high_noise_fraction={fraction}: give a share of the training times in [0, 1]")
    if not 0 <= low < 0.999:
        raise ValueError(f"stage.module.high_noise_min={low}: the high-noise times are drawn from "
                         "U(high_noise_min, 0.999); give a value in [0, 0.999)")
    # the name itself was checked with the rest of stage.module.optim (check_values)
    optimizer = OmegaConf.select(module, "optim.name", default=None) or OptimizerSettings.name
    if optimizer == "muon" and "FSDP" in str(OmegaConf.select(cfg, "trainer.strategy._target_", default="")):
        raise ValueError("stage.module.optim.name=muon orthogonalises whole weight matrices, which FSDP2 shards: "
                         "use strategy=ddp, or stage.module.optim.name=adamw with strategy=fsdp")


def check_student(cfg: DictConfig, model: dict) -> None:
    """Stage 1 needs a teacher (a checkpoint or model.path) and a head shorter than the teacher."""
    module = cfg.stage.module
    check_head_blocks(module.head_blocks, model["num_layers"], "stage.module.head_blocks")
    check_teacher_source(cfg, "stage.module.teacher_ckpt", module.get("teacher_ckpt"))


STUDENT_ARCHITECTURE = ("head_blocks", "fusion", "inner_target", "outer_steps", "inner_steps", "outer_shift",
                        "inner_shift")


def check_dmd(cfg: DictConfig, model: dict) -> None:
    """Stage 2: a teacher, discriminator blocks inside the teacher, and a student checkpoint of the
    configured kind. A TMD student's shape (H, fusion, inner target, M, N, grid shifts) comes from its
    stage-1 checkpoint: settings left null are filled in from it (from the stage-1 defaults without one),
    and a setting given explicitly must equal it (stage 1 is specific to its grids, docs/method.md Q5)."""
    module, blocks = cfg.stage.module, model["num_layers"]
    check_teacher_source(cfg, "stage.module.teacher_ckpt", module.get("teacher_ckpt"))
    bad = [b for b in module.critic.discriminator.blocks if not 1 <= b <= blocks]
    if bad:
        raise ValueError(f"stage.module.critic.discriminator.blocks {bad} are outside the teacher's blocks "
                         f"1..{blocks}")
    student = module.student
    from lightning_tmd.modules.dmd import STUDENTS
    from lightning_tmd.modules.student import StudentModule

    if student.kind not in STUDENTS:
        raise ValueError(f"stage.module.student.kind '{student.kind}' is unknown: use one of {tuple(STUDENTS)}")
    extra = sorted(set(student) - set(inspect.signature(STUDENTS[student.kind].__init__).parameters) - {"kind"})
    if extra:
        raise ValueError(f"stage.module.student: {extra} do not apply to the {student.kind} student; remove them "
                         f"(~stage.module.student.{extra[0]})")
    path = module.get("student_ckpt")
    trained = trained_student_settings(cfg, student.kind, path) if path else None
    if student.kind == "tmd":
        defaults = inspect.signature(StudentModule.__init__).parameters
        stage1_defaults = {key: defaults[key].default for key in STUDENT_ARCHITECTURE}
        inherit_student_shape(student, stage1_defaults if trained is None else trained)
        check_head_blocks(student.head_blocks, blocks, "stage.module.student.head_blocks")
        for key in STUDENT_ARCHITECTURE:
            if trained is not None and trained[key] != student[key]:
                raise ValueError(f"stage.module.student.{key}={student[key]} but stage.module.student_ckpt was "
                                 f"trained with {key}={trained[key]}: leave it null to take {trained[key]}, or "
                                 "train stage 1 with these settings")


def trained_student_settings(cfg: DictConfig, kind: str, path: str) -> dict:
    """The hyper-parameters of the student in stage 2's `student_ckpt`, which must hold a `kind` student
    trained with this run's model, text and clips."""
    hint = ("Train stage 1 first: python -m lightning_tmd.train stage=tm experiment=shapes_tmd_stage1"
            if kind == "tmd" else "Train the KD warm-up first: python -m lightning_tmd.train "
            "stage=kd experiment=shapes_kd")
    checkpoint = check_matching_checkpoint(cfg, "stage.module.student_ckpt", path, hint)
    trained_stage = checkpoint.get("run_config", {}).get("stage", {}).get("name")
    if trained_stage == "teacher" and kind == "tmd":  # a one-pass student may start from the teacher
        raise ValueError(f"stage.module.student_ckpt holds a teacher (stage=teacher), not a student. {hint}, and "
                         "pass the teacher as stage.module.teacher_ckpt")
    trained = checkpoint["hyper_parameters"]
    trained = trained.get("student", trained)  # a stage-2 checkpoint holds its student's settings
    trained_kind = "tmd" if "head_blocks" in trained else "one_pass"
    if trained_kind != kind:
        raise ValueError(f"stage.module.student_ckpt holds a {trained_kind} student but stage.module.student.kind "
                         f"is {kind}: choose stage/student@stage.module.student={trained_kind} or another "
                         "checkpoint")
    return dict(trained)


def inherit_student_shape(student: DictConfig, source: dict) -> None:
    """Fill the TMD student's shape settings that are null or absent from `source` (a stage-1 checkpoint's
    hyper-parameters, or the stage-1 defaults)."""
    with open_dict(student):
        for key in STUDENT_ARCHITECTURE:
            if student.get(key) is None:
                student[key] = source[key]


def check_kd(cfg: DictConfig) -> None:
    """KD warm-up: a teacher for the pairs (a checkpoint, or model.path's Wan for pairs on latents), and the
    one-step map only."""
    if cfg.stage.module.outer_steps != 1:
        raise ValueError(f"stage.module.outer_steps={cfg.stage.module.outer_steps}: the KD warm-up trains the "
                         "one-step map (noise at t_max -> clip); set it to 1")
    path = cfg.data.get("teacher_ckpt")
    if str(cfg.data.get("_target_", "")).endswith(".LatentTeacherPairsDataModule"):
        check_teacher_source(cfg, "data.teacher_ckpt", path)
        return
    if not path:
        raise ValueError("data.teacher_ckpt is unset: the KD pairs need a teacher checkpoint (data=teacher_pairs)")
    check_matching_checkpoint(cfg, "data.teacher_ckpt", path, f"Train the teacher first: {TRAIN_TEACHER}")


def check_text_width(text_dim: int, cfg: DictConfig) -> None:
    """The text encoder's width must equal the transformer's `text_dim`."""
    expected = model_settings(cfg)["text_dim"]
    if text_dim != expected:
        raise ValueError(
            f"text encoder width {text_dim} != model text_dim {expected} (model.config.text_dim): "
            "pick a text encoder of that width or set model.config.text_dim to match"
        )
