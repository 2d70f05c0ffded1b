"""Wan diffusers folders: find a component's folder (transformer/, vae/), check its weights, read its config."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin",
)


def resolve_component_folder(path: str | Path, subfolder: str, field: str, component: str) -> Path:
    """The folder holding a diffusers component's config.json and weights: `path` itself, or its
    `subfolder` when `path` is the root of a `Wan2.1-T2V-*-Diffusers` repository (transformer/, vae/).
    Raises FileNotFoundError naming `field` and what is missing."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"{field}: the folder '{root}' does not exist. Point {field} at a local diffusers folder (a "
            f"Wan2.1-T2V-*-Diffusers repository or its {subfolder}/ subfolder)."
        )
    folder = root / subfolder if (root / subfolder).is_dir() else root
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{field}: '{folder}' has no config.json (expected a diffusers {component} folder, "
                                f"or a Wan diffusers folder holding {subfolder}/)")
    weights = [name for name in WEIGHT_FILES if (folder / name).is_file()]
    if not weights:
        raise FileNotFoundError(f"{field}: '{folder}' has no {component} weights: expected one of "
                                f"{', '.join(WEIGHT_FILES)}")
    if weights[0].endswith(".index.json"):
        index = json.loads((folder / weights[0]).read_text())
        missing = sorted({f for f in index["weight_map"].values() if not (folder / f).is_file()})
        if missing:
            raise FileNotFoundError(f"{field}: '{folder}' is incomplete, missing shard(s): {', '.join(missing)}")
    return folder


def resolve_transformer_folder(path: str | Path) -> Path:
    """`model.path` (a Wan diffusers repository or its transformer/ folder) -> the transformer's folder."""
    return resolve_component_folder(path, "transformer", "model.path", "transformer")


def transformer_config(path: str | Path) -> dict[str, Any]:
    """Read a diffusers transformer config.json without loading weights."""
    return json.loads((resolve_transformer_folder(path) / "config.json").read_text())


def folder_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The weights of a resolved transformer folder one tensor at a time (safetensors, single file or shards), so
    that a reader holds at most one full tensor; `.bin` folders are refused (they load whole)."""
    index = folder / WEIGHT_FILES[1]
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
             else [WEIGHT_FILES[0]] if (folder / WEIGHT_FILES[0]).is_file() else [])
    if not files:
        raise FileNotFoundError(f"model.meta_init: '{folder}' has no safetensors weights ({WEIGHT_FILES[0]} or its "
                                "index); convert the .bin weights to safetensors or set model.meta_init=false")
    for name in files:
        with safe_open(folder / name, framework="pt") as weights:
            for key in weights.keys():
                yield key, weights.get_tensor(key)
