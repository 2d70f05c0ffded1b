"""Latent codec: Wan's video VAE (diffusers `AutoencoderKLWan`) from a local folder.

`encode` maps clips in [-1, 1] to the latents the transformer is trained on (Wan's "model space"):
`(z - latents_mean) / latents_std` per channel, with z the mode of the VAE's posterior (deterministic).
`decode` inverts it. Clips are (B, 3, T, H, W) with T = 1 + 4k frames (the encoder reads a first frame,
then chunks of four); latents are (B, C, 1 + (T - 1) / temporal_factor, H / spatial_factor, W / spatial_factor).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lightning_tmd.nets.wan_folder import resolve_component_folder

FRAME_CHUNK = 4  # frames after the first are encoded in chunks of four


def resolve_vae_folder(path: str | Path, field: str = "model_path") -> Path:
    """The VAE's folder: `path` itself or its `vae/` subfolder; errors name `field` and what is missing."""
    return resolve_component_folder(path, "vae", field, "VAE")


class WanVAECodec(nn.Module):
    """An `AutoencoderKLWan` with Wan's per-channel latent normalisation. Frozen, eval mode."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae
        channels = vae.config.z_dim
        shape = (1, channels, 1, 1, 1)
        self.register_buffer("mean", torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(shape),
                             persistent=False)
        self.register_buffer("std", torch.tensor(vae.config.latents_std, dtype=torch.float32).view(shape),
                             persistent=False)
        self.requires_grad_(False).eval()

    @classmethod
    def from_folder(cls, path: str | Path, dtype: str = "float32", field: str = "model_path") -> WanVAECodec:
        """Load from a Wan diffusers folder (or its vae/ subfolder); no downloads."""
        from diffusers import AutoencoderKLWan

        folder = resolve_vae_folder(path, field)
        vae = AutoencoderKLWan.from_pretrained(folder, torch_dtype=getattr(torch, dtype), local_files_only=True)
        return cls(vae)

    @property
    def channels(self) -> int:
        return int(self.vae.config.z_dim)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(bool(d) for d in self.vae.config.temperal_downsample)

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.vae.config.dim_mult) - 1)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def check_clip_size(self, frames: int, height: int, width: int) -> None:
        """Raise ValueError unless (frames, height, width) encode without dropping frames or pixels."""
        if frames < 1 or (frames - 1) % FRAME_CHUNK:
            raise ValueError(f"frames={frames}: the Wan VAE needs 1 + 4k frames (e.g. 17, 33, 81)")
        if (frames - 1) % self.temporal_factor:
            raise ValueError(f"frames={frames}: frames - 1 must be a multiple of the VAE's temporal factor "
                             f"{self.temporal_factor}")
        f = self.spatial_factor
        if height % f or width % f:
            raise ValueError(f"height={height}, width={width}: both must be multiples of the VAE's spatial factor {f}")

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, T', H', W') of the latents of a (3, frames, height, width) clip."""
        self.check_clip_size(frames, height, width)
        f = self.spatial_factor
        return self.channels, 1 + (frames - 1) // self.temporal_factor, height // f, width // f

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) clips in [-1, 1] -> (B, C, T', H', W') normalised latents (float32)."""
        self.check_clip_size(*video.shape[2:])
        device = self.mean.device
        z = self.vae.encode(video.to(device, self.dtype)).latent_dist.mode()
        return (z.float() - self.mean) / self.std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, T', H', W') normalised latents -> (B, 3, T, H, W) clips in [-1, 1] (float32)."""
        if latents.shape[1] != self.channels:
            raise ValueError(f"latents have {latents.shape[1]} channels but the VAE has {self.channels}")
        z = latents.to(self.mean.device).float() * self.std + self.mean
        return self.vae.decode(z.to(self.dtype)).sample.float().clamp(-1, 1)
