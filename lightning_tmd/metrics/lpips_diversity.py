"""LPIPS diversity: mean pairwise LPIPS between clips of the same prompt (higher = more diverse).

The lpips package ships its linear heads; the AlexNet backbone weights must come from a local
file (torchvision's `alexnet` state dict; only its `features.*` entries are used). Meaningful
numbers need those real weights.
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import torch
import torch.nn.functional as F


def load_lpips(weights: str | None, allow_random_backbone: bool = False):
    """`lpips.LPIPS(net="alex")` with the backbone from `weights` (no download)."""
    import lpips

    model = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    if weights:
        if not Path(weights).is_file():
            raise FileNotFoundError(f"lpips.weights: no AlexNet state dict at '{weights}'")
        state = torch.load(weights, map_location="cpu", weights_only=True)
        features = [v for k, v in state.items() if k.startswith("features.")]
        params = list(model.net.parameters())
        if len(features) != len(params) or any(f.shape != p.shape for f, p in zip(features, params)):
            raise ValueError(f"lpips.weights: '{weights}' is not a torchvision AlexNet state dict")
        with torch.no_grad():
            for p, f in zip(params, features):
                p.copy_(f)
    elif not allow_random_backbone:
        raise FileNotFoundError("lpips.weights: LPIPS needs the AlexNet backbone weights from a local file")
    return model.eval().requires_grad_(False)


class LPIPSDiversity:
    def __init__(self, weights: str | None, min_size: int = 64, allow_random_backbone: bool = False) -> None:
        self.model = load_lpips(weights, allow_random_backbone)
        self.min_size = min_size

    @torch.no_grad()
    def distance(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """LPIPS between two clips (3, T, H, W), averaged over frames."""
        frames_a, frames_b = a.permute(1, 0, 2, 3).float(), b.permute(1, 0, 2, 3).float()
        if frames_a.shape[-1] < self.min_size:
            size = (self.min_size, self.min_size)
            frames_a = F.interpolate(frames_a, size=size, mode="bilinear", align_corners=False)
            frames_b = F.interpolate(frames_b, size=size, mode="bilinear", align_corners=False)
        return self.model(frames_a, frames_b).mean().item()

    def __call__(self, videos: torch.Tensor, prompts: list[str]) -> float:
        """Mean over prompts with >= 2 clips of the mean pairwise LPIPS between their clips."""
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(p, []).append(i)
        scores = [
            sum(self.distance(videos[i], videos[j]) for i, j in combinations(idx, 2)) / (len(idx) * (len(idx) - 1) / 2)
            for idx in groups.values() if len(idx) > 1
        ]
        if not scores:
            raise ValueError("LPIPS diversity needs at least two clips of one prompt (use several seeds)")
        return sum(scores) / len(scores)
