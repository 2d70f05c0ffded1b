"""`TMDPipeline`: a distilled student as a diffusers pipeline, loaded and sampled without Lightning or Hydra.

    from lightning_tmd.diffusers_pipeline import TMDPipeline
    pipe = TMDPipeline.from_pretrained("exports/shapes_tmd")
    out = pipe(prompt="a red circle moving up", outer_steps=2, inner_steps=4,
               generator=torch.Generator().manual_seed(0))
    out.frames, out.nfe      # (B, T, C, H, W) in [0, 1]; the effective NFE (Eq. 16)

Load a bfloat16 export with `from_pretrained(folder, dtype=torch.bfloat16)` (diffusers otherwise upcasts it
to float32); Wan's norms and time embedding stay float32 either way.

An exported folder (written by `python -m lightning_tmd.export`) holds:

    model_index.json            the pipeline's components (diffusers format)
    student/config.json         TMDStudentModel: student kind ("tmd" | "one_pass"), the Wan transformer's
                                config, H, fusion, inner target, default (M, N), outer / inner shift, t_max,
                                the training clips' shape (C, T, H, W) and how prompts were embedded
    student/diffusion_pytorch_model.safetensors
                                the sampling weights (EMA when the run kept one) and the negative
                                prompt's embedding
    scheduler/scheduler_config.json
                                the sampler: TMDScheduler (default M, N, grid shifts, H and L) or
                                OnePassScheduler (default M, shift); a folder exported without one
                                samples with the scheduler of student/config.json's settings
    text_encoder/, tokenizer/   the run's transformers text encoder (MiniLM, UMT5), when exported
    vae/                        AutoencoderKLWan, for students of a latent space
    run_config.yaml             the training run's resolved config (provenance; read by `sample`)

TMD students sample with Algorithm 1 (`sampling.tmd_step`), one-pass DMD2-v students with Eq. 18
(`sampling.one_pass_step`), on the grids of the pipeline's `scheduler`; neither uses CFG (guidance is
distilled in). The inner noise comes from `generator` when it is one `torch.Generator`; otherwise it is
seeded by the starting noise, as in `StudentModule.sample`, so given latents always give the same clips.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKLWan, DiffusionPipeline, ModelMixin, WanTransformer3DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor

from lightning_tmd.nets.codec import WanVAECodec
from lightning_tmd.nets.text import TextEmbedding, VocabTextEncoder, encode_with_transformers
from lightning_tmd.nets.tmd_student import TMDStudent
from lightning_tmd.nets.wan import WanNet
from lightning_tmd.sampling import noise_seeded_generator, one_pass_step, tmd_step
from lightning_tmd.schedulers import OnePassScheduler, TMDScheduler

STUDENT_KINDS = ("tmd", "one_pass")
TEXT_KINDS = ("vocab", "transformers", "embeddings")  # how the run embedded prompts
OUTPUT_TYPES = ("pt", "np", "latent")
RUN_CONFIG_FILE = "run_config.yaml"


class TMDStudentModel(ModelMixin, ConfigMixin):
    """A distilled student and the settings its sampler needs, savable with `save_pretrained`.

    Args:
        kind: "tmd" (backbone + recurrent flow head, Algorithm 1) or "one_pass" (DMD2-v, Eq. 18).
        transformer: the `WanTransformer3DModel` keyword arguments of the student's Wan.
        position_frequencies: Fourier position planes the Wan takes beside the clip (`WanNet.with_positions`).
        prediction, sigma_data: what the Wan's output is (`WanNet.velocity`: "velocity", or "edm" preconditioning).
        sample_shape: (C, T, H, W) of the clips (latents) the student was trained on.
        text: how prompts were embedded: {"kind": one of TEXT_KINDS, "dim", "max_length", "negative_prompt",
            and "seed" for the vocabulary encoder}.
        negative_prompt_shape: (S, D) of the stored negative prompt embedding.
        outer_steps, outer_shift, t_max: default M and the shifted outer grid.
        head_blocks, inner_steps, inner_shift, fusion, inner_target, clean_estimate: TMD only (H, default
            N, the inner grid, the student's architecture; clean_estimate is a training setting kept for reference).
    """

    _keep_in_fp32_modules = [*WanTransformer3DModel._keep_in_fp32_modules, "negative_prompt_embeds"]

    @register_to_config
    def __init__(self, kind: str, transformer: dict[str, Any], sample_shape: list[int], text: dict[str, Any],
                 negative_prompt_shape: list[int], outer_steps: int, outer_shift: float, t_max: float = 0.999,
                 head_blocks: int | None = None, inner_steps: int | None = None, inner_shift: float | None = None,
                 fusion: str | None = None, inner_target: str | None = None,
                 clean_estimate: str | None = None, position_frequencies: int = 0, prediction: str = "velocity",
                 sigma_data: float = 1.0) -> None:
        super().__init__()
        if kind not in STUDENT_KINDS:
            raise ValueError(f"student/config.json: kind '{kind}' is unknown: use one of {STUDENT_KINDS}")
        if text.get("kind") not in TEXT_KINDS:
            raise ValueError(f"student/config.json: text.kind '{text.get('kind')}' is unknown: use one of {TEXT_KINDS}")
        wan = WanNet.from_config(transformer, position_frequencies=position_frequencies, prediction=prediction,
                                 sigma_data=sigma_data)
        if kind == "tmd":
            missing = [n for n, v in (("head_blocks", head_blocks), ("inner_steps", inner_steps),
                                      ("inner_shift", inner_shift)) if v is None]
            if missing:
                raise ValueError(f"student/config.json: a tmd student needs {missing}")
            self.net = TMDStudent(wan, head_blocks, fusion or "gated", inner_target or "velocity")
        else:
            self.net = wan
        self.register_buffer("negative_prompt_embeds", torch.zeros(*negative_prompt_shape))

    @property
    def wan(self) -> WanNet:
        return self.net.wan if isinstance(self.net, TMDStudent) else self.net

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the net runs in (that of its patch embedding; Wan keeps some modules in fp32)."""
        return self.wan.transformer.patch_embedding.weight.dtype

    def default_scheduler(self) -> TMDScheduler | OnePassScheduler:
        """The scheduler of the sampler settings in this config (default M, N, shifts, t_max; H and L)."""
        c = self.config
        if c.kind == "tmd":
            return TMDScheduler(c.outer_steps, c.inner_steps, c.outer_shift, c.inner_shift, c.head_blocks,
                                self.wan.num_blocks, c.t_max)
        return OnePassScheduler(c.outer_steps, c.outer_shift, c.t_max)

    def check_scheduler(self, scheduler: TMDScheduler | OnePassScheduler) -> None:
        """A scheduler of this student's kind (TMD: with its H and L, which the effective NFE counts)."""
        expected = TMDScheduler if self.config.kind == "tmd" else OnePassScheduler
        if not isinstance(scheduler, expected):
            raise ValueError(f"scheduler: a {self.config.kind} student samples with a {expected.__name__}, "
                             f"got {type(scheduler).__name__}")
        if expected is TMDScheduler:
            ours = (self.config.head_blocks, self.wan.num_blocks)
            theirs = (scheduler.config.head_blocks, scheduler.config.num_blocks)
            if theirs != ours:
                raise ValueError(f"scheduler: (head_blocks, num_blocks) = {theirs} but the student has {ours}")

    @torch.no_grad()
    def outer_step(self, x_t: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, context: torch.Tensor,
                   scheduler: TMDScheduler | OnePassScheduler, generator: torch.Generator | None) -> torch.Tensor:
        """One outer step of the student's sampler (t, t_next of shape (B,), float64); a TMD student's
        head runs on the scheduler's inner grid (`set_timesteps`)."""
        if self.config.kind == "tmd":
            return tmd_step(self.net, x_t, t, t_next, context, scheduler.inner_timesteps, generator)
        return one_pass_step(self.net, x_t, t, t_next, context)


@dataclass
class TMDPipelineOutput(BaseOutput):
    """frames: (B, T, C, H, W) tensor ("pt") or (B, T, H, W, C) array ("np") in [0, 1], or the sampled
    (B, C, T, H, W) tensor before decoding ("latent"). nfe: the sampler's effective NFE."""

    frames: torch.Tensor | np.ndarray
    nfe: float


class TMDPipeline(DiffusionPipeline):
    """Text-to-video with a distilled TMD or DMD2-v student: M outer steps (x N inner head steps for TMD).

    Args:
        student: the student and its sampler settings.
        text_encoder, tokenizer: the run's transformers text encoder (None: prompts are embedded with the
            student's vocabulary encoder, or must be given as `prompt_embeds`).
        vae: decodes latent-space students' samples (None: the student samples pixels).
        scheduler: the sampler's grids and defaults, a `TMDScheduler` for a TMD student, a `OnePassScheduler`
            for a one-pass one (None, e.g. a folder exported without one: `student.default_scheduler()`).
    """

    model_cpu_offload_seq = "text_encoder->student->vae"
    _optional_components = ["text_encoder", "tokenizer", "vae", "scheduler"]

    def __init__(self, student: TMDStudentModel, text_encoder: Any = None, tokenizer: Any = None,
                 vae: AutoencoderKLWan | None = None, scheduler: TMDScheduler | OnePassScheduler | None = None) -> None:
        super().__init__()
        scheduler = student.default_scheduler() if scheduler is None else scheduler
        student.check_scheduler(scheduler)
        self.register_modules(student=student, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae,
                              scheduler=scheduler)
        text = student.config.text
        self.vocab_encoder = (VocabTextEncoder(text["dim"], text["max_length"], text["seed"])
                              if text["kind"] == "vocab" else None)
        self.video_processor = VideoProcessor(vae_scale_factor=1)

    # -- prompts ---------------------------------------------------------------------------------
    @property
    def has_text_encoder(self) -> bool:
        return self.vocab_encoder is not None or (self.text_encoder is not None and self.tokenizer is not None)

    @property
    def negative_prompt(self) -> str:
        return self.student.config.text["negative_prompt"]

    def embed_prompts(self, prompts: list[str]) -> TextEmbedding:
        """Prompt embeddings (B, S, D) exactly as the training run embedded its captions."""
        if self.vocab_encoder is not None:
            return self.vocab_encoder(prompts)
        if not self.has_text_encoder:
            raise ValueError(
                "prompt: this pipeline has no text encoder (the folder was exported without one); pass "
                f"prompt_embeds (B, S, {self.student.config.transformer['text_dim']}) from the run's text "
                "encoder instead, or export again with text_encoder=true"
            )
        text = self.student.config.text
        return encode_with_transformers(self.tokenizer, self.text_encoder, prompts, text["max_length"],
                                        text.get("hidden_layer"))

    def prompt_context(self, prompt: str | list[str] | None, prompt_embeds: torch.Tensor | None,
                       num_videos_per_prompt: int) -> torch.Tensor:
        """The text context (B * num_videos_per_prompt, S, D), fp32, on the execution device."""
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("give exactly one of prompt and prompt_embeds")
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            if not prompts:
                raise ValueError("prompt: an empty list; give a prompt or a list of at least one")
            prompt_embeds = self.embed_prompts(prompts).states
        text_dim = self.student.config.transformer["text_dim"]
        if prompt_embeds.ndim != 3 or prompt_embeds.shape[-1] != text_dim:
            raise ValueError(f"prompt_embeds: expected (B, S, {text_dim}), got {tuple(prompt_embeds.shape)}")
        return prompt_embeds.float().repeat_interleave(num_videos_per_prompt, 0).to(self._execution_device)

    # -- sampling --------------------------------------------------------------------------------
    def prepare_latents(self, batch_size: int, sample_shape: tuple[int, ...] | None,
                        generator: torch.Generator | list[torch.Generator] | None,
                        latents: torch.Tensor | None) -> torch.Tensor:
        """The starting noise (B, C, T, H, W), fp32: `latents`, else drawn from `generator`."""
        shape = (batch_size, *(sample_shape or self.student.config.sample_shape))
        if latents is None:
            return randn_tensor(shape, generator=generator, device=self._execution_device, dtype=torch.float32)
        channels = self.student.config.transformer["out_channels"]
        if latents.ndim != 5 or latents.shape[0] != batch_size or latents.shape[1] != channels:
            raise ValueError(f"latents: expected ({batch_size}, {channels}, T, H, W) for {batch_size} videos, "
                             f"got {tuple(latents.shape)}")
        return latents.float().to(self._execution_device)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Sampled latents -> clips (B, 3, T, H, W) in [-1, 1] through the VAE (`WanVAECodec.decode`);
        the samples themselves for a pixel-space student."""
        if self.vae is None:
            return latents.float()
        return WanVAECodec(self.vae).to(self.vae.device).decode(latents)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None, outer_steps: int | None = None,
                 inner_steps: int | None = None, outer_shift: float | None = None, inner_shift: float | None = None,
                 num_videos_per_prompt: int = 1, sample_shape: tuple[int, int, int, int] | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, output_type: str = "pt",
                 return_dict: bool = True) -> TMDPipelineOutput | tuple[Any, float]:
        """Generate videos.

        Args:
            prompt / prompt_embeds: captions, or their embeddings (B, S, D) from the run's text encoder.
            negative_prompt_embeds: accepted for the diffusers interface and ignored: the students sample
                without CFG (the stored negative prompt embedding is `student.negative_prompt_embeds`).
            outer_steps, inner_steps: M and N (default: the scheduler's); N applies to TMD students only.
            outer_shift, inner_shift: gamma of the outer / inner grid (default: the scheduler's).
            num_videos_per_prompt: videos per caption.
            sample_shape: (C, T, H, W) of the sampled tensor (default: the training clips' shape; latents
                when a VAE decodes them).
            generator: one generator (starting noise, then the inner noise) or one per video (starting
                noise; the inner noise is then seeded by it).
            latents: the starting noise (B, C, T, H, W) instead of drawing it.
            output_type: "pt", "np" or "latent" (the samples before decoding and post-processing).
        Returns:
            `TMDPipelineOutput(frames, nfe)`, or `(frames, nfe)` with `return_dict=False`.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type '{output_type}' is unknown: use one of {OUTPUT_TYPES}")
        context = self.prompt_context(prompt, prompt_embeds, num_videos_per_prompt)
        x = self.prepare_latents(len(context), sample_shape, generator, latents)
        if output_type != "latent" and self.vae is None and x.shape[1] != 3:
            raise ValueError(f"output_type='{output_type}': the student samples {x.shape[1]}-channel latents and "
                             "the folder has no VAE to decode them; use output_type='latent'")
        device = self._execution_device
        inner_generator = generator if isinstance(generator, torch.Generator) else noise_seeded_generator(x, device)
        student, scheduler = self.student, self.scheduler
        scheduler.set_timesteps(outer_steps, inner_steps, device, outer_shift=outer_shift, inner_shift=inner_shift)
        grid = scheduler.timesteps
        x = x.to(student.compute_dtype)
        ones = torch.ones(len(x), dtype=torch.float64, device=device)
        with self.progress_bar(total=scheduler.num_inference_steps) as progress:
            for t, t_next in zip(grid[:-1].tolist(), grid[1:].tolist()):
                x = student.outer_step(x, t * ones, t_next * ones, context, scheduler, inner_generator)
                progress.update()
        nfe = scheduler.effective_nfe(outer_steps, inner_steps)
        frames = x.float()
        if output_type != "latent":
            frames = self.video_processor.postprocess_video(self.decode(frames), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return frames, nfe
        return TMDPipelineOutput(frames=frames, nfe=nfe)

    def sample(self, context: torch.Tensor, negative_context: torch.Tensor | None = None,
               noise: torch.Tensor | None = None, shape: tuple[int, ...] | None = None,
               outer_steps: int | None = None, inner_steps: int | None = None, outer_shift: float | None = None,
               inner_shift: float | None = None,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, float]:
        """The project's sampler interface (as `StudentModule.sample`): (clips (B, C, T, H, W) in [-1, 1],
        decoded when a VAE is present; effective NFE). `negative_context` is ignored (no CFG)."""
        out = self(prompt_embeds=context, outer_steps=outer_steps, inner_steps=inner_steps, outer_shift=outer_shift,
                   inner_shift=inner_shift, sample_shape=shape, generator=generator, latents=noise,
                   output_type="latent")
        return self.decode(out.frames), out.nfe
