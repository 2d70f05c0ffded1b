"""Per-GPU memory of TMD training (stage 1 and stage 2) on one GPU, under DDP or under FSDP2.

    stage = Stage("dmd", student="tmd", head_blocks=5, inner_steps=2, disc_blocks=(16, 23, 30))
    roles = count_roles(build_stage(WAN21_T2V_1_3B, stage, device="meta"))   # parameters per role
    profile = activation_profile(WAN21_T2V_1_3B, latent=(16, 21, 60, 104), text_tokens=512)
    peak = estimate(roles, profile, stage_updates(stage, 30), Setup("fsdp", gpus=8), checkpoint=True)

Model states are counted per parameter element of the real classes (built on the meta device, so
nothing is allocated): trained roles hold fp32 weights, fp32 gradients and two fp32 AdamW moments,
plus AdamW's 4-byte step counter per parameter tensor; DDP adds its fp32 gradient buckets; FSDP2
divides the states by the number of GPUs and holds bf16 copies of the parameters it has gathered.

Activations are the bytes autograd saves for backward in each part of the network (one Wan block,
the embeddings, the output layer, the fusion layer, a discriminator head), measured with
`saved_tensors_hooks` in bf16 and scaled by the number of passes an update makes through each part.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from diffusers.models.transformers.transformer_wan import WanTransformerBlock
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.distributed._tools.mem_tracker import MemTracker

from lightning_tmd.modules.dmd import DMDModule
from lightning_tmd.modules.student import StudentModule
from lightning_tmd.modules.teacher import TeacherModule
from lightning_tmd.nets.discriminator import Conv3DHead
from lightning_tmd.nets.tmd_student import GatedFusion
from lightning_tmd.nets.wan import WanNet

BF16, FP32, ADAM = 2, 4, 8  # bytes per element: bf16, fp32, AdamW's two fp32 moments

WAN21_T2V_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                      out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
                      cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
WAN21_T2V_14B = {**WAN21_T2V_1_3B, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}
BLOCK_PARTS = ("block", "frozen_block")
# the TMD student's fusion and output layer, per head call: checkpointed with its blocks (`TMDStudent.head`)
HEAD_PARTS = {"head_fusion": "fusion", "head_output": "output"}


# -- what is trained ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    """A training stage as far as memory goes: "tm" (stage 1, TM-MeanFlow) or "dmd" (stage 2) with a
    "tmd" student (flow-head rollout over `inner_steps`) or a "one_pass" one (DMD2-v)."""

    kind: str = "tm"
    student: str = "tmd"
    head_blocks: int = 5
    inner_steps: int = 2
    disc_blocks: tuple[int, ...] = (16, 23, 30)
    disc_widths: tuple[int, int, int] = (256, 512, 512)
    disc_mlp_width: int = 256
    ema: bool = False


@dataclass(frozen=True)
class Role:
    """One network of a stage: "trained", "frozen" (the teacher) or "ema" (a sampling copy)."""

    name: str
    kind: str
    params: int  # parameter elements
    tensors: int  # parameter tensors (AdamW keeps one step counter per tensor)
    block: int  # parameters of its largest Wan block (one FSDP2 unit); 0 without blocks
    root: int  # parameters outside its Wan blocks


def build_stage(config: dict, stage: Stage, device: str | torch.device = "meta") -> StudentModule | DMDModule:
    """The stage's LightningModule from a `WanTransformer3DModel` config, stage 2 with its frozen
    teacher attached (as `DMDModule.configure_model` builds it). On "meta" nothing is allocated."""
    if stage.kind not in ("tm", "dmd"):
        raise ValueError(f"Stage.kind '{stage.kind}' is unknown: use 'tm' (stage 1) or 'dmd' (stage 2)")
    model = {"path": None, "config": config, "dtype": "float32", "checkpoint_blocks": False}
    ema = 0.999 if stage.ema else None
    head = {"head_blocks": stage.head_blocks, "inner_steps": stage.inner_steps}
    with torch.device(device):
        if stage.kind == "tm":
            return StudentModule(model, ema_decay=ema, **head)
        student = {"kind": stage.student, "ema_decay": ema, **(head if stage.student == "tmd" else {})}
        discriminator = {"blocks": list(stage.disc_blocks), "widths": list(stage.disc_widths),
                         "mlp_width": stage.disc_mlp_width}
        module = DMDModule(model, student, critic={"discriminator": discriminator})
        module.teacher = TeacherModule(model, ema_decay=None).eval().requires_grad_(False)
    return module


def role_of(name: str, kind: str, module: nn.Module) -> Role:
    """A network's parameter elements and tensors, its largest Wan block and what lies outside its blocks."""
    params = list(module.parameters())
    blocks = [sum(p.numel() for p in b.parameters()) for b in module.modules() if isinstance(b, WanTransformerBlock)]
    total = sum(p.numel() for p in params)
    return Role(name, kind, total, len(params), max(blocks, default=0), total - sum(blocks))


