"""Per-GPU memory of TMD stage 1 (TM-MeanFlow) and stage 2 (DMD2-v with flow-head rollout, and the
DMD2-v baseline) for Wan2.1 T2V 1.3B and 14B under DDP and FSDP2, with and without activation
checkpointing, at the paper's clip size (480 x 832, 81 frames: latent 16 x 21 x 60 x 104 = 32 760
tokens, 512 text tokens) and batch 1 per GPU.

    python experiments/memory_table.py --out experiments/results/memory_table.md

Parameters come from the project's classes built on the meta device; activations from what autograd
saves in one real Wan block (CPU, small token counts, linear in tokens) and in the other parts (meta,
full size), calibrated against the H100 measurements of `experiments/gpu_check.py`
(experiments/results/gpu_check_*.md). See `lightning_tmd/analysis/memory.py`. Takes about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterator

import torch
from benchmarking import write_report
from diffusers.utils import logging as diffusers_logging

from lightning_tmd.analysis.memory import (
    WAN21_T2V_1_3B,
    WAN21_T2V_14B,
    ActivationProfile,
    Estimate,
    Role,
    Setup,
    Stage,
    Update,
    activation_profile,
    build_stage,
    count_roles,
    estimate,
    stage_updates,
    state_bytes,
)
from lightning_tmd.nets.discriminator import Discriminator

GiB = 2**30
LATENT, TEXT_TOKENS = (16, 21, 60, 104), 512
CARD_GIB = 79.6  # what an 80 GB H100 reports (81 559 MiB; an 80 GB A100: 81 920 MiB)
MODELS = {  # config, discriminator feature blocks, its target size (the paper's; docs/method.md Q11), inner steps N
    "Wan2.1 1.3B": (WAN21_T2V_1_3B, (16, 23, 30), 68e6, 2),
    "Wan2.1 14B": (WAN21_T2V_14B, (20, 30, 40), 172e6, 4),
}
STAGES = {"stage 1 TM-MF": ("tm", "tmd"), "stage 2 TMD": ("dmd", "tmd"), "stage 2 DMD2-v": ("dmd", "one_pass")}
HEAD_BLOCKS = 5

# experiments/results/gpu_check_mid.md and gpu_check_wan1.3b_size.md (H100, flash attention): a random
# Wan of 1.3B width with `layers` blocks, latent (16, 5, 30, 52) = 1950 tokens, 512 text tokens.
# gpu_check.py keeps every role in fp32 (the teacher too) under bf16 autocast, on one GPU; its FSDP2
# run shards the stage-1 student per block with a bf16 MixedPrecisionPolicy and no autocast.
GPU_LATENT = (16, 5, 30, 52)
GPU_RUNS = [  # (name, layers, H, stage kind, student, batch, strategy, measured peak GiB); FSDP2 ran without autocast
    ("6 blocks, stage 1 TM-MF, autocast", 6, 1, "tm", "tmd", 2, "single", 9.268),
    ("6 blocks, stage 2 TMD M2 N2, autocast", 6, 1, "dmd", "tmd", 2, "single", 19.376),
    ("6 blocks, stage 2 DMD2-v M2, autocast", 6, 1, "dmd", "one_pass", 2, "single", 17.658),
    ("6 blocks, stage 1 TM-MF, FSDP2 bf16 (1 GPU)", 6, 1, "tm", "tmd", 2, "fsdp", 8.186),
    ("30 blocks, stage 1 TM-MF, autocast", 30, 5, "tm", "tmd", 1, "single", 32.689),
    ("30 blocks, stage 2 TMD M2 N2, autocast", 30, 5, "dmd", "tmd", 1, "single", 69.037),
    ("30 blocks, stage 2 DMD2-v M2, autocast", 30, 5, "dmd", "one_pass", 1, "single", 66.418),
]
CALIBRATION = {"autocast": GPU_RUNS[0][0], "bf16": GPU_RUNS[3][0]}  # the run that fixes each activation factor


def precision_of(run: tuple) -> str:
    """"bf16" (native bf16 compute under FSDP2's policy, no autocast) or "autocast" (bf16 autocast)."""
    return "bf16" if run[6] == "fsdp" else "autocast"


# -- parameters ------------------------------------------------------------------------------------
def discriminator_parameters(in_channels: int, blocks: int, widths: tuple[int, int, int], mlp_width: int) -> int:
    with torch.device("meta"):
        net = Discriminator(list(range(1, blocks + 1)), in_channels, widths, mlp_width)
    return sum(p.numel() for p in net.parameters())


def fit_discriminator(target: float, in_channels: int, blocks: int, mlp_width: int = 256,
                      step: int = 64, widest: int = 1024) -> tuple[tuple[int, int, int], int]:
    """Widths (c2, c3, c3), multiples of `step` with c2 <= c3 (the shape of the default (256, 512, 512)),
    whose discriminator is closest to `target` parameters; returns (widths, parameters)."""
    candidates = [(c2, c3, c3) for c3 in range(step, widest + 1, step) for c2 in range(step, c3 + 1, step)]
    sizes = {w: discriminator_parameters(in_channels, blocks, w, mlp_width) for w in candidates}
    best = min(sizes, key=lambda w: abs(sizes[w] - target))
    return best, sizes[best]


def stage_of(model: str, stage: str, widths: tuple[int, int, int]) -> Stage:
    _, blocks, _, inner = MODELS[model]
    kind, student = STAGES[stage]
    return Stage(kind, student, HEAD_BLOCKS, inner, blocks, widths)


# -- calibration against the GPU runs -------------------------------------------------------------
def gpu_run_estimate(run: tuple, profile: ActivationProfile, factor: float = 1.0) -> Estimate:
    """The estimate for one of `GPU_RUNS`, modelled as gpu_check.py ran it (one GPU, fp32 teacher, a TMD
    student's head gathered in bf16 as the FSDP2 policy had it then)."""
    _, layers, head, kind, student, batch, strategy, _ = run
    config = {**WAN21_T2V_1_3B, "num_layers": layers}
    blocks = tuple(sorted({max(1, layers // 3), max(1, 2 * layers // 3), layers}))  # as gpu_check.py
    stage = Stage(kind, student, head, 2, blocks, (256, 512, 512), 256)
    roles = count_roles(build_stage(config, stage))
    return estimate(roles, profile.scaled(factor), stage_updates(stage, layers),
                    Setup(strategy, gpus=1, frozen_bytes=4, head_bytes=2), batch)


def calibrate(profile: ActivationProfile) -> tuple[dict[str, float], list[tuple]]:
    """Per precision, the factor on activations that makes its calibration run exact; and per GPU run
    (name, measured, a-priori estimate, calibrated estimate) in GiB."""
    factors = {}
    for precision, name in CALIBRATION.items():
        run = next(r for r in GPU_RUNS if r[0] == name)
        e = gpu_run_estimate(run, profile)
        factors[precision] = (run[-1] * GiB - e.states - e.working_weights) / e.activations
    rows = [(run[0], run[-1], gpu_run_estimate(run, profile).total / GiB,
             gpu_run_estimate(run, profile, factors[precision_of(run)]).total / GiB) for run in GPU_RUNS]
    return factors, rows


# -- rendering ---------------------------------------------------------------------------------------
def gib(value: float) -> str:
    return f"{value / GiB:.1f}"


def fits(total: float, budget: float) -> str:
    return "yes" if total <= budget * GiB else ("tight" if total <= CARD_GIB * GiB else "no")


def roles_text(roles: list[Role]) -> str:
    short = {"student": "S", "critic": "C", "discriminator": "D", "teacher": "T", "ema": "E"}
    return " · ".join(f"{short[r.name]} {r.params / 1e9:.3f}" for r in roles)


def parameter_table(roles: dict, widths: dict) -> str:
    lines = ["| model | Wan transformer | TMD student (Wan + fusion + (s−r) embedding) | critic (fake score) | "
             "discriminator (3 heads, widths) | teacher (frozen) | largest block | outside the blocks |",
             "|---|---|---|---|---|---|---|---|"]
    for model in MODELS:
        tmd = {r.name: r for r in roles[(model, "stage 2 TMD")]}
        wan = tmd["teacher"]
        lines.append(f"| {model} | {wan.params:,} | {tmd['student'].params:,} | {tmd['critic'].params:,} | "
                     f"{tmd['discriminator'].params:,} ({', '.join(map(str, widths[model]))}; mlp 256) | "
                     f"{wan.params:,} | {wan.block:,} | {wan.root:,} |")
    return "\n".join(lines)


def profile_table(profiles: dict, factors: dict) -> str:
    lines = ["| model | trained block | frozen block (grad to input) | no-grad working set | fusion | output | "
             "discriminator head | checkpointed block input |", "|---|---|---|---|---|---|---|---|"]
    tokens = math.prod(LATENT[1:]) // 4
    for model, profile in profiles.items():
        s = profile.saved
        kib = [v / tokens / 1024 for v in (s["block"], s["frozen_block"], profile.block_working, s["fusion"],
                                           s["output"], s["disc"], profile.block_input)]
        lines.append(f"| {model} | " + " | ".join(f"{v:.1f}" for v in kib) + " |")
    return "\n".join(lines) + (
        f"\n\nThe tables scale all but the checkpointed block input by ×{factors['autocast']:.3f} (bf16 autocast, "
        f"as `trainer.precision=bf16-mixed` runs DDP and FSDP2) or, in the last column of the fewest-GPUs table, "
        f"×{factors['bf16']:.3f} (native bf16, no autocast); see the check below and the notes.")


def each_stage(stages: dict, roles: dict) -> Iterator[tuple[str, str, list[Role], list[Update]]]:
    """(model, stage name, its roles, its updates) for every model and stage of the tables."""
    for model, (config, *_) in MODELS.items():
        for stage_name in STAGES:
            yield model, stage_name, roles[(model, stage_name)], stage_updates(stages[(model, stage_name)],
                                                                              config["num_layers"])


def memory_table(stages: dict, roles: dict, profiles: dict, factors: dict, gpus: list[int], budget: float) -> str:
    lines = ["| model | stage | strategy | GPUs | act. ckpt | params per role (B) | states | working weights | "
             "activations | AdamW temp. | total GiB / GPU | peak in | fits 80 GB |", "|---" * 13 + "|"]
    for model, stage_name, role_list, updates in each_stage(stages, roles):
        for strategy, n in [("ddp", None), *[("fsdp", g) for g in gpus]]:
            setup = Setup(strategy, n or 1)
            profile = profiles[model].scaled(factors["autocast"])
            for checkpoint in (False, True):
                e = estimate(role_list, profile, updates, setup, 1, checkpoint)
                lines.append(
                    f"| {model} | {stage_name} | {strategy} | {n or 'any'} | {'yes' if checkpoint else 'no'} | "
                    f"{roles_text(role_list)} | {gib(e.states)} | {gib(e.working_weights)} | "
                    f"{gib(e.activations)} | {gib(e.optimizer_temporaries)} | **{gib(e.total)}** | {e.update} | "
                    f"{fits(e.total, budget)} |")
    return "\n".join(lines)


OFFLOADS = {"none": (), "trained roles": ("student", "critic", "discriminator", "ema"),
            "trained roles + teacher": ("student", "critic", "discriminator", "ema", "teacher")}
OFFLOAD_SETTINGS = {"none": "[]", "trained roles": "[student, critic]", "trained roles + teacher":
                    "[student, critic, teacher]"}  # stage 1 (no teacher, no critic): [net, ema]


def offload_table(stages: dict, roles: dict, profiles: dict, factors: dict, gpus: list[int], budget: float) -> str:
    """FSDP2 with activation checkpointing, with and without CPU offload of the trained roles (and teacher)."""
    lines = ["| model | stage | GPUs | offloaded (`strategy.offload`) | states GiB | total GiB / GPU | "
             "host GiB / rank | fits 80 GB |", "|---|---|---|---|---|---|---|---|"]
    for model, stage_name, role_list, updates in each_stage(stages, roles):
        profile = profiles[model].scaled(factors["autocast"])
        teacher = any(r.name == "teacher" for r in role_list)
        for n in gpus:
            for label, offload in OFFLOADS.items():
                if label.endswith("teacher") and not teacher:
                    continue
                setting = OFFLOAD_SETTINGS[label] if teacher or label == "none" else "[net, ema]"
                e = estimate(role_list, profile, updates, Setup("fsdp", n, offload=offload), 1, True)
                host = [r for r in role_list if r.name in offload]
                host_bytes = sum(state_bytes(host, Setup("fsdp", n)).values())
                lines.append(f"| {model} | {stage_name} | {n} | {setting} | {gib(e.states)} | "
                             f"**{gib(e.total)}** | {gib(host_bytes)} | {fits(e.total, budget)} |")
    return "\n".join(lines)


def fewest_gpus_table(stages: dict, roles: dict, profiles: dict, factors: dict, budget: float) -> str:
    lines = ["| model | stage | act. ckpt | DDP fits | fewest FSDP2 GPUs that fit (of 1–64) | same, native bf16 "
             "(no autocast) |", "|---|---|---|---|---|---|"]
    for model, stage_name, role_list, updates in each_stage(stages, roles):
        for checkpoint in (False, True):
            autocast = profiles[model].scaled(factors["autocast"])
            ddp = estimate(role_list, autocast, updates, Setup("ddp"), 1, checkpoint)
            fewest = [next((n for n in range(1, 65)
                            if estimate(role_list, profile, updates, Setup("fsdp", n), 1, checkpoint).total
                            <= budget * GiB), "none")
                      for profile in (autocast, profiles[model].scaled(factors["bf16"]))]
            lines.append(f"| {model} | {stage_name} | {'yes' if checkpoint else 'no'} | "
                         f"{fits(ddp.total, budget)} ({gib(ddp.total)} GiB) | {fewest[0]} | {fewest[1]} |")
    return "\n".join(lines)


def head_layers(stages: dict, profiles: dict, factors: dict, model: str) -> float:
    """Bytes the TMD student's update would keep in its fusion and output layers without checkpointing them,
    less their inputs that checkpointing keeps, one clip."""
    profile = profiles[model].scaled(factors["autocast"])
    kept = profile.saved["fusion"] + profile.saved["output"] - 2 * profile.block_input
    return kept * stages[(model, "stage 2 TMD")].inner_steps


def calibration_table(rows: list[tuple]) -> str:
    lines = ["| GPU run (H100, batch 2 for 6 blocks, 1 for 30) | measured GiB | a priori GiB (error) | "
             "calibrated GiB (error) |", "|---|---|---|---|"]
    for name, measured, prior, calibrated in rows:
        mark = " (calibration run)" if name in CALIBRATION.values() else ""
        lines.append(f"| {name}{mark} | {measured:.2f} | {prior:.2f} ({(prior / measured - 1) * 100:+.1f} %) | "
                     f"{calibrated:.2f} ({(calibrated / measured - 1) * 100:+.1f} %) |")
    return "\n".join(lines)


CHECK_INTRO = """\
`experiments/gpu_check.py` builds every role in fp32 (the stage-2 teacher too) and runs its autocast checks
under bf16 autocast (stage 1: `torch.autocast` around the loss; stage 2: Lightning `bf16-mixed`) with flash
attention only, on one GPU, without DDP; its FSDP2 check shards the stage-1 student per block with
`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)` and no autocast. The check models exactly that
(one GPU, fp32 teacher): autocast's cached bf16 copies of the trained weights and the bf16 casts of the fp32
teacher's blocks that the GAN term saves for backward count as working weights. Random Wan of 1.3B width,
latent (16, 5, 30, 52) = 1950 tokens, 512 text tokens, H = 1 (6 blocks) or 5 (30 blocks), N = 2,
discriminator on blocks L/3, 2L/3, L with widths (256, 512, 512). Measured: `torch.cuda.max_memory_allocated`
(torch 2.11). A priori: the CPU count unscaled; calibrated: scaled by the factor its precision gets."""

NOTES = """\
Assumptions (every number above follows from these):

* **Batch 1 clip per GPU** (the paper's global batch of 64 is reached with more GPUs or gradient
  accumulation, which costs no memory). Clip: latent 16 × 21 × 60 × 104 → 21 × 30 × 52 = 32 760 tokens at
  patch (1, 2, 2); 512 text tokens of width 4096. Flash attention (no token × token matrix).
* **Roles.** Stage 1: the TMD student (H = 5 head blocks) is the only network; it computes its CFG target
  and finite difference with its own weights (no teacher copy, no EMA). Stage 2: student, critic (fake
  score, the teacher's architecture), discriminator (3 Conv3D heads on teacher blocks 15/22/29 for 1.3B,
  19/29/39 for 14B; 21/30/39 costs the same) are trained with AdamW; the teacher is frozen. TMD rolls the
  head out over N = 2 (1.3B) or N = 4 (14B) inner steps with full gradients; λ_GAN > 0, so the student's
  update back-propagates through the frozen teacher's blocks up to the last feature block.
* **States.** Trained weights fp32 (4 B), gradients fp32 (4 B), AdamW moments fp32 (8 B), a 4-byte step
  counter per parameter tensor; gradients of every trained role stay allocated between their updates
  (`zero_grad(set_to_none=True)` runs only just before a role's own backward). Frozen teacher bf16
  (2 B). An EMA would add 4 B per student parameter (÷ GPUs under FSDP2); none is kept here.
* **DDP** (bf16 autocast over fp32 weights): every GPU holds all states, plus DDP's fp32 gradient buckets
  (4 B per trained parameter, `gradient_as_bucket_view=False`), plus autocast's cached bf16 copy of the
  weights of the role being updated (2 B).
* **FSDP2** as `lightning_tmd/parallel.py` and `conf/strategy/fsdp.yaml` set it up (`fully_shard` per
  `WanTransformerBlock`, then per net with its own weights kept gathered from forward to backward; bf16
  `MixedPrecisionPolicy`, fp32 reduce; `trainer.precision=bf16-mixed`, i.e. autocast on top): states ÷
  GPUs; in flight: the bf16 root parameters (everything outside the blocks, fusion layer included) of every
  net the update runs, two gathered blocks (current + prefetch), and one block's unsharded gradients (bf16
  + fp32 for the reduce-scatter); a TMD student's root and head blocks gather in fp32
  (`head_param_dtype: float32`, so that stage 1's derivative runs in fp32). No autocast weight copies (the
  gathered weights are bf16 already).
* **Activations** per clip = Σ over an update's passes of the bytes autograd saves for backward in that
  part, measured on the real modules (`saved_tensors_hooks`, bf16, storages counted once, parameters and
  shared inputs excluded): a trained block, a frozen block with gradient to its input (the GAN term), the
  embeddings, the output layer, the fusion layer, a discriminator head (fp32); plus one block's no-grad
  working set (`MemTracker` peak) at the widest no-grad batch (2 clips: CFG, finite difference, real + fake).
  With **activation checkpointing** (`WanNet.checkpoint_blocks`) a block, and each TMD head call's fusion
  and output layer (`TMDStudent.head`), keep only their bf16 input, and the largest part being recomputed in
  backward adds its saved tensors once ({head_gib:.1f} GiB less than keeping the head's fusion and output
  activations for the 14B TMD student's update, {head_small_gib:.1f} GiB at 1.3B); the embeddings, a one-pass
  output layer and the discriminator are not checkpointed. AdamW's foreach step allocates one fp32 temporary
  per trained element of the stepping optimizer after the activations are freed: the total takes the larger of the two.
* **Calibration.** Blocks are measured on CPU, where RMSNorm runs as a composite that keeps 8 bytes per
  element (fp32 intermediates) where CUDA's fused kernel keeps 2 (the bf16 input): with three token-wide
  RMSNorms per block (q and k of self-attention, q of cross-attention) that alone is 18·D of the CPU count's
  ~92·D bytes per token (a factor 0.80 for native bf16). Under CUDA autocast, though, `rms_norm` is an
  fp32 op (it has an AutocastCUDA kernel, as `layer_norm`): its input is copied to fp32 and kept, so
  autocast keeps about what the CPU composite keeps. The CPU count is scaled by one factor per precision,
  each fitted on one H100 run (see the check): bf16 autocast (every row of the main table, DDP and FSDP2
  alike, since the project trains with `bf16-mixed`; the factor is within 3 % of 1 and predicts the five
  other autocast runs within 2 %), and native bf16 (FSDP2's policy without autocast: the last column of
  the fewest-GPUs table; fitted on the only such run, 6 blocks on one GPU, not cross-checked).
* **Fits 80 GB**: "yes" ≤ {budget} GiB, leaving ~{headroom:.1f} GiB of the {card} GiB an 80 GB card reports for
  the CUDA context, NCCL buffers and allocator fragmentation; "tight" up to {card} GiB; "no" above.
* **CPU offload** (`strategy.offload`, FSDP2's `CPUOffloadPolicy`): the offloaded roles' fp32 shards,
  gradients and AdamW states live in host memory (counted per rank in the offload table) and their optimizer
  steps on the CPU; each unit's weights come to the GPU while gathered (the working weights are unchanged).
  The main table assumes none. It costs host-device copies of every gathered unit and its gradients, and a
  CPU AdamW step; its speed is not measured here.
* **Levers not assumed**: DDP's `gradient_as_bucket_view=True` makes the buckets hold the gradients (−4 B per
  trained parameter). The bf16 teacher beside fp32 trained roles is
  `stage.module.teacher_dtype=bfloat16` (the Wan stage-2 experiments); an fp32 teacher adds 2 B per teacher
  parameter.
* Not counted: the data batch and latent-size tensors (~10 MB per clip), CUDA/NCCL workspaces, the
  allocator's rounding. "Peak in" names the update with the larger total: in stage 2 almost always the
  student's (it holds the rollout and the GAN path through the teacher).
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="experiments/results/memory_table.md")
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 64], help="FSDP2 world sizes of the table")
    parser.add_argument("--budget-gib", type=float, default=75.0, help="what 'fits 80 GB' allows per GPU")
    args = parser.parse_args()
    diffusers_logging.set_verbosity_error()  # casting a meta-built Wan to bf16 warns about its fp32 modules
    if not 0 < args.budget_gib <= CARD_GIB:
        raise ValueError(f"--budget-gib={args.budget_gib}: use a value in (0, {CARD_GIB}] (an 80 GB card)")
    if min(args.gpus) < 1:
        raise ValueError(f"--gpus {args.gpus}: FSDP2 world sizes must be >= 1")

    widths = {}
    for model, (config, blocks, target, _) in MODELS.items():
        in_channels = config["num_attention_heads"] * config["attention_head_dim"] // math.prod(config["patch_size"])
        widths[model], _ = fit_discriminator(target, in_channels, len(blocks))
    stages = {(m, s): stage_of(m, s, widths[m]) for m in MODELS for s in STAGES}
    roles = {key: count_roles(build_stage(MODELS[key[0]][0], stage)) for key, stage in stages.items()}

    factors, calibration_rows = calibrate(activation_profile(WAN21_T2V_1_3B, GPU_LATENT, TEXT_TOKENS))
    profiles = {m: activation_profile(config, LATENT, TEXT_TOKENS, widths[m]) for m, (config, *_) in MODELS.items()}

    gpus = ", ".join(map(str, args.gpus))
    body = "\n\n".join([
        f"Per-GPU peak memory (GiB) at batch 1, 480 × 832 × 81 frames (32 760 tokens), FSDP2 on {gpus} GPUs. "
        "Roles: S student, C critic, D discriminator, T teacher (frozen), in billions of parameters.",
        memory_table(stages, roles, profiles, factors, args.gpus, args.budget_gib),
        "## Fewest GPUs\n\n" + fewest_gpus_table(stages, roles, profiles, factors, args.budget_gib),
        "## FSDP2 CPU offload (`strategy.offload`), with activation checkpointing\n\n"
        + offload_table(stages, roles, profiles, factors, args.gpus, args.budget_gib),
        "## Parameters (from the classes, built on the meta device)\n\n" + parameter_table(roles, widths)
        + "\n\nDiscriminator widths fitted to the paper's sizes (68 M, 172 M; docs/method.md Q11) over (c2, c3, c3), "
        "multiples of 64, mlp_width 256: " + "; ".join(f"{m}: `widths: [{', '.join(map(str, w))}]`, `mlp_width: 256`"
                                             for m, w in widths.items()) + ".",
        "## Activations per token and clip (KiB, a priori CPU count)\n\n" + profile_table(profiles, factors),
        "## Check against the H100 runs\n\n" + CHECK_INTRO + "\n\n" + calibration_table(calibration_rows),
        "## Notes\n\n" + NOTES.format(budget=args.budget_gib, card=CARD_GIB, headroom=CARD_GIB - args.budget_gib,
                                       head_gib=head_layers(stages, profiles, factors, "Wan2.1 14B") / GiB,
                                       head_small_gib=head_layers(stages, profiles, factors, "Wan2.1 1.3B") / GiB),
    ])
    gpu_flags = " ".join(map(str, args.gpus))
    command = f"python experiments/memory_table.py --gpus {gpu_flags} --budget-gib {args.budget_gib:g} --out {args.out}"
    print(write_report(args.out, "Per-GPU memory of TMD training, Wan2.1 1.3B / 14B", command, body))


if __name__ == "__main__":
    main()
