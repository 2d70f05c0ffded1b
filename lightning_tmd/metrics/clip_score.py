"""CLIP score of videos against their prompts (open_clip, weights from a local file).

Score per clip: mean over frames of max(100 * cos(image embedding, text embedding), 0), the
torchmetrics `CLIPScore` convention. Meaningful numbers need real CLIP weights; none are shipped.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F


class CLIPVideoScore:
    def __init__(self, model_name: str, weights: str | None, device: str | torch.device = "cpu") -> None:
        import open_clip

        if not weights or not Path(weights).is_file():
            raise FileNotFoundError(
                f"clip_score.weights: no open_clip checkpoint at '{weights}': download the {model_name} "
                "weights once and point clip_score.weights at the file"
            )
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(weights))
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        normalize = next(t for t in preprocess.transforms if type(t).__name__ == "Normalize")
        self.mean = torch.tensor(normalize.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(normalize.std, device=device).view(1, 3, 1, 1)
        size = self.model.visual.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        self.device = device

    @torch.no_grad()
    def __call__(self, videos: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Per-clip CLIP score, (N,), for videos (N, 3, T, H, W) in [-1, 1]."""
        n, _, t = videos.shape[:3]
        frames = videos.permute(0, 2, 1, 3, 4).flatten(0, 1).to(self.device).float()
        frames = F.interpolate((frames + 1) / 2, size=self.image_size, mode="bicubic", align_corners=False)
        frames = (frames.clamp(0, 1) - self.mean) / self.std
        image = F.normalize(self.model.encode_image(frames), dim=-1).view(n, t, -1)
        text = F.normalize(self.model.encode_text(self.tokenizer(prompts).to(self.device)), dim=-1)
        cosine = (image * text[:, None]).sum(-1)
        return (100 * cosine).clamp_min(0).mean(1).cpu()