def count_roles(module: StudentModule | DMDModule) -> list[Role]:
    """The roles of a `StudentModule` (stage 1) or of a `DMDModule` with its teacher (stage 2)."""
    if isinstance(module, DMDModule):
        if module.teacher is None:
            raise ValueError("count_roles: the DMDModule has no teacher yet (build it with build_stage)")
        student = module.student
        roles = [role_of("student", "trained", student.net), role_of("critic", "trained", module.critic.net),
                 role_of("discriminator", "trained", module.critic.discriminator),
                 role_of("teacher", "frozen", module.teacher.net)]
    else:
        student = module
        roles = [role_of("student", "trained", module.net)]
    if student.ema is not None:
        roles.append(role_of("ema", "ema", student.ema.module))
    return roles


# -- how each GPU holds the states ----------------------------------------------------------------
@dataclass(frozen=True)
class Setup:
    """How each GPU holds the states: strategy "single" (one GPU), "ddp" or "fsdp" (FSDP2 per Wan block,
    bf16 param policy, fp32 shards) over `gpus`; `frozen_bytes` per teacher weight (2: bf16; 4: fp32);
    `head_bytes` per gathered weight of a TMD student's root and head blocks under FSDP2
    (`strategy.head_param_dtype`: 4 for fp32, 2 for bf16); `offload`: roles whose shards, gradients and
    optimizer states live in host memory under FSDP2 (`strategy.offload`; their AdamW step runs there too)."""

    strategy: str = "ddp"
    gpus: int = 1
    frozen_bytes: int = BF16
    head_bytes: int = FP32
    offload: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.strategy not in ("single", "ddp", "fsdp"):
            raise ValueError(f"Setup.strategy '{self.strategy}' is unknown: use 'single', 'ddp' or 'fsdp'")
        if self.offload and self.strategy != "fsdp":
            raise ValueError(f"Setup.offload={self.offload}: CPU offload is FSDP2's; use strategy 'fsdp'")

    @property
    def shards(self) -> int:
        return self.gpus if self.strategy == "fsdp" else 1


def state_bytes(roles: list[Role], setup: Setup, held_gradients: tuple[str, ...] | None = None) -> dict[str, float]:
    """Per-GPU weights, gradients, optimizer states (AdamW moments and step counters) and DDP buckets.
    Gradients are counted for the trained roles in `held_gradients` (None: every trained role); stage 2
    frees a role's gradients after its step, so only the updating roles hold them."""
    n = setup.shards
    out = {"weights": 0.0, "gradients": 0.0, "optimizer": 0.0, "ddp_buckets": 0.0}
    for r in roles:
        if r.name in setup.offload:
            continue  # in host memory
        if r.kind == "trained":
            out["weights"] += FP32 * r.params / n
            out["gradients"] += FP32 * r.params / n if held_gradients is None or r.name in held_gradients else 0.0
            out["optimizer"] += ADAM * r.params / n + FP32 * r.tensors
            out["ddp_buckets"] += FP32 * r.params if setup.strategy == "ddp" else 0.0
        else:
            out["weights"] += (setup.frozen_bytes if r.kind == "frozen" else FP32) * r.params / n
    return out


