"""The TMD student: the teacher's first L - H blocks as the main backbone (run once per outer step)
and its last H blocks plus output layers as a recurrent flow head (run for every inner step).

    main = student.backbone(x_t, t, context)                 # m = blocks [0, L-H) on (x_t, t, c)
    y_hat = student.rollout(main, y1, inner_grid)            # N head calls, same weights
    x_next = student.transition(x_t, t, t_next, y_hat)       # Eq. 4

The head sees the inner state y_s through the shared patch embedding and a fusion layer, and its
AdaLN is conditioned on emb(s) + emb_new(s - r) (App. A.1; docs/method.md §The TMD student). Both new
paths start at zero, so at initialisation `head(y, t, t; backbone(x_t, t))` is the teacher's velocity at (x_t, t).

A teacher with `model.prediction=edm` reads its Wan output F through EDM's preconditioning; the head's
output is read the same way at the outer step, c_skip(t) x_t + c_out(t) F, so that identity holds for it too.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from diffusers.models.embeddings import TimestepEmbedding
from torch import nn

from lightning_tmd.nets.wan import WanNet, WanTokens
from lightning_tmd.nets.wan_parts import wan_timestep, weight_dtype
from lightning_tmd.schedulers import TMDScheduler
from lightning_tmd.schedules import broadcast_time

FUSIONS = ("gated", "concat")
INNER_TARGETS = ("velocity", "sample")  # y = x1 - x (DTM, default) or y = x (Table 10)
CLEAN_ESTIMATES = ("transition", "literal")  # x_t - t v(y_hat) (docs/method.md Q2) or x1 - y_hat


@dataclass
class MainFeature:
    """The backbone's output for one outer step: m and the embeddings the head blocks reuse."""

    tokens: WanTokens  # text context, rope, grid and the outer time's embeddings
    hidden: torch.Tensor  # m, (B, L, D): the hidden state after block L - H
    # EDM preconditioning at the outer (x_t, t) (`model.prediction=edm`): head output = skip + out_scale * F
    skip: torch.Tensor | None = None  # c_skip(t) x_t, (B, C, T, H, W)
    out_scale: torch.Tensor | None = None  # c_out(t), (B, 1, 1, 1, 1)
    # the outer state and time the backbone saw: y = x reads the head against them (Table 10)
    x_t: torch.Tensor | None = None  # (B, C, T, H, W)
    t: torch.Tensor | None = None  # (B,), float64

    def select(self, index: torch.Tensor) -> MainFeature:
        return replace(self, tokens=self.tokens.select(index), hidden=self.hidden[index],
                       **self.optional(lambda v: v[index], ("skip", "out_scale", "x_t", "t")))

    def detach(self) -> MainFeature:
        return replace(self, hidden=self.hidden.detach(), **self.optional(torch.Tensor.detach, ("skip", "x_t")))

    def to(self, dtype: torch.dtype) -> MainFeature:
        """Every floating-point tensor but the times in `dtype` (the stage-1 derivative holds m fixed in fp32)."""
        return replace(self, tokens=self.tokens.to(dtype), hidden=self.hidden.to(dtype),
                       **self.optional(lambda v: v.to(dtype), ("skip", "out_scale", "x_t")))

    def optional(self, fn: Callable[[torch.Tensor], torch.Tensor], names: tuple[str, ...]) -> dict:
        """{name: fn(field)} for the optional fields `names`, None where a field is None."""
        return {name: None if getattr(self, name) is None else fn(getattr(self, name)) for name in names}

    def read_output(self, out: torch.Tensor) -> torch.Tensor:
        """The head's raw Wan output as a velocity-like prediction (itself unless EDM-preconditioned)."""
        if self.skip is None:
            return out
        return (self.skip + self.out_scale * out).to(out.dtype)


