"""Sample videos from a checkpoint or an exported folder: a GIF/MP4 per prompt, one grid image, and `samples.pt`.

    python -m lightning_tmd.sample ckpt=runs/shapes_teacher/main/checkpoints/last.ckpt seeds='[0,1,2,3]'
    python -m lightning_tmd.sample ckpt=exports/shapes_tmd +sampler.outer_steps=2 +sampler.inner_steps=4

`samples.pt` holds {"videos": uint8 (N, T, H, W, C), "prompts", "seeds", "sampler", "nfe", "ckpt"}.
A folder that holds an earlier run's samples is refused, unless overwrite=true: then those are removed first.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import hydra
import imageio.v2 as imageio
import torch
from omegaconf import DictConfig, OmegaConf

from lightning_tmd.app import CONFIG_DIR, check_earlier_outputs, remove_paths
from lightning_tmd.checks import check_device, check_positive
from lightning_tmd.generators import load_generator
from lightning_tmd.sampling import sample_clips
from lightning_tmd.video import save_video, to_uint8, video_grid


def read_prompts(cfg: DictConfig) -> list[str]:
    if cfg.get("prompts_file"):
        path = Path(cfg.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts_file: no file at '{path}'")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        prompts = list(cfg.prompts or [])
    if not prompts:
        raise ValueError("prompts: give at least one prompt (prompts=[...] or prompts_file=...)")
    return prompts


def slug(text: str, limit: int = 60) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:limit]


VIDEO_FILE = re.compile(r"\d{3,}_[a-z0-9_]*\.(gif|mp4)")  # <prompt index>_<slug(prompt)>.<format>


def earlier_samples(folder: Path) -> list[Path]:
    """What an earlier sample run wrote in `folder`: samples.pt, grid.png and its videos (other files are not)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name in ("samples.pt", "grid.png") or VIDEO_FILE.fullmatch(p.name))


def sample(cfg: DictConfig) -> dict[str, Any]:
    """Generate every (prompt, seed) pair, write the files, return the `samples.pt` content."""
    if cfg.format not in ("gif", "mp4"):
        raise ValueError(f"format={cfg.format!r}: use gif or mp4")
    for key in ("fps", "batch_size", "scale"):
        check_positive(key, cfg[key])
    check_device("device", cfg.device)
    out = Path(cfg.out_dir)
    check_earlier_outputs(out, earlier_samples(out), cfg.get("overwrite", False), "samples")
    prompts, seeds = read_prompts(cfg), [int(s) for s in cfg.seeds]
    loaded = load_generator(cfg.ckpt, cfg.device, ema=cfg.get("ema", True))
    pairs = [(p, s) for p in prompts for s in seeds]
    sampler = OmegaConf.to_container(cfg.sampler, resolve=True)
    clips, nfe = sample_clips(loaded.module, loaded.prompts, [p for p, _ in pairs], [s for _, s in pairs],
                              loaded.clip_shape, batch_size=cfg.batch_size, progress=True, **sampler)
    frames = to_uint8(clips)  # (N, T, H, W, C)
    remove_paths(earlier_samples(out))  # overwrite=true: no old video stays beside the new ones
    for i, prompt in enumerate(prompts):
        rows = frames[i * len(seeds) : (i + 1) * len(seeds)]
        save_video(video_grid(rows, columns=len(seeds), scale=cfg.scale), out / f"{i:03d}_{slug(prompt)}.{cfg.format}",
                   fps=cfg.fps)
    # one picture: a row per clip, its frames left to right
    strip = frames.permute(0, 2, 1, 3, 4).flatten(2, 3)  # (N, H, T*W, C)
    imageio.imwrite(out / "grid.png", video_grid(strip[:, None], columns=1, scale=cfg.scale)[0])
    result = {"videos": frames, "prompts": [p for p, _ in pairs], "seeds": [s for _, s in pairs],
              "sampler": sampler, "nfe": nfe, "ckpt": str(cfg.ckpt)}
    torch.save(result, out / "samples.pt")
    print(f"wrote {len(pairs)} clips (NFE {nfe}) to {out}")
    return result


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="sample")
def main(cfg: DictConfig) -> None:
    sample(cfg)


if __name__ == "__main__":
    main()
