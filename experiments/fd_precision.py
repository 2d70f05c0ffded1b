"""Precision of stage 1's derivative d/ds u_theta(y_s, s, r; m) (the MeanFlow target, Eqs. 9-10) under bf16
training: the finite difference (delta = 5e-3) against the exact derivative (forward-mode JVP in fp64), with
the same backbone feature m held fixed in every row, and the truncation error of the difference itself
(fp64 at smaller delta).

    python experiments/fd_precision.py                                   # one process (a 1-rank FSDP2 mesh)
    torchrun --nproc_per_node 2 experiments/fd_precision.py              # the FSDP2 rows sharded over 2 ranks
    python experiments/fd_precision.py --ckpt <stage-1 last.ckpt>        # default: the pipeline's TMD M2 N2
    python experiments/fd_precision.py --tiny --out <file.md>            # a tiny random student (the tests)

Rows: fp32 (no autocast); bf16-mixed with the difference taken inside autocast (how it ran before) and
with the derivative run in fp32 (`StudentModule.dds`); FSDP2 with bf16 gathered weights and the head gathered
in bf16 or fp32 (`strategy.head_param_dtype`). FSDP runs over gloo on CPU (bf16 weights are rounded the
same way as on a GPU; the kernels differ). Also records the times the head receives under FSDP.
Writes a markdown table and a JSON file (rank 0).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from lightning_tmd.analysis.time_features import keep_slow_time_features
from lightning_tmd.losses import finite_difference_dds, jvp_dds
from lightning_tmd.nets.tmd_student import TMDStudent
from lightning_tmd.schedules import interpolate

PIPELINE_STUDENT = Path("runs/pipeline/shapes/stage1_m2n2/checkpoints/last.ckpt")
S = (0.605, 0.35, 0.95, 0.999)  # inner times: interior, near r, near the top end, at t_max
R = (0.2, 0.0, 0.5, 0.0)
OUTER_T = 0.8
DELTAS = (5e-3, 1e-3, 1e-4, 1e-5)


def tiny_student() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A tiny random student whose time MLPs keep only slow sinusoids (a central difference cannot resolve
    the ~1 rad per unit features random weights use; trained time MLPs are smooth), with random inputs."""
    from lightning_tmd.modules.student import StudentModule

    torch.manual_seed(0)
    config = dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=12, in_channels=3,
                  out_channels=3, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=3)
    module = StudentModule(model={"config": config}, head_blocks=1)
    keep_slow_time_features(module.net)
    g = torch.Generator().manual_seed(1)
    return module, torch.rand((4, 3, 2, 8, 8), generator=g) * 2 - 1, torch.randn(4, 5, 16, generator=g)


