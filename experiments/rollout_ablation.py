"""Fig. 7 at small scale: stage 2 of TMD M2 N2 with the flow head rolled out over its N inner steps inside every
outer step (the default) against one head call over the whole inner interval [t_max, 0]
(`stage.module.rollout=false`, docs/method.md Q6), both from the same stage-1 student, one pair per pipeline run
(training seed). The rolled-out students are the pipeline's own `stage2_m2n2`; the one-call students are trained
here with the same settings into `runs/ablations/rollout_off_seed<seed>` (skipped when finished), then all are
evaluated on the same held-out prompts and noise (`python -m lightning_tmd.evaluate`).

    python experiments/rollout_ablation.py runs/pipeline/shapes runs/pipeline/shapes_seed1
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml
from benchmarking import write_report

ROOT = Path(__file__).resolve().parents[1]
METRICS = {"fvd": "FVD-shapes ↓", "all_1obj": "adherence 1 obj ↑", "direction_1obj": "direction 1 obj ↑",
           "count": "count ↑", "adherence": "adherence ↑"}
VARIANTS = {"rollout": "N = 2 head steps rolled out (default)", "one_call": "one head call over [t_max, 0]"}


def run(args: list[str]) -> float:
    """Run `python <args>` in the repository; returns its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True)
    return time.perf_counter() - start


def train_one_call(pipeline: Path, out: Path) -> None:
    """Stage 2 with `rollout=false` from the pipeline's M2 N2 stage-1 student and teacher, as its stage2_m2n2
    was trained; nothing when `out` already holds a final checkpoint."""
    if (out / "checkpoints" / "last.ckpt").is_file():
        return
    settings = yaml.safe_load((pipeline / "pipeline.yaml").read_text())
    teacher = settings.get("teacher_ckpt") or str(pipeline / "teacher" / "checkpoints" / "last.ckpt")
    run(["-m", "lightning_tmd.train", "experiment=shapes_tmd", f"seed={settings['seed']}",
                f"stage.module.teacher_ckpt={teacher}",
                f"stage.module.student_ckpt={pipeline / 'stage1_m2n2' / 'checkpoints' / 'last.ckpt'}",
                "stage.module.student.outer_steps=2", "stage.module.student.inner_steps=2",
                "stage.module.rollout=false", f"hydra.run.dir={out}"])


def model_override(name: str, ckpt: Path) -> str:
    """The evaluate override of one model sampled at M = 2, N = 2."""
    return f"+models.{name}={{ckpt:'{ckpt}',settings:{{m2n2:{{outer_steps:2,inner_steps:2}}}}}}"


def training_minutes(run: Path) -> float:
    """A finished run's wall time: from its config's writing to its final checkpoint's."""
    start = (run / ".hydra" / "config.yaml").stat().st_mtime
    return ((run / "checkpoints" / "last.ckpt").stat().st_mtime - start) / 60


def cell(values: list[float], digits: int) -> str:
    """The mean, then each value: `58.9 (59.5 / 58.3)`."""
    return f"{statistics.mean(values):.{digits}f} ({' / '.join(f'{v:.{digits}f}' for v in values)})"


def table(rows: dict[str, list[dict]]) -> str:
    """One line per variant: the mean over seeds, then each seed's value."""
    lines = ["| variant | seeds | " + " | ".join(METRICS.values()) + " |", "|---|---|" + "---|" * len(METRICS)]
    for variant, runs in rows.items():
        cells = [cell([r[m] for r in runs], 1 if m == "fvd" else 3) for m in METRICS]
        lines.append(f"| {VARIANTS[variant]} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipelines", nargs="+", type=Path)
    parser.add_argument("--runs", type=Path, default=Path("runs/ablations"))
    parser.add_argument("--out", default="experiments/results/ablation_rollout.md")
    parser.add_argument("--note", default="", help="what else ran on the machine meanwhile (written to the report)")
    args = parser.parse_args()
    seeds = [yaml.safe_load((p / "pipeline.yaml").read_text())["seed"] for p in args.pipelines]
    for pipeline, seed in zip(args.pipelines, seeds):
        train_one_call(pipeline, args.runs / f"rollout_off_seed{seed}")
    models = {}
    for pipeline, seed in zip(args.pipelines, seeds):
        models[f"rollout_seed{seed}"] = pipeline / "stage2_m2n2" / "checkpoints" / "last.ckpt"
        models[f"one_call_seed{seed}"] = args.runs / f"rollout_off_seed{seed}" / "checkpoints" / "last.ckpt"
    evaluation = args.runs / "rollout_eval"
    eval_s = run(["-m", "lightning_tmd.evaluate", "~models.teacher", "references=false", "overwrite=true",
                  f"out_dir={evaluation}", *(model_override(name, path) for name, path in models.items())])
    metrics = json.loads((evaluation / "metrics.json").read_text())
    by_model = {row["model"]: row for row in metrics["rows"]}
    rows = {v: [by_model[f"{v}_seed{s}"] for s in seeds] for v in VARIANTS}
    trained = ", ".join(f"seed {s}: {training_minutes(args.runs / f'rollout_off_seed{s}'):.1f} min" for s in seeds)
    body = (f"Students: TMD M = 2, N = 2, H = 2, 1 000 stage-2 iterations (experiment shapes_tmd) from each pipeline "
            f"run's stage-1 student ({', '.join(str(p) for p in args.pipelines)}; training seeds {seeds}). "
            f"Evaluation: {metrics['num_samples']} held-out prompts, evaluation seed {metrics['seed']}, "
            f"{metrics['judge'].get('variant', 'outline')} judge; each cell the mean over seeds, then each seed.\n\n"
            f"{table(rows)}\n\nWall time on 2 CPU cores: one-call training {trained}; evaluation "
            f"{eval_s / 60:.1f} min (generated sets of earlier evaluations are cached). {args.note}")
    write_report(args.out, "Rollout vs one head call in stage 2 (Fig. 7)",
                 f"python experiments/rollout_ablation.py {' '.join(str(p) for p in args.pipelines)}", body)
    Path(args.out).with_suffix(".json").write_text(json.dumps({"seeds": seeds, "rows": rows}, indent=1))
    print((Path(args.out)).read_text())


if __name__ == "__main__":
    main()
