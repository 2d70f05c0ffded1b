"""Video tensors to pictures: uint8 conversion, grids, GIF/MP4 files."""

from __future__ import annotations

from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import torch


def to_uint8(videos: torch.Tensor) -> torch.Tensor:
    """(N, C, T, H, W) in [-1, 1] -> (N, T, H, W, C) uint8."""
    return ((videos.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)


def video_grid(frames: torch.Tensor, columns: int | None = None, pad: int = 1, scale: int = 1) -> np.ndarray:
    """(N, T, H, W, C) uint8 -> (T, rows*(H+pad)+pad, cols*(W+pad)+pad, C) uint8, nearest upscaled."""
    n, t, h, w, c = frames.shape
    columns = columns or min(n, 8)
    rows = -(-n // columns)
    frames = frames.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    h, w = h * scale, w * scale
    grid = torch.full((t, rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, columns)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top : top + h, left : left + w] = frames[i]
    return grid.numpy()


def save_video(frames: np.ndarray, path: str | Path, fps: int = 8) -> Path:
    """Write (T, H, W, C) uint8 frames as a looping GIF or an MP4 (by the suffix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gif":
        imageio.mimsave(path, list(frames), duration=1000 / fps, loop=0)
    elif path.suffix == ".mp4":
        imageio.mimsave(path, list(frames), fps=fps, macro_block_size=1)
    else:
        raise ValueError(f"unknown video suffix '{path.suffix}': use .gif or .mp4")
    return path


def labelled_rows(rows: list[tuple[str, torch.Tensor]], scale: int = 4, pad: int = 2,
                  label_width: int = 150) -> np.ndarray:
    """Side-by-side comparison: one row per (label, frames (N, T, H, W, C) uint8), the label written on the
    left, the N clips to its right (the same prompts and seeds in every row). Returns (T, height, width, C)."""
    from PIL import Image, ImageDraw, ImageFont

    grids = [video_grid(frames, columns=len(frames), pad=pad, scale=scale) for _, frames in rows]
    t, h, w, c = grids[0].shape
    font = ImageFont.load_default()
    labels = []
    for label, _ in rows:
        picture = Image.new("RGB", (label_width, h), (255, 255, 255))
        draw = ImageDraw.Draw(picture)
        lines = label.split("\n")
        top = (h - 12 * len(lines)) // 2
        for k, line in enumerate(lines):
            draw.text((4, top + 12 * k), line, fill=(0, 0, 0), font=font)
        labels.append(np.broadcast_to(np.asarray(picture), (t, h, label_width, c)))
    return np.concatenate([np.concatenate([label, grid], axis=2) for label, grid in zip(labels, grids)], axis=1)