# -- what one iteration runs ------------------------------------------------------------------------
@dataclass(frozen=True)
class Update:
    """One kind of iteration: the roles it trains, the nets it runs, its passes that keep activations
    as (part, count, clips per batch element), and its widest no-grad forward in clips per element."""

    name: str
    trained: tuple[str, ...]
    nets: tuple[str, ...]
    passes: tuple[tuple[str, int, int], ...]
    no_grad_clips: int = 2


def stage_updates(stage: Stage, num_blocks: int) -> list[Update]:
    """Stage 1: the student's forward with grad (backbone, fusion, head); the CFG target and the
    finite difference run without grad on up to 2B clips. Stage 2: the student's update (its
    generator with grad, the teacher's CFG and the fake score without grad, the GAN term through the
    frozen teacher up to its last feature block and the frozen discriminator) and the critic's (fake
    score with grad, discriminator on real and fake, 2B)."""
    L, H, N = num_blocks, stage.head_blocks, stage.inner_steps
    one_pass = (("embed", 1, 1), ("block", L, 1), ("output", 1, 1))
    if stage.kind == "tm":  # backbone once, head once
        return [Update("student", ("student",), ("student",),
                       (("embed", 1, 1), ("block", L, 1), ("head_fusion", 1, 1), ("head_output", 1, 1)))]
    tmd = (("embed", 1, 1), ("block", L - H + N * H, 1), ("head_fusion", N, 1), ("head_output", N, 1))  # N head calls
    nets = ("student", "critic", "teacher", "discriminator")
    gan = (("frozen_embed", 1, 1), ("frozen_block", max(stage.disc_blocks), 1),
           ("frozen_disc", len(stage.disc_blocks), 1))
    student = (tmd if stage.student == "tmd" else one_pass) + gan
    critic = one_pass + (("disc", len(stage.disc_blocks), 2),)
    return [Update("student", ("student",), nets, student), Update("critic", ("critic", "discriminator"), nets, critic)]


# -- activations --------------------------------------------------------------------------------------
def saved_bytes(fn: Callable, *args: torch.Tensor, exclude: tuple[torch.Tensor | nn.Module, ...] = ()) -> int:
    """Bytes of the distinct storages autograd saves for backward while `fn(*args)` runs, leaving out
    the storages of `exclude` (inputs shared with other parts) and the parameters of `fn` and of the
    modules in `exclude`. Works on "meta" too (nothing is computed there)."""
    tensors = [t for t in exclude if isinstance(t, torch.Tensor)]
    tensors += [p for m in (fn, *exclude) if isinstance(m, nn.Module) for p in m.parameters()]
    skip = {t.untyped_storage()._cdata for t in tensors}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in skip:
            seen[storage._cdata] = storage.nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(seen.values())


def no_grad_peak_bytes(fn: Callable, *args: torch.Tensor) -> int:
    """Peak bytes allocated on top of what exists while `fn(*args)` runs without grad (CPU tensors)."""
    tracker = MemTracker()
    flat = [a for arg in (fn, *args) for a in (arg if isinstance(arg, tuple | list) else (arg,))]
    tracker.track_external(*[a for a in flat if isinstance(a, nn.Module | torch.Tensor)])
    with tracker:
        start = tracker.get_tracker_snapshot("current")
        with torch.no_grad():
            fn(*args)
        peak = tracker.get_tracker_snapshot("peak")
    device = torch.device("cpu")
    return peak[device]["Total"] - start[device]["Total"]


@dataclass(frozen=True)
class ActivationProfile:
    """Activation bytes per clip at one latent size and text length: `saved` per part (block,
    frozen_block, embed, frozen_embed, output, fusion, disc, frozen_disc), the peak inside one block's
    no-grad forward, and one block's input (all that a checkpointed block keeps)."""

    saved: dict[str, float]
    block_working: float
    block_input: float

    def scaled(self, factor: float) -> ActivationProfile:
        """Saved and working bytes times `factor` (a calibration); block inputs are exact."""
        return replace(self, saved={k: v * factor for k, v in self.saved.items()},
                       block_working=self.block_working * factor)


