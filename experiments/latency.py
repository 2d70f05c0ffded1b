"""Sampling latency of the teacher and the students, side by side in one process, against their effective NFE.

For each model and batch size: one warm-up call, then the median of `--repeats` timed calls of its sampler
(noise to clips, text embeddings precomputed). The timed calls go in rounds, one call of every model and batch
size per round, so that a drift of the machine's speed during the run touches every row alike. The speed-up
over the reference (the first model, e.g. the teacher's 50 CFG steps) is set next to the ratio of effective
NFE: a sampler without overhead beyond its network passes reaches a speed-up equal to that ratio. `s / NFE`
(seconds per batch over effective NFE) shows what one NFE costs: CFG counts two NFE per step but runs them in
one batched forward, which at batch 1 (a latency-bound call) costs about as much as one unguided pass.

Effective NFE counts Wan blocks only (Eq. 16, docs/method.md). The FLOPs of one sampling call (matmuls,
convolutions and attention, `torch.utils.flop_counter`) also count what the NFE leaves out: a TMD student's fusion
layer, patch embedding and output layer per head call. `speed-up / FLOP` compares the measured speed-up with the
ratio of FLOPs: near 1, the sampler runs no work beyond its network layers.

    python experiments/latency.py --out experiments/results/latency.md \
        --model "teacher=runs/pipeline/shapes/teacher/checkpoints/last.ckpt" \
        --model "TMD M2 N2=runs/pipeline/shapes/stage2_m2n2/checkpoints/last.ckpt" \
        --sampler 'TMD M2 N2={"outer_steps": 2}'
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time

import torch
from benchmarking import write_report
from torch.utils.flop_counter import FlopCounterMode

from lightning_tmd.generators import load_generator
from lightning_tmd.sampling import seeded_noise


def counted_flops(case: dict) -> tuple[float, float]:
    """(FLOPs of one sampling call, the share of them in Wan blocks); the call's effective NFE goes to `case`."""
    with FlopCounterMode(display=False) as counter:
        case["nfe"] = float(case["module"].sample(case["positive"], case["negative"], noise=case["noise"],
                                                  **case["sampler"])[1])
    per_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    blocks = sum(v for name, v in per_module.items()
                 if name == "WanTransformerBlock" or re.fullmatch(r".*blocks\.\d+", name))
    total = counter.get_total_flops()
    return float(total), blocks / total


def timed_call(case: dict) -> float:
    """Wall time of one call of the case's sampler."""
    start = time.perf_counter()
    case["module"].sample(case["positive"], case["negative"], noise=case["noise"], **case["sampler"])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="LABEL=CKPT; the first is the reference")
    parser.add_argument("--sampler", action="append", default=[], help="LABEL=JSON sampler overrides")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="experiments/results/latency.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    samplers = {k: json.loads(v) for k, v in (item.rsplit("=", 1) for item in args.sampler)}
    cases = []
    for item in args.model:
        label, ckpt = item.rsplit("=", 1)
        loaded = load_generator(ckpt)
        for batch in args.batch:
            cases.append({"model": label, "batch": batch, "module": loaded.module, "sampler": samplers.get(label, {}),
                          "positive": loaded.prompts(["a red circle moving up"] * batch).states,
                          "negative": loaded.prompts.negative(batch).states,
                          "noise": seeded_noise(list(range(batch)), loaded.clip_shape), "times": []})
    with torch.no_grad():
        for case in cases:  # FLOPs and effective NFE, then a warm-up call
            case["flops"], case["block_share"] = counted_flops(case)
            timed_call(case)
        for _ in range(args.repeats):
            for case in cases:
                case["times"].append(timed_call(case))
    rows = [{"model": c["model"], "sampler": c["sampler"], "nfe": c["nfe"], "batch": c["batch"], "flops": c["flops"],
             "block_share": c["block_share"], "seconds": statistics.median(c["times"]), "times": c["times"]}
            for c in cases]
    for row in rows:
        print(row, flush=True)
    reference = {r["batch"]: r for r in rows if r["model"] == rows[0]["model"]}
    header = ("| model | eff. NFE | batch | s / batch (median) | s / clip | ms / NFE | speed-up | NFE ratio "
              "| speed-up / NFE | GFLOP / clip | in Wan blocks | FLOP ratio | speed-up / FLOP |")
    lines = [header, "|---" * 13 + "|"]
    for r in rows:
        ref = reference[r["batch"]]
        speedup, ratio, flop_ratio = ref["seconds"] / r["seconds"], ref["nfe"] / r["nfe"], ref["flops"] / r["flops"]
        r.update(speedup=speedup, nfe_ratio=ratio, flop_ratio=flop_ratio)
        lines.append(f"| {r['model']} | {r['nfe']:.3g} | {r['batch']} | {r['seconds']:.4f} | "
                     f"{r['seconds'] / r['batch']:.4f} | {1000 * r['seconds'] / r['nfe']:.1f} | "
                     f"{speedup:.1f}x | {ratio:.1f}x | {speedup / ratio:.2f} | {r['flops'] / r['batch'] / 1e9:.3f} | "
                     f"{100 * r['block_share']:.0f} % | {flop_ratio:.1f}x | {speedup / flop_ratio:.2f} |")
    command = "python experiments/latency.py " + " ".join(
        [f'--model "{m}"' for m in args.model] + [f"--sampler '{s}'" for s in args.sampler])
    body = (f"Median of {args.repeats} timed calls after one warm-up, in rounds (one call of every row per round), "
            f"{args.threads} CPU threads, one process, nothing else running; text embeddings precomputed. Speed-up "
            "against the first row at the same batch size. A CFG step counts two NFE but runs them as one forward "
            "pass of a doubled batch.\n\n"
            + "\n".join(lines))
    print(write_report(args.out, "Sampling latency against effective NFE", command, body))
    with open(args.out.removesuffix(".md") + ".json", "w") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
