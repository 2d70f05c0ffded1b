"""Sample videos of fixed prompts and seeds during training: TensorBoard videos and GIF files."""

from __future__ import annotations

from pathlib import Path

import lightning as L
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
    Writes `<log_dir>/samples/step_XXXXXXX.gif` and a TensorBoard video `samples`.
    """

    def __init__(self, every_n_steps: int = 500, prompts: list[str] | None = None, seed: int = 0,
                 fps: int = 4, scale: int = 4, sampler: dict | None = None) -> None:
        self.every_n_steps = every_n_steps
        self.prompts = list(prompts or DEFAULT_PROMPTS)
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

    @rank_zero_only
    def log_samples(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path | None:
        self._last_step = step = trainer.global_step
        datamodule = trainer.datamodule
        seeds = [self.seed + i for i in range(len(self.prompts))]
        clips, nfe = sample_clips(pl_module, datamodule.prompts, self.prompts, seeds, datamodule.clip_shape,
                                  batch_size=len(seeds), **self.sampler)
        frames = to_uint8(clips)
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        path = save_video(video_grid(frames, columns=4, scale=self.scale),
                          log_dir / "samples" / f"step_{step:07d}.gif", fps=self.fps)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                # add_video takes (N, T, C, H, W) uint8
                logger.experiment.add_video("samples", frames.permute(0, 1, 4, 2, 3), step, fps=self.fps)
                logger.experiment.add_text("samples/prompts", "\n\n".join(self.prompts), step)
                logger.experiment.add_scalar("samples/nfe", nfe, step)
        return path
