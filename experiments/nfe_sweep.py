"""Quality against effective NFE (Fig. 6 at small scale): TMD stage-1 students over the number of inner steps N and
head blocks H at M = 2, and over N at M = 1, next to the teacher's Euler sampler at matched NFE.

Each (M, N, H) is its own stage-1 run (1 500 iterations of experiment shapes_tmd_stage1 from the pipeline's teacher,
its seed), trained into `runs/nfe_sweep/m<M>n<N>h<H>_seed<seed>` (skipped when finished); (M, N, H) = (2, 2, 2) and
(1, 2, 2) are the pipeline's own `stage1_m2n2` and `stage1_m1n2`, and both stage-2 students are added as single
points. The grid is a cross through (N, H) = (2, 2) at M = 2 (N in {1, 2, 4} at H = 2, H in {1, 2, 3} at N = 2) and
N in {1, 2, 4} at H = 2 for M = 1, rather than the full 3 x 3 at both M, to fit the CPU budget; all points are
sampled on the same held-out prompts and noise. With a second pipeline
(`--seed-pipeline`) its stage1_m2n2 is evaluated too, for the seed-to-seed spread of one point.

    python experiments/nfe_sweep.py runs/pipeline/shapes --seed-pipeline runs/pipeline/shapes_seed1

Writes experiments/results/nfe_sweep.md, .json and .png (one-object adherence and FVD-shapes against effective NFE).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from ablation import PIPELINES, evaluate, model_override, pipeline_seed_and_teacher, train_stage1, training_minutes
from benchmarking import write_report

GRID = [(2, 1, 2), (2, 2, 2), (2, 4, 2), (2, 2, 1), (2, 2, 3), (1, 1, 2), (1, 2, 2), (1, 4, 2)]  # (M, N, H)
TEACHER_EULER = {**{f"euler_{k}_no_cfg": f"{{steps:{k},guidance_scale:1.0}}" for k in (1, 2, 3, 4)},
                 **{f"euler_{k}_cfg": f"{{steps:{k}}}" for k in (1, 2, 3)}}  # setting -> evaluate sampler override
OWN_SAMPLER = "teacher, own sampler"
COLUMNS = {"nfe": "eff. NFE", "fvd": "FVD-shapes ↓", "all_1obj": "adherence 1 obj ↑", "direction_1obj":
           "direction 1 obj ↑", "count": "count ↑", "shape": "shape ↑", "clips_per_s": "clips / s"}


def student_runs(pipeline: Path, runs: Path) -> dict[str, tuple[Path, int, int]]:
    """name -> (stage-1 run folder, M, N) of every TMD student of the sweep; trains the missing ones."""
    seed, _ = pipeline_seed_and_teacher(pipeline)
    students = {}
    for m, n, h in GRID:
        folder = pipeline / f"stage1_m{m}n{n}" if (n, h) == (2, 2) else runs / f"m{m}n{n}h{h}_seed{seed}"
        train_stage1(pipeline, [f"stage.module.head_blocks={h}"], folder, outer_steps=m, inner_steps=n)
        students[f"stage 1 M{m} N{n} H{h}"] = (folder, m, n)
    students["stage 2 M2 N2 H2"] = (pipeline / "stage2_m2n2", 2, 2)
    students["stage 2 M1 N2 H2"] = (pipeline / "stage2_m1n2", 1, 2)
    return students


def name_of(label: str) -> str:
    """A model name the evaluate override accepts: `stage 1 M2 N2 H2, seed 1` -> `stage_1_m2_n2_h2_seed_1`."""
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


def teacher_label(setting: str) -> str:
    """`euler_2_no_cfg` -> `teacher Euler 2 steps, no CFG`."""
    steps = setting.split("_")[1]
    return f"teacher Euler {steps} step{'s' if steps != '1' else ''}, {'no CFG' if 'no_cfg' in setting else 'CFG 2'}"


def plot(points: dict[str, dict], path: Path) -> None:
    """One-object adherence and FVD-shapes against effective NFE: the TMD students and the teacher's Euler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    series = {"TMD stage 1, M = 2": lambda k: k.startswith("stage 1 M2"),
              "TMD stage 1, M = 1": lambda k: k.startswith("stage 1 M1"),
              "TMD stage 2": lambda k: k.startswith("stage 2"),
              "teacher Euler, CFG 2": lambda k: k.endswith("CFG 2"),
              "teacher Euler, no CFG": lambda k: k.endswith("no CFG")}
    for axis, metric, title in ((axes[0], "all_1obj", "adherence, one-object prompts ↑"),
                                (axes[1], "fvd", "FVD-shapes ↓")):
        for (label, keep), marker in zip(series.items(), "osD^v"):
            chosen = sorted(((p["nfe"], p[metric], k) for k, p in points.items() if keep(k)))
            if not chosen:
                continue
            line = "-" if label.startswith("teacher") else ""
            axis.plot([c[0] for c in chosen], [c[1] for c in chosen], marker=marker, linestyle=line, label=label)
            if label.startswith("TMD"):
                for x, y, k in chosen:
                    axis.annotate(re.sub(r"M\d ", "", k.split(" ", 2)[2]), (x, y), fontsize=7,
                                  xytext=(3, 3), textcoords="offset points")
        if OWN_SAMPLER in points:
            own = points[OWN_SAMPLER]
            axis.axhline(own[metric], color="grey", linestyle="--", label=f"{OWN_SAMPLER} (NFE {own['nfe']:g})")
        axis.set_xlabel("effective NFE")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    axes[1].set_yscale("log")
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    figure.tight_layout(rect=(0, 0.13, 1, 1))
    figure.savefig(path, dpi=120)