def trained_student(path: Path) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A stage-1 checkpoint with four held-out shapes clips and their captions."""
    from lightning_tmd.data.datamodule import VAL_START
    from lightning_tmd.data.shapes import ShapesDataset
    from lightning_tmd.generators import load_generator

    loaded = load_generator(path, ema=False)
    data = loaded.config["data"]
    keys = ("seed", "frames", "size", "max_objects", "speed")
    clips = ShapesDataset(len(S), start=VAL_START, **{k: data[k] for k in keys if k in data})
    items = [clips[i] for i in range(len(S))]
    context = loaded.prompts([item["caption"] for item in items]).states
    return loaded.module, torch.stack([item["video"] for item in items]), context


def start_process_group() -> None:
    """torchrun's process group, or a one-process gloo group (FSDP2 needs one either way)."""
    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    dist.init_process_group("gloo", rank=rank, world_size=world)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def measure(module: torch.nn.Module, x: torch.Tensor, context: torch.Tensor) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from lightning_tmd.parallel import shard_nets

    module = module.float().eval()
    n = len(x)
    g = torch.Generator().manual_seed(2)
    x1, y1 = torch.randn(x.shape, generator=g), torch.randn(x.shape, generator=g)
    t = torch.full((n,), OUTER_T, dtype=torch.float64)
    s, r = torch.tensor(S, dtype=torch.float64), torch.tensor(R, dtype=torch.float64)
    y = module.inner_target(x, x1)
    y_s, v = interpolate(y, y1, s), y1 - y
    with torch.no_grad():
        main = module.net.backbone(interpolate(x, x1, t), t, context).to(torch.float32)  # m, held fixed
        net64 = copy.deepcopy(module.net).double()
        main64, y1_64 = main.to(torch.float64), y1.double()
        exact = jvp_dds(lambda y_, s_: net64.average_velocity(y_, s_, r, main64, y1_64), y_s.double(), s, v.double())
        fp32 = module.dds(main, y1, y_s, s, r, v)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            both = main.select(torch.arange(n).repeat(2))
            inside = finite_difference_dds(
                lambda y_, s_: module.net.average_velocity(y_, s_, torch.cat([r, r]), both, torch.cat([y1, y1])),
                y_s, s, r, v, module.hparams.fd_delta, 0.0, module.hparams.t_max)
            mixed = module.dds(main, y1, y_s, s, r, v)
    rows = {"fp32 (no autocast)": fp32, "bf16-mixed, difference inside autocast (before)": inside,
            "bf16-mixed, derivative in fp32 (now)": mixed}
    with torch.no_grad():  # the truncation error of the difference itself: smaller delta in fp64
        both64 = main64.select(torch.arange(n).repeat(2))
        for delta in DELTAS:
            rows[f"fp64, delta = {delta:g}"] = finite_difference_dds(
                lambda y_, s_: net64.average_velocity(y_, s_, torch.cat([r, r]), both64, torch.cat([y1_64, y1_64])),
                y_s.double(), s, r, v.double(), delta, 0.0, module.hparams.t_max)

    seen = []  # (dtype, values) of the times `head` receives
    head = TMDStudent.head

    def recording_head(self, y_s_, s_, r_, main_):
        seen.append((str(s_.dtype), s_.tolist()))
        return head(self, y_s_, s_, r_, main_)

    TMDStudent.head = recording_head
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    times = {}
    for name, head_dtype in (("FSDP2 bf16, head gathered in bf16", torch.bfloat16),
                             ("FSDP2 bf16, head gathered in fp32", torch.float32)):
        sharded = copy.deepcopy(module)
        shard_nets(sharded, mesh, bf16, True, MixedPrecisionPolicy(param_dtype=head_dtype, reduce_dtype=torch.float32))
        seen.clear()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            rows[name] = sharded.dds(main, y1, y_s, s, r, v)
        times[name] = seen[0]
    TMDStudent.head = head
    return {
        "rows": [{"setting": k, "relative_error_vs_exact": relative(d, exact), "relative_error_vs_fp32_fd":
                  relative(d, fp32)} for k, d in rows.items()],
        "head_times": times, "s": list(S), "r": list(R), "world_size": dist.get_world_size(),
        "exact_norm": float(exact.norm()), "fp32_fd_norm": float(fp32.norm()),
    }


def report(result: dict, model: str, command: str) -> str:
    lines = [
        "# Stage 1's derivative d/ds under bf16 training", "", f"Command: `{command}`", "",
        f"Model: {model}. {len(result['s'])} rows at s = {result['s']}, r = {result['r']}, outer t = {OUTER_T}; "
        f"the same backbone feature m (fp32) in every setting; finite difference delta = 5e-3 unless given; exact: "
        f"forward-mode JVP in fp64. FSDP2 over gloo with {result['world_size']} rank(s), bf16 gathered block "
        "weights; CPU kernels (a GPU rounds the same way, its kernels differ).", "",
        "| setting | relative error vs exact | relative error vs fp32 finite difference |", "|---|---|---|",
    ]
    lines += [f"| {row['setting']} | {row['relative_error_vs_exact']:.3g} | {row['relative_error_vs_fp32_fd']:.3g} |"
              for row in result["rows"]]
    lines += ["", f"Norm of the exact derivative over the batch: {result['exact_norm']:.4g}; of the fp32 difference at "
              f"delta = 5e-3: {result['fp32_fd_norm']:.4g}.", "", "Times the flow head receives under FSDP2 (s):", ""]
    lines += [f"- {name}: {dtype}, {values}" for name, (dtype, values) in result["head_times"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, default=PIPELINE_STUDENT, help="a stage-1 (StudentModule) checkpoint")
    parser.add_argument("--tiny", action="store_true", help="a tiny random student instead of a checkpoint")
    parser.add_argument("--out", type=Path, default=Path("experiments/results/fd_precision.md"))
    args = parser.parse_args()
    if not args.tiny and not args.ckpt.is_file():
        sys.exit(f"--ckpt: no checkpoint at '{args.ckpt}': run the pipeline first (python -m lightning_tmd.pipeline) "
                 "or pass --tiny")
    start_process_group()
    module, x, context = tiny_student() if args.tiny else trained_student(args.ckpt)
    result = measure(module, x, context)
    if dist.get_rank() == 0:
        model = "a tiny random student (smooth time MLPs)" if args.tiny else f"`{args.ckpt}`"
        prefix = "torchrun --nproc_per_node 2 " if result["world_size"] > 1 else "python "
        text = report(result, model, prefix + shlex.join(sys.argv))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
        print(text)
    dist.barrier()  # no rank tears gloo down while another still has work in flight
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
