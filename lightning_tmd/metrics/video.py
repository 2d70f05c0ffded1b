"""Distribution and consistency measures of video sets: FVD on judge features, temporal consistency."""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance


def frechet_video_distance(features: nn.Module) -> FrechetInceptionDistance:
    """A Fréchet distance on `features` (a module mapping (N, C, T, H, W) clips to (N, D), with a
    `num_features` attribute). The real statistics are kept across `reset()`, so one real set serves
    many generated sets."""
    return FrechetInceptionDistance(feature=features, reset_real_features=False, normalize=False)


@torch.no_grad()
def update_in_batches(metric: FrechetInceptionDistance, videos: torch.Tensor, real: bool, batch_size: int = 64) -> None:
    for i in range(0, len(videos), batch_size):
        metric.update(videos[i : i + batch_size].float(), real=real)


@torch.no_grad()
def fake_distance(metric: FrechetInceptionDistance, videos: torch.Tensor, batch_size: int = 64) -> float:
    """The distance of `videos` to the real set already in `metric`."""
    metric.reset()
    update_in_batches(metric, videos, real=False, batch_size=batch_size)
    return float(metric.compute())


def shuffle_frames(videos: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each clip's frames in a random order (a sanity ceiling for a video distance)."""
    order = torch.stack([torch.randperm(videos.shape[2], generator=generator) for _ in range(len(videos))])
    index = order[:, None, :, None, None].expand(-1, videos.shape[1], -1, *videos.shape[3:])
    return videos.gather(2, index)


@torch.no_grad()
def temporal_consistency(videos: torch.Tensor, threshold: float = -0.6) -> dict[str, float]:
    """How stable objects stay over time on a dark background, (N, C, T, H, W) in [-1, 1].

    `size_cv`: per clip, std / mean over frames of the foreground area (pixels whose brightest channel
    exceeds `threshold`), averaged over clips. `colour_drift`: per clip, mean distance of each frame's
    mean foreground colour from the clip's mean foreground colour. Both are ~0 for real shapes clips.
    `path_jitter`: per clip, RMS distance (pixels) of the foreground centroid from the straight line
    fitted to it over frames; ~0 for objects at constant velocity (bounces add a little), large when
    objects jump between frames.
    """
    foreground = videos.amax(1) > threshold  # (N, T, H, W)
    area = foreground.flatten(2).sum(-1).float()  # (N, T)
    size_cv = area.std(1) / area.mean(1).clamp_min(1.0)
    colour = (videos * foreground[:, None]).flatten(3).sum(-1) / area.clamp_min(1.0)[:, None]  # (N, C, T)
    drift = (colour - colour.mean(2, keepdim=True)).norm(dim=1).mean(1)
    return {"size_cv": size_cv.mean().item(), "colour_drift": drift.mean().item(),
            "path_jitter": path_jitter(foreground).mean().item()}


def path_jitter(foreground: torch.Tensor) -> torch.Tensor:
    """(N,) RMS residual in pixels of a least-squares line through each clip's per-frame foreground
    centroid, foreground (N, T, H, W) bool; frames without foreground are left out of the fit."""
    n, frames, height, width = foreground.shape
    mass = foreground.flatten(2).sum(-1).float()  # (N, T)
    ys = torch.arange(height, dtype=torch.float32)[:, None].expand(height, width)
    xs = torch.arange(width, dtype=torch.float32)[None, :].expand(height, width)
    weights = foreground.float()
    centroid = torch.stack([(weights * c).flatten(2).sum(-1) for c in (ys, xs)], -1) / mass.clamp_min(1)[..., None]
    seen = (mass > 0).float()  # (N, T)
    time = torch.arange(frames, dtype=torch.float32).expand(n, frames)
    design = torch.stack([torch.ones_like(time), time], -1) * seen[..., None]  # (N, T, 2)
    line = torch.linalg.lstsq(design, centroid * seen[..., None]).solution  # (N, 2, 2)
    residual = ((design @ line - centroid) * seen[..., None]).pow(2).sum((1, 2))
    return (residual / seen.sum(1).clamp_min(1)).sqrt()
