"""Wan transformer: build from a config or load from a diffusers folder, and the split forward.

`WanNet` wraps diffusers' `WanTransformer3DModel` (the real class) and exposes its forward in pieces,
so that the TMD student (backbone + flow head) and the discriminator (block features) reuse it:

    tokens = net.embed(x, timestep, context)          # patchify, rope, time and text embeddings
    h = net.run_blocks(tokens, 0, k)                  # blocks [0, k)
    h = net.run_blocks(tokens, k, net.num_blocks, h)  # blocks [k, L)
    v = net.unembed(h, tokens.temb, tokens.grid)      # AdaLN output norm, projection, unpatchify

`timestep` is on Wan's 0-1000 scale (1000 * t). The diffusers-folder lookup lives in `wan_folder`; the
timestep, EDM-preconditioning and position-plane helpers in `wan_parts`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_tmd.nets.wan_folder import folder_tensors, resolve_transformer_folder
from lightning_tmd.nets.wan_parts import (
    PREDICTIONS,
    cast_floats,
    copy_full,
    edm_coefficients,
    fourier_position_planes,
    position_planes,
    wan_timestep,
    weight_dtype,
)
from lightning_tmd.schedules import broadcast_time


@dataclass
class WanTokens:
    """Everything the blocks and the output layer need, computed once by `WanNet.embed`."""

    hidden: torch.Tensor  # (B, L, D) patch tokens
    context: torch.Tensor  # (B, S, D) projected text
    temb: torch.Tensor  # (B, D) time embedding (output AdaLN)
    timestep_proj: torch.Tensor  # (B, 6, D) block AdaLN modulation
    rotary: Any  # rope (cos, sin) for the token grid
    grid: tuple[int, int, int]  # tokens along (frames, height, width)
    positions: torch.Tensor | None = None  # (1, L, D) the patch embedding of the position planes (or None)

    def select(self, index: torch.Tensor) -> WanTokens:
        """The tokens of the batch rows `index` (rope is shared by the batch)."""
        return replace(self, hidden=self.hidden[index], context=self.context[index], temb=self.temb[index],
                       timestep_proj=self.timestep_proj[index])

    def to(self, dtype: torch.dtype) -> WanTokens:
        """The floating-point tensors in `dtype` (rope included)."""
        return replace(self, hidden=self.hidden.to(dtype), context=self.context.to(dtype), temb=self.temb.to(dtype),
                       timestep_proj=self.timestep_proj.to(dtype), rotary=cast_floats(self.rotary, dtype),
                       positions=None if self.positions is None else self.positions.to(dtype))


META_INIT_NEEDS_PATH = ("model.meta_init=true builds the nets empty and reads their weights from model.path after "
                        "sharding: set model.path (a diffusers folder) or model.meta_init=false")


class WanNet(nn.Module):
    """A `WanTransformer3DModel` with a split forward. Free of Lightning."""

    # entry points that use the net's own (non-block) parameters: FSDP gathers them around these calls
    fsdp_methods = ("embed", "patchify", "time_embedding", "time_modulation", "unembed", "block_features")

    def __init__(self, transformer: WanTransformer3DModel, checkpoint_blocks: bool = False,
                 position_frequencies: int = 0, prediction: str = "velocity", sigma_data: float = 1.0) -> None:
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"model.prediction='{prediction}' is unknown: use one of {PREDICTIONS}")
        if sigma_data <= 0:
            raise ValueError(f"model.sigma_data={sigma_data}: give the data's RMS, a positive number")
        c = transformer.config
        expected = c.out_channels + position_planes(position_frequencies)
        if c.in_channels != expected:
            raise ValueError(
                f"model.config.in_channels={c.in_channels}: the net takes the clip's {c.out_channels} channels"
                + (f" plus {expected - c.out_channels} position planes (model.position_frequencies="
                   f"{position_frequencies})" if position_frequencies else "")
                + f", so set model.config.in_channels={expected}")
        self.transformer = transformer
        self.checkpoint_blocks = checkpoint_blocks
        self.position_frequencies = position_frequencies
        self.prediction = prediction
        self.sigma_data = sigma_data
        self.weights_folder: Path | None = None  # set on an empty (meta-device) net: `fill_empty` reads it

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: dict[str, Any], checkpoint_blocks: bool = False,
                    position_frequencies: int = 0, prediction: str = "velocity", sigma_data: float = 1.0) -> WanNet:
        """Randomly initialised net from `WanTransformer3DModel` keyword arguments."""
        config = dict(config)
        if "patch_size" in config:
            config["patch_size"] = tuple(config["patch_size"])
        return cls(WanTransformer3DModel(**config), checkpoint_blocks, position_frequencies, prediction, sigma_data)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, torch_dtype: torch.dtype | None = None, checkpoint_blocks: bool = False,
        position_frequencies: int = 0, prediction: str = "velocity", sigma_data: float = 1.0,
    ) -> WanNet:
        """Load from a local diffusers folder (no downloads). bf16 keeps Wan's fp32 modules in fp32."""
        folder = resolve_transformer_folder(path)
        kwargs = {"local_files_only": True}
        if torch_dtype is not None:
            kwargs["torch_dtype"] = torch_dtype
        return cls(WanTransformer3DModel.from_pretrained(folder, **kwargs), checkpoint_blocks, position_frequencies,
                   prediction, sigma_data)

    @classmethod
    def empty(
        cls, path: str | Path, torch_dtype: torch.dtype | None = None, checkpoint_blocks: bool = False,
        position_frequencies: int = 0, prediction: str = "velocity", sigma_data: float = 1.0,
    ) -> WanNet:
        """The net of a local diffusers folder built on the meta device: no memory and no weights until
        `fill_empty` (after FSDP has sharded it, each rank then holds its shards only)."""
        folder = resolve_transformer_folder(path)
        with torch.device("meta"):
            transformer = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(folder))
        net = cls(transformer, checkpoint_blocks, position_frequencies, prediction, sigma_data)
        if torch_dtype is not None:
            net.cast(torch_dtype)
        net.weights_folder = folder
        return net

    @torch.no_grad()
    def fill_empty(self, device: torch.device | str) -> int:
        """Allocate an empty net's parameters (each rank its FSDP shards) on `device` and read the weights from
        its folder one tensor at a time; recompute the rotary tables. Returns the bytes of the largest full
        tensor held meanwhile (what reading adds to the shards)."""
        if self.weights_folder is None:
            raise RuntimeError("fill_empty: this net was not built by WanNet.empty (it has no weights folder)")
        self.to_empty(device=device)
        params = self.transformer.state_dict()
        largest, seen = 0, set()
        for key, full in folder_tensors(self.weights_folder):
            if key not in params:
                raise KeyError(f"model.path: '{self.weights_folder}' holds '{key}', which the net does not have")
            copy_full(params[key], full)
            largest = max(largest, full.numel() * full.element_size())
            seen.add(key)
        missing = sorted(set(params) - seen)
        if missing:
            raise KeyError(f"model.path: '{self.weights_folder}' lacks weights of the net: {missing[:5]}")
        c, rope = self.config, self.transformer.rope
        fresh = WanRotaryPosEmbed(c.attention_head_dim, c.patch_size, c.rope_max_seq_len)
        for name, buffer in fresh.named_buffers():
            rope.get_buffer(name).copy_(buffer)
        return largest

    @classmethod
    def build(cls, path: str | None = None, config: dict[str, Any] | None = None,
              torch_dtype: torch.dtype | None = None, checkpoint_blocks: bool = False,
              position_frequencies: int = 0, prediction: str = "velocity", sigma_data: float = 1.0,
              meta_init: bool = False) -> WanNet:
        """`from_pretrained(path)` when a path is given (`empty(path)` with `meta_init`), else
        `from_config(config)`."""
        if meta_init and not path:
            raise ValueError(META_INIT_NEEDS_PATH)
        if path:
            build = cls.empty if meta_init else cls.from_pretrained
            return build(path, torch_dtype, checkpoint_blocks, position_frequencies, prediction, sigma_data)
        if config is None:
            raise ValueError("model: give either model.path (a diffusers folder) or model.config")
        return cls.from_config(config, checkpoint_blocks, position_frequencies, prediction, sigma_data)

    @classmethod
    def from_settings(cls, model: dict[str, Any]) -> WanNet:
        """Build from a model group {"path", "config", "dtype" (a torch dtype name), "checkpoint_blocks",
        "position_frequencies", "prediction", "sigma_data", "meta_init"}."""
        dtype = getattr(torch, model.get("dtype") or "float32")
        return cls.build(model.get("path"), model.get("config"), dtype, bool(model.get("checkpoint_blocks", False)),
                         int(model.get("position_frequencies") or 0), model.get("prediction") or "velocity",
                         float(1.0 if model.get("sigma_data") is None else model["sigma_data"]),
                         bool(model.get("meta_init", False)))

    def cast(self, dtype: torch.dtype) -> WanNet:
        """Cast the weights to `dtype`, keeping the modules and parameters diffusers keeps in fp32
        (`_keep_in_fp32_modules`: rope, time embedder, scale-shift tables, norms), as
        `from_pretrained(torch_dtype=...)` does; a blanket `.to(dtype)` would not."""
        keep = set(self.transformer._keep_in_fp32_modules or ())
        self.to(dtype)
        for name, param in self.named_parameters():
            if keep & set(name.split(".")):
                param.data = param.data.float()
        return self

    def save_pretrained(self, folder: str | Path) -> None:
        self.transformer.save_pretrained(folder)

    # -- properties ---------------------------------------------------------------------------
    @property
    def config(self) -> Any:
        return self.transformer.config

    @property
    def num_blocks(self) -> int:
        return len(self.transformer.blocks)

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(self.transformer.config.patch_size)

    @property
    def inner_dim(self) -> int:
        c = self.transformer.config
        return c.num_attention_heads * c.attention_head_dim

    # -- split forward ------------------------------------------------------------------------
    def embed(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> WanTokens:
        """Patchify x (B, C, T, H, W); embed timestep (B,) (0-1000) and text context (B, S, D_text)."""
        tr = self.transformer
        pt, ph, pw = self.patch_size
        _, _, frames, height, width = x.shape
        rotary = tr.rope(x)
        positions = self.position_embedding(x)
        hidden = self.patchify(x, positions)
        context = context.to(weight_dtype(tr.condition_embedder.text_embedder.linear_1))
        temb, timestep_proj, context, _ = tr.condition_embedder(timestep, context, None)
        return WanTokens(
            hidden=hidden,
            context=context,
            temb=temb,
            timestep_proj=timestep_proj.unflatten(1, (6, -1)),
            rotary=rotary,
            grid=(frames // pt, height // ph, width // pw),
            positions=positions,
        )

    def patchify(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The shared patch embedding alone: (B, C, T, H, W) -> tokens (B, L, D).

        A net with position planes embeds the clip's channels and adds the planes' embedding `positions`
        (`position_embedding`; computed here when not given): the same as embedding the clip with the planes
        appended as channels, without convolving the constant planes again for every call of a forward (the
        flow head embeds a new y_s at each inner step).
        """
        embedding = self.transformer.patch_embedding
        x = x.to(weight_dtype(embedding))
        if not self.position_frequencies:
            return embedding(x).flatten(2).transpose(1, 2).contiguous()
        if positions is None:
            positions = self.position_embedding(x)
        channels = x.shape[1]
        tokens = F.conv3d(x, embedding.weight[:, :channels], embedding.bias, stride=embedding.stride)
        return (tokens.flatten(2).transpose(1, 2) + positions).contiguous()

    def with_positions(self, x: torch.Tensor) -> torch.Tensor:
        """x with its position planes appended as channels: what the Wan's own `forward` takes."""
        if not self.position_frequencies:
            return x
        planes = fourier_position_planes(x.shape[2:], self.position_frequencies, x.device, x.dtype)
        return torch.cat([x, planes.expand(len(x), -1, -1, -1, -1)], dim=1)

    def position_embedding(self, x: torch.Tensor) -> torch.Tensor | None:
        """The patch embedding's response to the position planes of a clip shaped like x, (1, L, D) without the
        bias; None for a net without planes.

        Wan has no absolute position embedding (RoPE is relative), so without them a net cannot tell the
        first frame or the left edge from any other; the planes are Fourier features of the (t, y, x)
        position appended to the clip's channels, and through the patch embedding they become a learned
        absolute position embedding.
        """
        if not self.position_frequencies:
            return None
        embedding = self.transformer.patch_embedding
        dtype = weight_dtype(embedding)
        planes = fourier_position_planes(x.shape[2:], self.position_frequencies, x.device, dtype)[None]
        weight = embedding.weight[:, self.transformer.config.out_channels :]
        return F.conv3d(planes, weight, stride=embedding.stride).flatten(2).transpose(1, 2)

    def embed_time(self, timestep: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Time embedding alone: (temb (B, D), timestep_proj (B, 6, D)), exactly as in `embed`."""
        temb = self.time_embedding(timestep, dtype)
        return temb, self.time_modulation(temb)

    def time_features(self, timestep: torch.Tensor) -> torch.Tensor:
        """Wan's sinusoidal features of a 0-1000 timestep, (B, freq_dim), parameter-free."""
        return self.transformer.condition_embedder.timesteps_proj(timestep)

    def time_embedding(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """temb (B, D): the time MLP on the sinusoidal features (conditions the output AdaLN)."""
        embedder = self.transformer.condition_embedder.time_embedder
        features = self.time_features(timestep).to(next(iter(embedder.parameters())).dtype)
        return embedder(features).to(dtype)

    def time_modulation(self, temb: torch.Tensor) -> torch.Tensor:
        """The blocks' global AdaLN modulation (B, 6, D) from temb."""
        ce = self.transformer.condition_embedder
        return ce.time_proj(ce.act_fn(temb.to(weight_dtype(ce.time_proj)))).unflatten(1, (6, -1))

    def run_blocks(
        self, tokens: WanTokens, start: int, stop: int, hidden: torch.Tensor | None = None,
        timestep_proj: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run blocks [start, stop) on `hidden` (default: the embedded tokens).

        `timestep_proj` overrides the modulation (the flow head conditions on its own time).
        """
        h = tokens.hidden if hidden is None else hidden
        mod = tokens.timestep_proj if timestep_proj is None else timestep_proj
        for block in self.transformer.blocks[start:stop]:
            h = self.checkpointed(block, h, tokens.context, mod, tokens.rotary)
        return h

    def checkpointed(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args), recomputed in backward instead of keeping its activations when `checkpoint_blocks` is on
        and gradients are being recorded."""
        if self.checkpoint_blocks and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def unembed(self, hidden: torch.Tensor, temb: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """Output AdaLN (fp32 norm), projection and unpatchify: (B, L, D) -> (B, C_out, T, H, W)."""
        tr = self.transformer
        shift_, scale = (tr.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        h = (tr.norm_out(hidden.float()) * (1 + scale) + shift_).to(weight_dtype(tr.proj_out))
        return self.unpatchify(tr.proj_out(h), grid)

    def unpatchify(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """(B, L, pt*ph*pw*C) -> (B, C, T, H, W), the inverse of Wan's patchify ordering."""
        pt, ph, pw = self.patch_size
        f, h, w = grid
        x = tokens.reshape(tokens.shape[0], f, h, w, pt, ph, pw, -1)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Flow velocity (noise - data), equal to `WanTransformer3DModel.forward`."""
        tokens = self.embed(x, timestep, context)
        hidden = self.run_blocks(tokens, 0, self.num_blocks)
        return self.unembed(hidden, tokens.temb, tokens.grid)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """v(x_t, t, c) with t in [0, 1], shape (B,) (float64 allowed): the net's output itself (Wan's
        parametrisation) or, with `prediction="edm"`, c_skip(t) x_t + c_out(t) F (`edm_coefficients`)."""
        out = self(x_t, wan_timestep(t), context.to(x_t.dtype))
        if self.prediction == "velocity":
            return out
        skip, scale = self.edm_terms(x_t, t)
        return (skip + scale * out).to(out.dtype)

    def edm_terms(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_skip(t) x_t, c_out(t)) in x_t's dtype, c_out shaped (B, 1, ..., 1): with
        `prediction="edm"` the velocity is skip + scale * F (the coefficients are computed in float64)."""
        c_skip, c_out = edm_coefficients(t.double(), self.sigma_data)
        return broadcast_time(c_skip, x_t) * x_t, broadcast_time(c_out, x_t)

    def x0(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The clean estimate x0 = x_t - t v(x_t, t, c) (Eq. 17)."""
        return x_t - broadcast_time(t, x_t) * self.velocity(x_t, t, context)

    def block_features(
        self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, blocks: list[int]
    ) -> list[torch.Tensor]:
        """Unpatchified hidden states after each 1-based block index in `blocks`.

        Each is (B, D / (pt*ph*pw), T, H, W): the token grid unfolded back to the clip's shape.
        Only blocks up to max(blocks) are run.
        """
        bad = [b for b in blocks if not 1 <= b <= self.num_blocks]
        if bad:
            raise ValueError(f"block indices {bad} are outside 1..{self.num_blocks}")
        tokens = self.embed(x, timestep, context)
        hidden, features = tokens.hidden, {}
        for index in range(1, max(blocks) + 1):
            hidden = self.run_blocks(tokens, index - 1, index, hidden)
            if index in blocks:
                features[index] = self.unpatchify(hidden, tokens.grid)
        return [features[b] for b in blocks]
