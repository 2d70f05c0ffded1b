"""Teacher variants side by side at a fixed wall-clock budget, every checkpoint scored by the shapes judge.

Each variant is `python -m lightning_tmd.train stage=teacher experiment=<--experiment> <its overrides>` in
its own process, all started at once (they share the GPU when there is one) and stopped by
`trainer.max_time`, with a checkpoint every `--every` steps. Then every checkpoint is scored, one process
per variant: 50-step CFG samples of `--samples` held-out prompts (fixed seeds) -> the judge's accuracy
per attribute and FVD-shapes. The table puts accuracy against steps and clips seen, and, with
`--cpu-cost`, against the minutes the same steps take on this machine's CPU (measured here).

    python experiments/teacher_sweep.py --minutes 5 --variants base,patch8_bs32 --root runs/teacher_sweep
    python experiments/teacher_sweep.py --cpu-cost --variants all --root runs/teacher_sweep   # CPU s/step only
    python experiments/teacher_sweep.py --report --root runs/teacher_sweep --out experiments/results/teacher_sweep.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from benchmarking import show_and_save

ROOT = Path(__file__).resolve().parents[1]
# name -> overrides of experiment=shapes_teacher_base (batch 8, 8x32x32 clips, patch (1,4,4): 512 tokens)
VARIANTS: dict[str, list[str]] = {
    "base": [],
    "tpatch2_bs16": ["model.config.patch_size=[2,4,4]", "data.batch_size=16"],
    "patch8_bs32": ["model.config.patch_size=[1,8,8]", "data.batch_size=32"],
    "t2p8_bs64": ["model.config.patch_size=[2,8,8]", "data.batch_size=64"],
    "patch8_bs32_lr2e-3": ["model.config.patch_size=[1,8,8]", "data.batch_size=32", "stage.module.optim.lr=2e-3"],
    "patch8_bs32_w192": ["model.config.patch_size=[1,8,8]", "data.batch_size=32",
                         "model.config.num_attention_heads=6", "model.config.ffn_dim=384"],
    "patch8_bs32_shift3": ["model.config.patch_size=[1,8,8]", "data.batch_size=32",
                           "stage.module.time_sampling=shifted_uniform", "stage.module.time_shift=3.0"],
    "patch8_bs32_vocab": ["model.config.patch_size=[1,8,8]", "data.batch_size=32", "text=vocab"],
    "positions_shift3": ["model.position_frequencies=3", "model.config.in_channels=21",
                         "stage.module.time_sampling=shifted_uniform", "stage.module.time_shift=3.0"],
    # on top of --experiment shapes_teacher_motion (speed 0.09, position planes, shift-3 t)
    "bs32": ["data.batch_size=32"],
    "tpatch2_bs32": ["model.config.patch_size=[2,4,4]", "data.batch_size=32"],
    "shift8_bs32": ["data.batch_size=32", "stage.module.time_shift=8.0"],
    "bs128": ["data.batch_size=128"],
    # on top of --experiment shapes_teacher_edm_high_noise (EDM preconditioning), 60 % of t in U(0.95, 1)
    "hn095": ["stage.module.high_noise_fraction=0.6", "stage.module.high_noise_min=0.95"],
    "hn095_vocab": ["stage.module.high_noise_fraction=0.6", "stage.module.high_noise_min=0.95", "text=vocab"],
    "hn095_bs32": ["stage.module.high_noise_fraction=0.6", "stage.module.high_noise_min=0.95", "data.batch_size=32"],
    "hn095_bs32_vocab": ["stage.module.high_noise_fraction=0.6", "stage.module.high_noise_min=0.95",
                         "data.batch_size=32", "text=vocab"],
}


def batch_size_of(overrides: list[str]) -> int:
    sizes = [int(o.split("=")[1]) for o in overrides if o.startswith("data.batch_size=")]
    return sizes[-1] if sizes else 8


def train_command(name: str, root: Path, minutes: float, every: int, extra: list[str], minilm: str | None = None,
                  experiment: str = "shapes_teacher_base", workers: int | None = None) -> list[str]:
    overrides = VARIANTS[name]
    if minilm and not any(o.startswith("text=") for o in overrides):
        overrides = [*overrides, f"text.encoder.path={minilm}"]
    if workers is None:
        workers = max(1, batch_size_of(overrides) // 16)  # shapes clips are drawn on the CPU: ~5 ms each
    return [sys.executable, "-m", "lightning_tmd.train", "stage=teacher", f"experiment={experiment}",
            f"run_name=sweep_{name}", f"hydra.run.dir={root / name}", "trainer.max_steps=1000000",
            max_time(minutes),
            f"callbacks.checkpoint.every_n_train_steps={every}", "~callbacks.samples", "~callbacks.progress",
            "+trainer.enable_progress_bar=false", "trainer.log_every_n_steps=50", f"data.num_workers={workers}",
            *overrides, *extra]


def max_time(minutes: float) -> str:
    """Lightning's `max_time` override, DD:HH:MM:SS."""
    seconds = int(round(minutes * 60))
    return f"trainer.max_time=00:{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def run_all(commands: dict[str, list[str]], logs: dict[str, Path], threads: int) -> dict[str, int]:
    """Start every command at once, wait for all; return exit codes (a failed one prints its log's end)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    procs = {}
    for name, command in commands.items():
        logs[name].parent.mkdir(parents=True, exist_ok=True)
        procs[name] = subprocess.Popen(command, cwd=ROOT, env=env, stdout=logs[name].open("w"),
                                       stderr=subprocess.STDOUT)
    codes = {name: proc.wait() for name, proc in procs.items()}
    for name, code in codes.items():
        if code:
            print(f"[{name}] exited with {code}; log tail:\n" + "\n".join(logs[name].read_text().splitlines()[-15:]))
    return codes


def checkpoints_to_score(run: Path, eval_every: int) -> list[tuple[int, Path]]:
    """(step, path) of the periodic checkpoints at multiples of `eval_every`, plus the last one."""
    picked = {}
    for path in sorted((run / "checkpoints").glob("step_*.ckpt")):
        step = int(path.stem.split("_")[1].split("-")[0])
        if step % eval_every == 0:
            picked.setdefault(step, path)
    last = run / "checkpoints" / "last.ckpt"
    if last.is_file():
        picked.setdefault(int(torch.load(last, map_location="cpu", weights_only=False)["global_step"]), last)
    return sorted(picked.items())


def score_run(run: Path, judge_path: str, samples: int, eval_every: int, device: str) -> list[dict]:
    """Judge scores of every chosen checkpoint of one run (written to `<run>/scores.json` as they come)."""
    from lightning_tmd.data.shapes import clip_key, clip_settings
    from lightning_tmd.generators import load_generator
    from lightning_tmd.metrics.benchmark import held_out_set, quality
    from lightning_tmd.metrics.judge import JudgeFeatures, load_judge
    from lightning_tmd.metrics.video import frechet_video_distance, update_in_batches
    from lightning_tmd.sampling import sample_clips
    from lightning_tmd.video import to_uint8

    rows = []
    for step, path in checkpoints_to_score(run, eval_every):
        loaded = load_generator(path, device)
        data = clip_settings(loaded.config["data"])
        if not rows:
            judge, _ = load_judge(judge_path, clip_key(data))
            real = held_out_set(data, samples, offset=0)
            fvd = frechet_video_distance(JudgeFeatures(judge))
            update_in_batches(fvd, real["videos"], real=True)
        start = time.perf_counter()
        clips, _ = sample_clips(loaded.module, loaded.prompts, real["captions"], list(range(samples)),
                                loaded.clip_shape, batch_size=128)
        videos = to_uint8(clips).permute(0, 4, 1, 2, 3).float() / 127.5 - 1  # scored as written to disk
        batch = int(loaded.config["data"]["batch_size"])
        rows.append({"step": step, "clips_seen": step * batch, "sample_s": time.perf_counter() - start,
                     **quality(judge, fvd, videos, real["labels"])})
        print(run.name, {k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
        (run / "scores.json").write_text(json.dumps(rows, indent=2))
    return rows


def cpu_step_seconds(experiment: str, overrides: list[str], steps: int = 10) -> float:
    """Median seconds of one training step on this machine's CPU (data drawing included)."""
    from teacher_speed import teacher_training, train_step_times

    _, _, module, optimizer, next_batch = teacher_training(["stage=teacher", f"experiment={experiment}",
                                                            *overrides])
    return statistics.median(train_step_times(module, optimizer, next_batch, steps, with_data=True))


