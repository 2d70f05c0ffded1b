"""Sample videos of fixed prompts and seeds during training: TensorBoard videos and GIF files."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from lightning_tmd.sampling import sample_clips
from lightning_tmd.video import save_video, to_uint8, video_grid

DEFAULT_PROMPTS = (
    "a red circle moving right",
    "a blue square moving up",
    "a yellow triangle moving down and left",
    "a green circle moving up and right",
    "a magenta square moving left",
    "a cyan triangle moving down",
    "a red square moving up and left and a cyan circle moving right",
    "a green triangle moving down and right and a yellow square moving up",
)


class SampleVideos(L.Callback):
    """Every `every_n_steps` (and at the end of training) sample `prompts` with seeds seed, seed + 1, ...

    Needs a module with `sample(context, negative_context, noise=..., **sampler)` returning
    (clips, nfe), and a datamodule with `prompts` (a `PromptEncoder`) and `clip_shape`.
    `prompts` default to the datamodule's `sample_prompts` when it has them (latent shards), else to
    the shapes prompts. A datamodule of latents (one with `decode`) turns samples into videos with its
    VAE when `can_decode`; without a VAE the videos are a preview of the first 3 latent channels
    (`latent_preview`), not pictures.
    Writes `<log_dir>/samples/step_XXXXXXX.gif` and a TensorBoard video `samples`.
    """

    def __init__(self, every_n_steps: int = 500, prompts: list[str] | None = None, seed: int = 0,
                 fps: int = 4, scale: int = 4, sampler: dict | None = None) -> None:
        self.every_n_steps = every_n_steps
        self.prompts = list(prompts) if prompts else None  # None: the datamodule's, see `prompts_for`
        self.seed, self.fps, self.scale = seed, fps, scale
        self.sampler = dict(sampler or {})
        self._last_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.log_samples(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self._last_step:
            self.log_samples(trainer, pl_module)

    def log_samples(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path | None:
        """Every rank samples (FSDP gathers weights collectively; the ranks' clips are identical),
        rank 0 writes."""
        self._last_step = trainer.global_step
        datamodule = trainer.datamodule
        prompts = self.prompts_for(datamodule)
        seeds = [self.seed + i for i in range(len(prompts))]
        clips, nfe = sample_clips(pl_module, datamodule.prompts, prompts, seeds, datamodule.clip_shape,
                                  batch_size=len(seeds), **self.sampler)
        frames = to_uint8(samples_as_video(clips, datamodule, pl_module.device))
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective under data parallelism
        return self.write(trainer, frames, prompts, nfe, log_dir)

    @rank_zero_only
    def write(self, trainer: L.Trainer, frames: torch.Tensor, prompts: list[str], nfe: float,
              log_dir: Path) -> Path:
        step = trainer.global_step
        path = save_video(video_grid(frames, columns=4, scale=self.scale),
                          log_dir / "samples" / f"step_{step:07d}.gif", fps=self.fps)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                # add_video takes (N, T, C, H, W) uint8
                logger.experiment.add_video("samples", frames.permute(0, 1, 4, 2, 3), step, fps=self.fps)
                logger.experiment.add_text("samples/prompts", "\n\n".join(prompts), step)
                logger.experiment.add_scalar("samples/nfe", nfe, step)
        return path

    def prompts_for(self, datamodule: L.LightningDataModule) -> list[str]:
        return self.prompts or list(getattr(datamodule, "sample_prompts", None) or DEFAULT_PROMPTS)


def latent_preview(latents: torch.Tensor) -> torch.Tensor:
    """A picture of latents, not a decoded video: their first 3 channels as RGB, divided by 3 (so
    +-3 standard deviations of a normalised latent span [-1, 1]) and clipped."""
    rgb = latents[:, :3]
    if rgb.shape[1] < 3:
        rgb = torch.cat([rgb, rgb[:, -1:].expand(-1, 3 - rgb.shape[1], -1, -1, -1)], 1)
    return (rgb.float() / 3).clamp(-1, 1)


def samples_as_video(clips: torch.Tensor, datamodule: L.LightningDataModule, device: torch.device) -> torch.Tensor:
    """Sampled clips as [-1, 1] videos: pixel clips as they are; latents decoded on `device` when the
    datamodule has a VAE, else `latent_preview`."""
    if not hasattr(datamodule, "decode"):
        return clips
    if datamodule.can_decode:
        return datamodule.decode(clips.to(device)).float().cpu()
    return latent_preview(clips)
