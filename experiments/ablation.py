"""Ablations of TMD M2 N2 at small scale, each against the default recipe, one pair per pipeline run (training seed).

Stage-2 ablations start from the pipeline's own stage-1 student; stage-1 ablations train their own stage 1 and
then the default stage 2 from it (stage 2 takes the student's shape from its stage-1 checkpoint):

* `rollout` (Fig. 7): one head call over the whole inner interval [t_max, 0] in stage 2 instead of the rollout
  over the N inner steps (`stage.module.rollout=false`, docs/method.md Q6);
* `t_shift` (Table 5): t_dmd uniform on [0.001, 0.999] instead of shifted by 5 (`stage.module.critic.t_shift=1`);
* `gan_weight`: the GAN term's weight lambda 0.3 instead of the paper's 0.03 in stage 2;
* `tm` (Table 6): stage 1 as transition matching (r = s for the whole batch) instead of TM-MeanFlow;
* `fusion` (Table 9): concat instead of gated fusion of the main feature into the head;
* `outer_shift`: the outer grid's shift gamma 3 instead of 10 in stage 1 (sampling too: stage 2 and the sampler
  take it from the stage-1 checkpoint);
* `inner_target` (Table 10): inner target y = x (the head read as u = (y_s - (x_t - t head)) / s) instead of
  y = x1 - x.

The default students are the pipeline's `stage1_m2n2` / `stage2_m2n2`; the ablated ones are trained here with the
same settings but the one override into `runs/ablations/<ablation>_seed<seed>/{stage1,stage2}` (each skipped when
finished), then all are evaluated on the same held-out prompts and noise (`python -m lightning_tmd.evaluate`);
stage-1 ablations report the stage-1 students too.

    python experiments/ablation.py rollout runs/pipeline/shapes runs/pipeline/shapes_seed1

The pipeline runs come first (`PIPELINES`, as in docs/results.md, "Two training seeds").
"""

from __future__ import annotations

import argparse
import json
import re
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
    stage: int  # the stage the override changes (1: stage 1 is retrained, then stage 2 from it)
    override: str
    default: str  # the default recipe's row
    ablated: str  # the ablated row


ABLATIONS = {
    "rollout": Ablation("Rollout vs one head call in stage 2 (Fig. 7)", 2, "stage.module.rollout=false",
                        "N = 2 head steps rolled out (default)", "one head call over [t_max, 0]"),
    "t_shift": Ablation("t_dmd shifted by 5 vs uniform in stage 2 (Table 5)", 2, "stage.module.critic.t_shift=1",
                        "t_dmd = shift_5(U) (default)", "t_dmd = U(0.001, 0.999)"),
    "gan_weight": Ablation("GAN weight 0.03 vs 0.3 in stage 2", 2, "stage.module.gan_weight=0.3",
                           "lambda = 0.03 (default)", "lambda = 0.3"),
    "tm": Ablation("TM-MeanFlow vs TM in stage 1 (Table 6)", 1, "stage.module.objective=tm",
                   "TM-MF (default)", "TM (r = s)"),
    "fusion": Ablation("Gated vs concat fusion (Table 9)", 1, "stage.module.fusion=concat",
                       "gated (default)", "concat"),
    "outer_shift": Ablation("Outer-grid shift 10 vs 3 in stage 1", 1, "stage.module.outer_shift=3",
                            "outer shift 10 (default)", "outer shift 3"),
    "inner_target": Ablation("Inner target y = x1 - x vs y = x (Table 10)", 1, "stage.module.inner_target=sample",
                             "y = x1 - x (default)", "y = x"),
}