def table(points: dict[str, dict]) -> str:
    lines = ["| model | " + " | ".join(COLUMNS.values()) + " |", "|---|" + "---|" * len(COLUMNS)]
    for label, p in sorted(points.items(), key=lambda item: item[1]["nfe"]):
        cells = [f"{p[c]:.1f}" if c in ("fvd", "clips_per_s") else f"{p[c]:.3g}" if c == "nfe" else f"{p[c]:.3f}"
                 for c in COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipeline", type=Path)
    parser.add_argument("--seed-pipeline", type=Path, help="a second pipeline run: its stage1_m2n2 is evaluated too")
    parser.add_argument("--runs", type=Path, default=Path("runs/nfe_sweep"))
    parser.add_argument("--out", default="experiments/results/nfe_sweep.md")
    parser.add_argument("--note", default="", help="what else ran on the machine meanwhile (written to the report)")
    args = parser.parse_args()
    students = student_runs(args.pipeline, args.runs)
    if args.seed_pipeline:
        students["stage 1 M2 N2 H2, seed 1"] = (args.seed_pipeline / "stage1_m2n2", 2, 2)
    _, teacher = pipeline_seed_and_teacher(args.pipeline)
    models = {name_of(label): model_override(name_of(label), folder / "checkpoints" / "last.ckpt", m, n)
              for label, (folder, m, n) in students.items()}
    settings = ",".join(f"{key}:{value}" for key, value in {**TEACHER_EULER, "own": "{}"}.items())
    models["teacher"] = f"+models.teacher_euler={{ckpt:'{teacher}',settings:{{{settings}}}}}"
    metrics, eval_s = evaluate(models, args.runs / "eval")
    rows = {(r["model"], r["setting"]): r for r in metrics["rows"]}
    points = {label: rows[(name_of(label), f"m{m}n{n}")] for label, (_, m, n) in students.items()}
    points.update({teacher_label(setting): rows[("teacher_euler", setting)] for setting in TEACHER_EULER})
    points[OWN_SAMPLER] = rows[("teacher_euler", "own")]
    out = Path(args.out)
    plot(points, out.with_suffix(".png"))
    trained = ", ".join(f"{label.removeprefix('stage 1 ')} {training_minutes(folder):.1f}"
                        for label, (folder, _, _) in students.items() if folder.is_relative_to(args.runs))
    trained = trained or "none (all finished earlier)"
    body = (f"TMD students from the pipeline run {args.pipeline} (`{PIPELINES.split(';')[0]}`; the seed-1 point from "
            f"`{PIPELINES.split(';')[1].strip()}`): stage-1 students at M = 2 over N and H and at M = 1 over N "
            f"(1 500 iterations each), and both stage-2 students (1 000 DMD2-v iterations with the head "
            f"rolled out), against the teacher's Euler sampler at 1-4 steps without CFG (NFE = steps) and 1-3 steps "
            f"with its CFG 2 (NFE = 2 x steps), and its own sampler (dashed). Effective NFE of a TMD student: "
            f"M (L - H + N H) / L with L = 6 blocks (Eq. 16). "
            f"Evaluation: {metrics['num_samples']} held-out prompts, evaluation seed {metrics['seed']}, one training "
            f"seed per point (the seed-1 row shows the spread of one point); every TMD student sampled at its training "
            f"grid.\n\n![quality against NFE]"
            f"({out.with_suffix('.png').name})\n\n{table(points)}\n\nWall time on 2 CPU cores: stage-1 training "
            f"here (minutes) {trained}; evaluation {eval_s / 60:.1f} min (earlier generated sets are cached). "
            f"{args.note}")
    command = f"python experiments/nfe_sweep.py {args.pipeline}" + (
        f" --seed-pipeline {args.seed_pipeline}" if args.seed_pipeline else "")
    write_report(out, "Quality against effective NFE (Fig. 6)", command, body)
    out.with_suffix(".json").write_text(json.dumps({"points": points}, indent=1))
    print(out.read_text())


if __name__ == "__main__":
    main()
