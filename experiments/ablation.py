"""Stage-2 ablations of TMD M2 N2 at small scale, each against the default recipe from the same stage-1 student,
one pair per pipeline run (training seed):

* `rollout` (Fig. 7): one head call over the whole inner interval [t_max, 0] in training instead of the rollout
  over the N inner steps (`stage.module.rollout=false`, docs/method.md Q6);
* `t_shift` (Table 5): t_dmd uniform on [0.001, 0.999] instead of shifted by 5 (`stage.module.critic.t_shift=1`).

The default students are the pipeline's own `stage2_m2n2`; the ablated ones are trained here with the same
settings but the one override into `runs/ablations/<ablation>_seed<seed>` (skipped when finished), then all are
evaluated on the same held-out prompts and noise (`python -m lightning_tmd.evaluate`).

    python experiments/stage2_ablation.py rollout runs/pipeline/shapes runs/pipeline/shapes_seed1
    python experiments/stage2_ablation.py t_shift runs/pipeline/shapes runs/pipeline/shapes_seed1

The pipeline runs come first (`PIPELINES`, as in docs/results.md, "Two training seeds").
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from benchmarking import write_report

ROOT = Path(__file__).resolve().parents[1]
METRICS = {"fvd": "FVD-shapes ↓", "all_1obj": "adherence 1 obj ↑", "direction_1obj": "direction 1 obj ↑",
           "count": "count ↑", "adherence": "adherence ↑", "size_cv": "size CV ↓", "path_jitter": "path jitter px ↓"}


PIPELINES = ('python -m lightning_tmd.pipeline "pipeline.students=[[2,2],[1,2]]"; python -m lightning_tmd.pipeline '
             "pipeline.name=shapes_seed1 pipeline.seed=1 "
             "pipeline.teacher_ckpt=runs/pipeline/shapes/teacher/checkpoints/last.ckpt "
             '"pipeline.students=[[2,2],[1,2]]"')


@dataclass(frozen=True)
class Ablation:
    title: str
    override: str
    default: str  # the default recipe's row
    ablated: str  # the ablated row


ABLATIONS = {
    "rollout": Ablation("Rollout vs one head call in stage 2 (Fig. 7)", "stage.module.rollout=false",
                        "N = 2 head steps rolled out (default)", "one head call over [t_max, 0]"),
    "t_shift": Ablation("t_dmd shifted by 5 vs uniform in stage 2 (Table 5)", "stage.module.critic.t_shift=1",
                        "t_dmd = shift_5(U) (default)", "t_dmd = U(0.001, 0.999)"),
}


def run(args: list[str]) -> float:
    """Run `python <args>` in the repository; returns its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True)
    return time.perf_counter() - start


def train_ablated(pipeline: Path, override: str, out: Path) -> None:
    """Stage 2 from the pipeline's M2 N2 stage-1 student and teacher, as its stage2_m2n2 was trained but for
    `override`; nothing when `out` already holds a final checkpoint."""
    if (out / "checkpoints" / "last.ckpt").is_file():
        return
    settings = yaml.safe_load((pipeline / "pipeline.yaml").read_text())
    teacher = settings.get("teacher_ckpt") or str(pipeline / "teacher" / "checkpoints" / "last.ckpt")
    run(["-m", "lightning_tmd.train", "experiment=shapes_tmd", f"seed={settings['seed']}",
         f"stage.module.teacher_ckpt={teacher}",
         f"stage.module.student_ckpt={pipeline / 'stage1_m2n2' / 'checkpoints' / 'last.ckpt'}",
         "stage.module.student.outer_steps=2", "stage.module.student.inner_steps=2", override, f"hydra.run.dir={out}"])


def model_override(name: str, ckpt: Path) -> str:
    """The evaluate override of one model sampled at M = 2, N = 2."""
    return f"+models.{name}={{ckpt:'{ckpt}',settings:{{m2n2:{{outer_steps:2,inner_steps:2}}}}}}"


