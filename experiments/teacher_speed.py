"""Seconds per teacher training step, sampling latency and peak memory on this machine.

    python experiments/teacher_speed.py                      # shapes_teacher and shapes_smoke
    python experiments/teacher_speed.py --steps 20 --out experiments/results/teacher_speed.md

Each experiment is measured in a fresh subprocess (so peak RSS is its own): the median of `--steps`
timed training steps (forward + backward + the experiment's optimizer step, after 3 warm-up steps) on real
shapes batches with cached text, the forward alone, and one 50-step CFG sample of 8 clips.
"""

from __future__ import annotations

import resource
import statistics
import time
from pathlib import Path

import torch
from benchmarking import benchmark_arguments, run_benchmark

CONF = Path(__file__).resolve().parents[1] / "conf"


def teacher_training(overrides: list[str]):
    """(cfg, datamodule, module, optimizer, next_batch) of `python -m lightning_tmd.train` with `overrides`."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, "output_dir=/tmp"])
    torch.manual_seed(0)
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.stage.module, _convert_="all")
    optimizer = module.configure_optimizers()["optimizer"]
    batches = iter(datamodule.train_dataloader())

    def next_batch():
        return datamodule.on_before_batch_transfer(next(batches), 0)

    return cfg, datamodule, module, optimizer, next_batch


def train_step_times(module, optimizer, next_batch, steps: int, with_data: bool = False,
                     warmup: int = 3) -> list[float]:
    """Seconds of `steps` flow-matching optimizer steps (+ EMA) after `warmup` untimed ones; `with_data`
    also times drawing and embedding the batch."""
    times = []
    for i in range(steps + warmup):
        start = time.perf_counter()
        batch = next_batch()
        if not with_data:
            start = time.perf_counter()
        x = batch["video"]
        t = torch.rand(len(x), dtype=torch.float64)
        loss = module.flow_loss(batch, t, torch.randn_like(x), batch["context"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        module.update_ema()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def measure(experiment: str, steps: int) -> dict:
    cfg, datamodule, module, optimizer, next_batch = teacher_training([f"experiment={experiment}"])
    train_times = train_step_times(module, optimizer, next_batch, steps)
    forward_times = []
    with torch.no_grad():
        for _ in range(5):
            batch = next_batch()
            start = time.perf_counter()
            module.velocity(batch["video"], torch.full((len(batch["video"]),), 0.5), batch["context"])
            forward_times.append(time.perf_counter() - start)
    prompts = datamodule.prompts(["a red circle moving up"] * 8)
    negative = datamodule.prompts.negative(8)
    start = time.perf_counter()
    _, nfe = module.sample(prompts.states, negative.states, shape=datamodule.clip_shape, steps=50)
    sample_time = time.perf_counter() - start
    tokens = 1
    for size, patch in zip(datamodule.clip_shape[1:], cfg.model.config.patch_size):
        tokens *= size // patch
    return {
        "experiment": experiment,
        "params_M": sum(p.numel() for p in module.net.parameters()) / 1e6,
        "clip": "x".join(map(str, datamodule.clip_shape)),
        "tokens": tokens,
        "batch": datamodule.batch_size,
        "train_step_s": statistics.median(train_times),
        "forward_s": statistics.median(forward_times),
        "sample_8_clips_s": sample_time,
        "sample_nfe": nfe,
        "peak_rss_GB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "threads": torch.get_num_threads(),
    }


def table(rows: list[dict]) -> str:
    head = ("| experiment | params (M) | clip C×T×H×W | tokens | batch | s / train step | s / forward | "
            "s / 8 samples (50 steps, CFG) | NFE | peak RSS (GB) | threads |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['experiment']} | {r['params_M']:.2f} | {r['clip']} | {r['tokens']} | {r['batch']} | "
            f"{r['train_step_s']:.3f} | {r['forward_s']:.3f} | {r['sample_8_clips_s']:.1f} | {r['sample_nfe']} | "
            f"{r['peak_rss_GB']:.2f} | {r['threads']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = benchmark_arguments(__doc__, 20, "experiments/results/teacher_speed.md")
    parser.add_argument("--experiments", nargs="+", default=["shapes_teacher", "shapes_smoke"])
    args = parser.parse_args()
    run_benchmark(__file__, args, measure, args.experiments, "Teacher speed on this machine", table)


if __name__ == "__main__":
    main()