def block_measurements(block: nn.Module, rope: nn.Module, tokens: int, text_tokens: int) -> dict[str, float]:
    """Saved bytes of one Wan block trained / frozen, and its no-grad peak, at `tokens` patch tokens and
    `text_tokens`, extrapolated linearly from two small CPU runs with the same text/latent token ratio
    (the block's memory is linear in both: flash attention keeps no token x token matrix)."""
    dim, dtype = block.scale_shift_table.shape[-1], block.scale_shift_table.dtype
    base = 64  # patch tokens of the small run: a latent of 16 frames of 4 x 4 at patch (1, 2, 2)
    base_text = max(1, round(base * text_tokens / tokens))

    def inputs(scale: int, grad: bool) -> tuple:  # hidden, text context, modulation, rotary (cos, sin)
        rotary = rope(torch.zeros(1, 1, 16 * scale, 4, 4))
        return (torch.zeros(1, base * scale, dim, dtype=dtype, requires_grad=True),
                torch.zeros(1, base_text * scale, dim, dtype=dtype, requires_grad=grad),
                torch.zeros(1, 6, dim, dtype=dtype, requires_grad=grad), rotary)

    def run(scale: int) -> dict[str, float]:
        out = {}
        for name, trained in (("block", True), ("frozen_block", False)):
            block.requires_grad_(trained)
            h, context, modulation, rotary = inputs(scale, trained)
            out[name] = saved_bytes(block, h, context, modulation, rotary, exclude=(context, modulation, *rotary))
        block.requires_grad_(True)  # MemTracker hooks every parameter's gradient
        out["block_working"] = no_grad_peak_bytes(block, *inputs(scale, False))
        return out

    small, double = run(1), run(2)
    factor = tokens / base
    return {k: small[k] + (double[k] - small[k]) * (factor - 1) for k in small}