def training_minutes(run_dir: Path) -> float:
    """A finished run's wall time: from its config's writing to its final checkpoint's."""
    start = (run_dir / ".hydra" / "config.yaml").stat().st_mtime
    return ((run_dir / "checkpoints" / "last.ckpt").stat().st_mtime - start) / 60


def cell(values: list[float], digits: int) -> str:
    """The mean, then each value: `58.9 (59.5 / 58.3)`."""
    return f"{statistics.mean(values):.{digits}f} ({' / '.join(f'{v:.{digits}f}' for v in values)})"


def table(rows: dict[str, list[dict]]) -> str:
    """One line per variant: the mean over seeds, then each seed's value."""
    lines = ["| variant | seeds | " + " | ".join(METRICS.values()) + " |", "|---|---|" + "---|" * len(METRICS)]
    for variant, runs in rows.items():
        cells = [cell([r[m] for r in runs], 1 if m == "fvd" else 3) for m in METRICS]
        lines.append(f"| {variant} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ablation", choices=sorted(ABLATIONS))
    parser.add_argument("pipelines", nargs="+", type=Path)
    parser.add_argument("--runs", type=Path, default=Path("runs/ablations"))
    parser.add_argument("--out", help="default: experiments/results/ablation_<ablation>.md")
    parser.add_argument("--note", default="", help="what else ran on the machine meanwhile (written to the report)")
    args = parser.parse_args()
    ablation = ABLATIONS[args.ablation]
    out = args.out or f"experiments/results/ablation_{args.ablation}.md"
    seeds = [yaml.safe_load((p / "pipeline.yaml").read_text())["seed"] for p in args.pipelines]
    ablated = {seed: args.runs / f"{args.ablation}_seed{seed}" for seed in seeds}
    for pipeline, seed in zip(args.pipelines, seeds):
        train_ablated(pipeline, ablation.override, ablated[seed])
    models = {}
    for pipeline, seed in zip(args.pipelines, seeds):
        models[f"default_seed{seed}"] = pipeline / "stage2_m2n2" / "checkpoints" / "last.ckpt"
        models[f"ablated_seed{seed}"] = ablated[seed] / "checkpoints" / "last.ckpt"
    evaluation = args.runs / f"{args.ablation}_eval"
    eval_s = run(["-m", "lightning_tmd.evaluate", "~models.teacher", "references=false", "overwrite=true",
                  f"out_dir={evaluation}", *(model_override(name, path) for name, path in models.items())])
    metrics = json.loads((evaluation / "metrics.json").read_text())
    by_model = {row["model"]: row for row in metrics["rows"]}
    rows = {label: [by_model[f"{kind}_seed{s}"] for s in seeds]
            for kind, label in (("default", ablation.default), ("ablated", ablation.ablated))}
    trained = ", ".join(f"seed {s}: {training_minutes(ablated[s]):.1f} min" for s in seeds)
    body = (f"Students: TMD M = 2, N = 2, H = 2, 1 000 stage-2 iterations (experiment shapes_tmd) from each pipeline "
            f"run's stage-1 student ({', '.join(str(p) for p in args.pipelines)}; training seeds {seeds}); the "
            f"ablated ones with `{ablation.override}`. The pipeline runs: `{PIPELINES}`. "
            f"Evaluation: {metrics['num_samples']} held-out prompts, "
            f"evaluation seed {metrics['seed']}, {metrics['judge'].get('variant', 'outline')} judge, sampled with "
            f"M = 2, N = 2; each cell the mean over seeds, then each seed.\n\n{table(rows)}\n\n"
            f"Wall time on 2 CPU cores: ablated training {trained}; evaluation {eval_s / 60:.1f} min (generated sets "
            f"of earlier evaluations are cached). {args.note}")
    write_report(out, ablation.title, f"python experiments/stage2_ablation.py {args.ablation} "
                 f"{' '.join(str(p) for p in args.pipelines)}", body)
    Path(out).with_suffix(".json").write_text(json.dumps({"seeds": seeds, "override": ablation.override,
                                                          "rows": rows}, indent=1))
    print(Path(out).read_text())


if __name__ == "__main__":
    main()