def run(args: list[str]) -> float:
    """Run `python <args>` in the repository; returns its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True)
    return time.perf_counter() - start


def finished(run_dir: Path) -> bool:
    return (run_dir / "checkpoints" / "last.ckpt").is_file()


def pipeline_seed_and_teacher(pipeline: Path) -> tuple[int, str]:
    """A pipeline run's training seed and its teacher's final checkpoint."""
    settings = yaml.safe_load((pipeline / "pipeline.yaml").read_text())
    return settings["seed"], settings.get("teacher_ckpt") or str(pipeline / "teacher" / "checkpoints" / "last.ckpt")


def train_stage1(pipeline: Path, overrides: list[str], out: Path, outer_steps: int = 2, inner_steps: int = 2) -> None:
    """Stage 1 from the pipeline's teacher with its seed, as its stage1_m2n2 was trained but for the grid and
    `overrides`; nothing when `out` already holds a final checkpoint."""
    if finished(out):
        return
    seed, teacher = pipeline_seed_and_teacher(pipeline)
    run(["-m", "lightning_tmd.train", "experiment=shapes_tmd_stage1", f"seed={seed}",
         f"stage.module.teacher_ckpt={teacher}", f"stage.module.outer_steps={outer_steps}",
         f"stage.module.inner_steps={inner_steps}", *overrides, f"hydra.run.dir={out}"])


def train_stage2(pipeline: Path, student: Path, overrides: list[str], out: Path) -> None:
    """Stage 2 from the stage-1 student `student` and the pipeline's teacher with its seed, as the pipeline's
    stage2_m2n2 was trained but for `overrides`; nothing when `out` already holds a final checkpoint."""
    if finished(out):
        return
    seed, teacher = pipeline_seed_and_teacher(pipeline)
    run(["-m", "lightning_tmd.train", "experiment=shapes_tmd", f"seed={seed}", f"stage.module.teacher_ckpt={teacher}",
         f"stage.module.student_ckpt={student}", *overrides, f"hydra.run.dir={out}"])


def model_override(name: str, ckpt: Path, outer_steps: int = 2, inner_steps: int = 2) -> str:
    """The evaluate override of one model sampled at M = outer_steps, N = inner_steps."""
    return (f"+models.{name}={{ckpt:'{ckpt}',settings:{{m{outer_steps}n{inner_steps}:"
            f"{{outer_steps:{outer_steps},inner_steps:{inner_steps}}}}}}}")


def training_minutes(run_dir: Path) -> float:
    """A finished run's wall time: the sum of the `Wall time: H:MM:SS` lines its train.log holds (one per start, so a
    resumed run counts every part); for a run without them, from its config's writing to its final checkpoint's."""
    log = run_dir / "train.log"
    parts = re.findall(r"Wall time: (\d+):(\d\d):(\d\d)", log.read_text()) if log.is_file() else []
    if parts:
        return sum(int(h) * 60 + int(m) + int(s) / 60 for h, m, s in parts)
    start = (run_dir / ".hydra" / "config.yaml").stat().st_mtime
    return ((run_dir / "checkpoints" / "last.ckpt").stat().st_mtime - start) / 60


def evaluate(models: dict[str, Path | str], out_dir: Path) -> tuple[dict, float]:
    """Evaluate `models` (name -> evaluate override or checkpoint sampled at M2 N2) without the teacher or the
    references; returns the metrics and the wall time in seconds."""
    overrides = [m if isinstance(m, str) else model_override(name, m) for name, m in models.items()]
    seconds = run(["-m", "lightning_tmd.evaluate", "~models.teacher", "references=false", "overwrite=true",
                   f"out_dir={out_dir}", *overrides])
    return json.loads((out_dir / "metrics.json").read_text()), seconds


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


def plot(title: str, rows: dict[str, list[dict]], path: Path) -> None:
    """FVD-shapes and one-object adherence per variant: the mean over seeds as a bar, each seed as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 0.9 + 0.7 * len(rows)))
    labels = list(rows)
    for axis, metric in zip(axes, ("fvd", "all_1obj")):
        for y, label in enumerate(labels):
            values = [r[metric] for r in rows[label]]
            axis.barh(y, statistics.mean(values), color="tab:blue" if y % 2 == 0 else "tab:orange", alpha=0.6)
            axis.plot(values, [y] * len(values), "k.", markersize=8)
        axis.set_yticks(range(len(labels)), labels if axis is axes[0] else [""] * len(labels), fontsize=8)
        axis.invert_yaxis()
        axis.set_title(METRICS[metric])
        axis.grid(axis="x", alpha=0.3)
    figure.suptitle(f"{title} (bar: mean over seeds; dots: seeds)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ablation", choices=sorted(ABLATIONS))
    parser.add_argument("pipelines", nargs="+", type=Path)
    parser.add_argument("--runs", type=Path, default=Path("runs/ablations"))
    parser.add_argument("--out", help="default: experiments/results/ablation_<ablation>.md")
    parser.add_argument("--note", default="", help="what else ran on the machine meanwhile (written to the report)")
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG from the report's JSON")
    args = parser.parse_args()
    ablation = ABLATIONS[args.ablation]
    out = args.out or f"experiments/results/ablation_{args.ablation}.md"
    if args.plot_only:
        saved = json.loads(Path(out).with_suffix(".json").read_text())
        plot(ablation.title, saved["rows"], Path(out).with_suffix(".png"))
        return
    seeds = [pipeline_seed_and_teacher(p)[0] for p in args.pipelines]
    folder = {seed: args.runs / f"{args.ablation}_seed{seed}" for seed in seeds}
    stages = (1, 2) if ablation.stage == 1 else (2,)
    models = {}
    for pipeline, seed in zip(args.pipelines, seeds):
        student = pipeline / "stage1_m2n2" / "checkpoints" / "last.ckpt"
        if ablation.stage == 1:
            train_stage1(pipeline, [ablation.override], folder[seed] / "stage1")
            student = folder[seed] / "stage1" / "checkpoints" / "last.ckpt"
        train_stage2(pipeline, student, [ablation.override] if ablation.stage == 2 else [], folder[seed] / "stage2")
        for stage in stages:
            models[f"default_stage{stage}_seed{seed}"] = pipeline / f"stage{stage}_m2n2" / "checkpoints" / "last.ckpt"
            models[f"ablated_stage{stage}_seed{seed}"] = folder[seed] / f"stage{stage}" / "checkpoints" / "last.ckpt"
    metrics, eval_s = evaluate(models, args.runs / f"{args.ablation}_eval")
    by_model = {row["model"]: row for row in metrics["rows"]}
    rows = {}
    for stage in stages:
        for kind, label in (("default", ablation.default), ("ablated", ablation.ablated)):
            name = label if len(stages) == 1 else f"{label}, after stage {stage}"
            rows[name] = [by_model[f"{kind}_stage{stage}_seed{s}"] for s in seeds]
    trained = "; ".join(f"seed {s}: " + ", ".join(f"stage {k} {training_minutes(folder[s] / f'stage{k}'):.1f} min"
                                                 for k in stages) for s in seeds)
    how = (f"the ablated ones with `{ablation.override}`" if ablation.stage == 2 else
           f"the ablated ones with `{ablation.override}` in stage 1 (1 500 iterations, experiment shapes_tmd_stage1, "
           "from the pipeline's teacher), then the default stage 2 from that student")
    body = (f"Students: TMD M = 2, N = 2, H = 2, 1 000 stage-2 iterations (experiment shapes_tmd) from each pipeline "
            f"run's stage-1 student ({', '.join(str(p) for p in args.pipelines)}; training seeds {seeds}); {how}. "
            f"The pipeline runs: `{PIPELINES}`. Evaluation: {metrics['num_samples']} held-out prompts, "
            f"evaluation seed {metrics['seed']}, {metrics['judge'].get('variant', 'outline')} judge, sampled with "
            f"M = 2, N = 2; each cell the mean over seeds, then each seed.\n\n{table(rows)}\n\n"
            f"![{ablation.title}]({Path(out).with_suffix('.png').name})\n\n"
            f"Wall time on 2 CPU cores: ablated training {trained}; evaluation {eval_s / 60:.1f} min (generated sets "
            f"of earlier evaluations are cached). {args.note}")
    write_report(out, ablation.title, f"python experiments/ablation.py {args.ablation} "
                 f"{' '.join(str(p) for p in args.pipelines)}", body)
    Path(out).with_suffix(".json").write_text(json.dumps({"seeds": seeds, "override": ablation.override,
                                                          "stage": ablation.stage, "rows": rows}, indent=1))
    plot(ablation.title, rows, Path(out).with_suffix(".png"))
    print(Path(out).read_text())


if __name__ == "__main__":
    main()