class GatedFusion(nn.Module):
    """y-tokens through an AdaLN-style MLP block, added to m under a global sigmoid gate (App. A.1;
    docs/method.md §The TMD student):

        h = m + sigma(a) * g * MLP(LN(e) * (1 + scale) + shift),   e = patch_embed(y_s),

    where (shift, scale, g) are the block's own table plus Wan's global FFN modulation for the head's
    time. The MLP's output layer starts at zero, so at initialisation h = m exactly.
    """

    def __init__(self, dim: int, ffn_dim: int, gate_init: float = 0.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        self.modulation = nn.Parameter(torch.randn(1, 3, dim) / dim**0.5)
        self.gate_logit = nn.Parameter(torch.tensor([float(gate_init)]))  # a, shape (1,): FSDP2 shards no scalars

    def forward(self, main: torch.Tensor, y_tokens: torch.Tensor, head_modulation: torch.Tensor) -> torch.Tensor:
        wide = torch.promote_types(y_tokens.dtype, torch.float32)  # norms and modulation in >= fp32
        shift, scale, gate = (self.modulation + head_modulation[:, 3:6].to(wide)).chunk(3, dim=1)
        h = (self.norm(y_tokens.to(wide)) * (1 + scale) + shift).to(weight_dtype(self.mlp[0]))
        return main + (torch.sigmoid(self.gate_logit) * gate * self.mlp(h).to(wide)).type_as(main)

    @property
    def gate(self) -> torch.Tensor:
        return torch.sigmoid(self.gate_logit.detach()).squeeze(0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        key = prefix + "gate_logit"
        if key in state_dict and state_dict[key].ndim == 0:  # checkpoints that stored a as a scalar
            state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class ConcatFusion(nn.Module):
    """h = W [m ; e] + b, with W = [I, N(0, init_std^2)] and b = 0 at initialisation (App. B.3)."""

    def __init__(self, dim: int, init_std: float = 0.01) -> None:
        super().__init__()
        self.proj = nn.Linear(2 * dim, dim)
        with torch.no_grad():
            self.proj.weight[:, :dim].copy_(torch.eye(dim))
            self.proj.weight[:, dim:].normal_(0.0, init_std)
            self.proj.bias.zero_()

    def forward(self, main: torch.Tensor, y_tokens: torch.Tensor, head_modulation: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.cat([main, y_tokens.type_as(main)], dim=-1).to(weight_dtype(self.proj)))


class TMDStudent(nn.Module):
    """Backbone + fusion + recurrent flow head over one `WanNet` (its blocks split at L - H).

    Args:
        wan: the net holding the teacher's weights (it is trained in place; pass a copy to keep the teacher).
        head_blocks: H, the number of last blocks that form the flow head.
        fusion: "gated" (default) or "concat".
        inner_target: "velocity" (y = x1 - x, DTM) or "sample" (y = x).
    """

    # entry points that use the student's own parameters (fusion, gap embedding) or enter its Wan:
    # FSDP gathers the parameters around these calls
    fsdp_methods = ("backbone", "head_time", "head", "average_velocity", "rollout")

    def __init__(self, wan: WanNet, head_blocks: int, fusion: str = "gated",
                 inner_target: str = "velocity") -> None:
        super().__init__()
        if not 1 <= head_blocks < wan.num_blocks:
            raise ValueError(f"head_blocks={head_blocks} must be in 1..{wan.num_blocks - 1} "
                             f"(the teacher has {wan.num_blocks} blocks)")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion '{fusion}' is unknown: use one of {FUSIONS}")
        if inner_target not in INNER_TARGETS:
            raise ValueError(f"inner_target '{inner_target}' is unknown: use one of {INNER_TARGETS}")
        self.wan = wan
        self.head_blocks = head_blocks
        self.inner_target = inner_target
        dim, config = wan.inner_dim, wan.config
        self.fusion = GatedFusion(dim, config.ffn_dim, eps=config.eps) if fusion == "gated" else ConcatFusion(dim)
        self.gap_embedding = TimestepEmbedding(config.freq_dim, dim)  # emb_new(s - r), zero output at init
        nn.init.zeros_(self.gap_embedding.linear_2.weight)
        nn.init.zeros_(self.gap_embedding.linear_2.bias)

    @classmethod
    def from_teacher(cls, teacher: WanNet, head_blocks: int, **kwargs) -> TMDStudent:
        """A student holding a deep copy of the teacher's weights (the teacher stays untouched)."""
        return cls(copy.deepcopy(teacher), head_blocks, **kwargs)

    @property
    def config(self):
        return self.wan.config

    @property
    def num_blocks(self) -> int:
        return self.wan.num_blocks

    @property
    def split(self) -> int:
        """L - H: the backbone runs blocks [0, split), the head [split, L)."""
        return self.wan.num_blocks - self.head_blocks

    # -- the two halves ----------------------------------------------------------------------
    def backbone(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> MainFeature:
        """m_theta(x_t, t, c): embeddings and the first L - H blocks (t in [0, 1], shape (B,))."""
        tokens = self.wan.embed(x_t, wan_timestep(t), context.to(x_t.dtype))
        main = MainFeature(tokens, self.wan.run_blocks(tokens, 0, self.split), x_t=x_t, t=t)
        if self.wan.prediction == "edm":  # the teacher's v = c_skip x_t + c_out F, at the outer (x_t, t)
            main.skip, main.out_scale = self.wan.edm_terms(x_t, t)
        return main

    def head_time(self, s: torch.Tensor, r: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(temb, modulation) of the head: the teacher's emb(s) plus the new emb(s - r)."""
        features = self.wan.time_features(wan_timestep(s - r))
        gap = self.gap_embedding(features.to(self.gap_embedding.linear_1.weight.dtype))
        temb = self.wan.time_embedding(wan_timestep(s), dtype) + gap.to(dtype)
        return temb, self.wan.time_modulation(temb)

    def head(self, y_s: torch.Tensor, s: torch.Tensor, r: torch.Tensor, main: MainFeature) -> torch.Tensor:
        """head_theta(y_s, s, r; m): the last H blocks on fuse(m, y_s), then the output layers.

        With activation checkpointing (`model.checkpoint_blocks`) the layers around the blocks are checkpointed
        per head call too: the fusion and the output layer would otherwise keep ~2 blocks' worth of activations
        for each of the N calls (the memory table's `fusion` and `output` columns)."""
        hidden, temb, modulation = self.wan.checkpointed(self.head_input, y_s, s, r, main)
        hidden = self.wan.run_blocks(main.tokens, self.split, self.num_blocks, hidden, modulation)
        return main.read_output(self.wan.checkpointed(self.wan.unembed, hidden, temb, main.tokens.grid))

    def head_input(self, y_s: torch.Tensor, s: torch.Tensor, r: torch.Tensor,
                   main: MainFeature) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The first head block's input fuse(m, patch_embed(y_s)) and the head's (temb, modulation)."""
        temb, modulation = self.head_time(s, r, main.hidden.dtype)
        y_tokens = self.wan.patchify(y_s.to(main.hidden.dtype), main.tokens.positions)
        return self.fusion(main.hidden, y_tokens, modulation), temb, modulation

    def inner_estimate(self, head: torch.Tensor, main: MainFeature) -> torch.Tensor:
        """The head's estimate of the inner target y: the head itself for y = x1 - x; for y = x (Table 10) the
        outer step's clean estimate x_t - t head, so that the head stays a velocity of the outer flow."""
        if self.inner_target == "velocity":
            return head
        return main.x_t - broadcast_time(main.t, head) * head

    def average_velocity(self, y_s: torch.Tensor, s: torch.Tensor, r: torch.Tensor, main: MainFeature,
                         y1: torch.Tensor) -> torch.Tensor:
        """u_theta(y_s, s, r; m) = y1 - head (Eq. 14); for y = x, (y_s - (x_t - t head)) / s (Table 10's
        parameterization: at initialisation the head at s = t is the teacher's velocity, so the inner flow ends
        at the teacher's clean estimate)."""
        head = self.head(y_s, s, r, main)
        if self.inner_target == "velocity":
            return y1 - head
        return (y_s - self.inner_estimate(head, main)) / broadcast_time(s, y_s)

    # -- inner flow and outer step -----------------------------------------------------------
    def rollout(self, main: MainFeature, y1: torch.Tensor, inner_grid: torch.Tensor) -> torch.Tensor:
        """y_hat from N flow-map steps y_r = y_s - (s - r) u_theta(y_s, s, r; m) along `inner_grid`
        (noise to data), starting at y_{s_N} = y1 and keeping y1 for every step (Eq. 13-14,
        `TMDScheduler.inner_step`)."""
        y = y1
        ones = torch.ones(len(y1), dtype=torch.float64, device=y1.device)
        for s, r in zip(inner_grid[:-1].tolist(), inner_grid[1:].tolist()):
            y = TMDScheduler.inner_step(y, s, r, self.average_velocity(y, s * ones, r * ones, main, y1))
        return y

    def outer_velocity(self, x_t: torch.Tensor, t: torch.Tensor, y_hat: torch.Tensor) -> torch.Tensor:
        """The velocity x1 - x implied by y_hat: y_hat itself, or (x_t - y_hat) / t for y = x."""
        if self.inner_target == "velocity":
            return y_hat
        return (x_t - y_hat) / broadcast_time(t, x_t)

    def transition(self, x_t: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
                   y_hat: torch.Tensor) -> torch.Tensor:
        """x_{t'} = x_t - (t - t') y (Eq. 4, `TMDScheduler.outer_step`)."""
        return TMDScheduler.outer_step(x_t, t, t_next, self.outer_velocity(x_t, t, y_hat))

    def clean_estimate(self, x_t: torch.Tensor, t: torch.Tensor, y_hat: torch.Tensor,
                       kind: str = "transition", noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_hat = x_t - t v(y_hat) (default, docs/method.md Q2), or the literal Eq. 15 x_hat = x1 - y_hat
        with the true outer noise x1 (training only)."""
        if kind == "transition":
            return x_t - broadcast_time(t, x_t) * self.outer_velocity(x_t, t, y_hat)
        if kind == "literal":
            if noise is None:
                raise ValueError("clean_estimate 'literal' needs the outer noise x1")
            return noise - y_hat if self.inner_target == "velocity" else y_hat
        raise ValueError(f"clean_estimate '{kind}' is unknown: use one of {CLEAN_ESTIMATES}")

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y1: torch.Tensor,
                inner_grid: torch.Tensor) -> torch.Tensor:
        """One outer step's y_hat: backbone once, then the N-step head rollout."""
        return self.rollout(self.backbone(x_t, t, context), y1, inner_grid)