def activation_profile(config: dict, latent: tuple[int, int, int, int], text_tokens: int,
                       disc_widths: tuple[int, int, int] = (256, 512, 512), disc_mlp_width: int = 256,
                       dtype: torch.dtype = torch.bfloat16) -> ActivationProfile:
    """Measure the parts of a Wan of `config` for clips of `latent` (C, T, H, W) and `text_tokens`:
    the block on CPU (see `block_measurements`), everything else on "meta" at the full size. Weights
    and activations in `dtype` (as under FSDP2's bf16 policy); the discriminator in fp32."""
    with torch.device("meta"):
        net = WanNet.from_config({**config, "num_layers": 1}).to(dtype)
        fusion = GatedFusion(net.inner_dim, net.config.ffn_dim).to(dtype)
        head = Conv3DHead(net.inner_dim // (net.patch_size[0] * net.patch_size[1] * net.patch_size[2]),
                          disc_widths, disc_mlp_width)
    tr, dim = net.transformer, net.inner_dim
    pt, ph, pw = net.patch_size
    grid = (latent[1] // pt, latent[2] // ph, latent[3] // pw)
    tokens = grid[0] * grid[1] * grid[2]
    block = tr.blocks[0].to_empty(device="cpu")
    measured = block_measurements(block, tr.rope.to_empty(device="cpu"), tokens, text_tokens)

    def meta(*shape: int, grad: bool = False, kind: torch.dtype = dtype) -> torch.Tensor:
        return torch.zeros(*shape, device="meta", dtype=kind, requires_grad=grad)

    def embed(trained: bool) -> int:  # the teacher's (frozen) embedding gets x_t with grad in the GAN term
        net.requires_grad_(trained)
        x, t, text = meta(1, *latent, grad=not trained), meta(1, kind=torch.float32), meta(1, text_tokens, 4096)
        return saved_bytes(lambda *a: net.embed(*a).hidden, x, t, text, exclude=(net, x, t, text))

    def disc(trained: bool) -> int:  # the discriminator reads fp32 copies of the block features
        head.requires_grad_(trained)
        features = meta(1, dim // (pt * ph * pw), *latent[1:], grad=not trained)
        return saved_bytes(lambda f: head(f.float()), features, exclude=(head,))

    h, temb, modulation = meta(1, tokens, dim, grad=True), meta(1, dim, grad=True), meta(1, 6, dim, grad=True)
    y = meta(1, *latent, grad=True)
    saved = {k: measured[k] for k in BLOCK_PARTS}
    saved.update(embed=embed(True), frozen_embed=embed(False), disc=disc(True), frozen_disc=disc(False))
    net.requires_grad_(True)
    saved["output"] = saved_bytes(lambda a, b: net.unembed(a, b, grid), h, temb, exclude=(net, temb))
    saved["fusion"] = saved_bytes(lambda a, b, c: fusion(a, net.patchify(b), c), h, y, modulation,
                                  exclude=(net, fusion, modulation))
    return ActivationProfile(saved, measured["block_working"], tokens * dim * torch.finfo(dtype).bits // 8)


def activation_bytes(profile: ActivationProfile, update: Update, batch: int = 1, checkpoint: bool = False) -> float:
    """Activations at the peak of `update` with `batch` clips per GPU: what its passes keep for
    backward (with checkpointing a block, and a TMD head call's fusion and output layer, keep only their
    input), plus one block's no-grad working set at the widest batch, plus with checkpointing the saved
    tensors of the largest part recomputed in backward."""
    kept = 0.0
    for part, count, clips in update.passes:
        recomputed = checkpoint and (part in BLOCK_PARTS or part in HEAD_PARTS)
        per_clip = profile.block_input if recomputed else profile.saved[HEAD_PARTS.get(part, part)]
        kept += count * clips * batch * per_clip
    working = profile.block_working * max(update.no_grad_clips, 1) * batch
    recompute = max(profile.saved[part] for part in ("block", "fusion", "output"))
    return kept + working + (recompute * batch if checkpoint else 0.0)


# -- the estimate -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Estimate:
    """Peak bytes on one GPU during `update`: states, working weights (autocast's bf16 weight copies,
    or FSDP2's gathered bf16 parameters), and the larger of activations and AdamW's temporaries."""

    update: str
    states: float
    working_weights: float
    activations: float
    optimizer_temporaries: float

    @property
    def total(self) -> float:
        return self.states + self.working_weights + max(self.activations, self.optimizer_temporaries)


def working_weight_bytes(roles: list[Role], update: Update, setup: Setup) -> float:
    """FSDP2: the bf16 root parameters of every net the update runs (the root stays gathered from
    forward to backward), two gathered blocks (the current one and the prefetched one), and one
    block's unsharded gradients (in the gathered dtype, then fp32 for the reduce-scatter); a TMD student's
    root and head blocks gather in fp32 (`strategy.head_param_dtype`, counted for both in-flight blocks).
    Otherwise bf16 autocast's cached copies of the weights being trained, and with an fp32 teacher the bf16
    casts of its block weights that the GAN term keeps for backward (autocast caches no casts of frozen
    weights)."""
    by_name = {r.name: r for r in roles}
    if setup.strategy == "fsdp":
        nets = [by_name[n] for n in update.nets]
        block = max(r.block for r in nets)
        tmd = any(part in HEAD_PARTS for part, _, _ in update.passes)
        gathered = setup.head_bytes if tmd else BF16
        roots = sum((gathered if r.name == "student" else BF16) * r.root for r in nets)
        return roots + 2 * gathered * block + (gathered + FP32) * block
    copies = BF16 * sum(by_name[n].params for n in update.trained)
    if setup.frozen_bytes == FP32 and "teacher" in by_name:  # autocast's casts of an fp32 teacher's weights,
        frozen_blocks = sum(count for part, count, _ in update.passes if part == "frozen_block")
        copies += BF16 * by_name["teacher"].block * frozen_blocks  # saved for the GAN term's backward
    return copies


def estimate(roles: list[Role], profile: ActivationProfile, updates: list[Update], setup: Setup, batch: int = 1,
             checkpoint: bool = False) -> Estimate:
    """The peak over the stage's updates (foreach AdamW allocates one fp32 temporary per trained
    element of the optimizer that steps, after the activations are freed)."""
    by_name = {r.name: r for r in roles}
    estimates = [
        Estimate(u.name, sum(state_bytes(roles, setup, u.trained).values()), working_weight_bytes(roles, u, setup),
                 activation_bytes(profile, u, batch, checkpoint),
                 FP32 * sum(by_name[n].params for n in u.trained if n not in setup.offload) / setup.shards)
        for u in updates
    ]
    return max(estimates, key=lambda e: e.total)