def report(root: Path, names: list[str]) -> str:
    """Markdown: one row per scored checkpoint, grouped by variant."""
    costs_file = root / "cpu_costs.json"
    costs = json.loads(costs_file.read_text()) if costs_file.is_file() else {}
    lines = ["| variant | overrides | step | clips seen | CPU min | FVD-shapes ↓ | adherence | count | colour | shape "
             "| direction | size CV ↓ | path jitter px ↓ |", "|" + "---|" * 13]
    for name in names:
        scores = root / name / "scores.json"
        if not scores.is_file():
            lines.append(f"| {name} | {' '.join(VARIANTS[name]) or '–'} | no scores | | | | | | | | | | |")
            continue
        for r in json.loads(scores.read_text()):
            cpu = f"{r['step'] * costs[name] / 60:.0f}" if name in costs else "–"
            jitter = f"{r['path_jitter']:.2f}" if "path_jitter" in r else "–"  # scored before the metric existed
            lines.append(f"| {name} | {' '.join(VARIANTS[name]) or '–'} | {r['step']} | {r['clips_seen']} | {cpu} "
                         f"| {r['fvd']:.1f} | {r['adherence']:.3f} | {r['count']:.3f} | {r['color']:.3f} "
                         f"| {r['shape']:.3f} | {r['direction']:.3f} | {r['size_cv']:.3f} | {jitter} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="all", help="comma-separated names of VARIANTS, or all")
    parser.add_argument("--root", default="runs/teacher_sweep")
    parser.add_argument("--experiment", default="shapes_teacher_base", help="the experiment every variant overrides")
    parser.add_argument("--workers", type=int, default=None,
                        help="data workers per variant (default: one per 16 clips of a batch)")
    parser.add_argument("--minutes", type=float, default=5.0, help="training wall time of every variant")
    parser.add_argument("--every", type=int, default=500, help="checkpoint interval (steps)")
    parser.add_argument("--eval-every", type=int, default=1000, help="score checkpoints at multiples of this")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--judge", default=".cache/lightning_tmd/judge_8x32_o2.pt")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process")
    parser.add_argument("--minilm", default=None, help="a local copy of all-MiniLM-L6-v2 (text.encoder.path)")
    parser.add_argument("--out", default=None, help="also write the table here")
    parser.add_argument("--cpu-cost", action="store_true", help="only measure CPU seconds per step")
    parser.add_argument("--report", action="store_true", help="only write the table of what is scored")
    parser.add_argument("--score", default=None, help=argparse.SUPPRESS)  # one run folder, in its own process
    parser.add_argument("extra", nargs="*", help="overrides given to every variant (e.g. text.encoder.path=...)")
    args = parser.parse_args()
    root = Path(args.root).resolve()
    names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
    if args.score:
        torch.set_num_threads(args.threads)
        score_run(Path(args.score), args.judge, args.samples, args.eval_every, args.device)
        return
    if args.cpu_cost:
        torch.set_num_threads(args.threads)
        costs = {name: cpu_step_seconds(args.experiment, VARIANTS[name] + args.extra) for name in names}
        root.mkdir(parents=True, exist_ok=True)
        (root / "cpu_costs.json").write_text(json.dumps(costs, indent=2))
        print(costs)
        return
    if not args.report:
        if not Path(args.judge).is_file():
            parser.error(f"--judge: no judge at '{args.judge}' (python -m lightning_tmd.evaluate trains one)")
        taken = [n for n in names if (root / n).exists()]
        if taken:
            parser.error(f"--root: {root} already holds runs {taken}: remove them or give another --root")
        started = time.perf_counter()
        run_all({n: train_command(n, root, args.minutes, args.every, args.extra, args.minilm, args.experiment,
                                  args.workers) for n in names},
                {n: root / n / "train.log" for n in names}, args.threads)
        print(f"trained in {time.perf_counter() - started:.0f} s", flush=True)
        score = [sys.executable, __file__, "--judge", str(Path(args.judge).resolve()), "--samples", str(args.samples),
                 "--eval-every", str(args.eval_every), "--device", args.device, "--threads", str(args.threads)]
        run_all({n: [*score, "--score", str(root / n)] for n in names}, {n: root / n / "score.log" for n in names},
                args.threads)
        print(f"trained and scored in {time.perf_counter() - started:.0f} s", flush=True)
    show_and_save(report(root, names), args.out)


if __name__ == "__main__":
    main()
