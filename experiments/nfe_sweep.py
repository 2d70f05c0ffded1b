"""Quality against effective NFE (Fig. 6 at small scale): TMD stage-1 students over the number of inner steps
N in {1, 2, 4} and head blocks H in {1, 2, 3} at M in {1, 2}, next to the teacher's Euler sampler at matched NFE.

Each (M, N, H) is its own stage-1 run (1 500 iterations of experiment shapes_tmd_stage1 from the pipeline's teacher,
its seed), trained into `runs/nfe_sweep/m<M>n<N>h<H>_seed<seed>` (skipped when finished); (M, N, H) = (2, 2, 2) and
(1, 2, 2) are the pipeline's own `stage1_m2n2` and `stage1_m1n2`, and both stage-2 students are added as single
points. All points are sampled on the same held-out prompts and noise. With a second pipeline (`--seed-pipeline`) its
stage1_m2n2 is evaluated too, for the seed-to-seed spread of one point.

    python experiments/nfe_sweep.py runs/pipeline/shapes --seed-pipeline runs/pipeline/shapes_seed1

`--earlier experiments/results/nfe_sweep.json` keeps the points of an earlier report whose run folders are not here
(they are not trained again; the report marks them and compares the teacher rows it evaluates again with that
report's, which agree only for the same teacher and judge); `--no-train` evaluates what is finished and lists the rest.

Writes experiments/results/nfe_sweep.md, .json and .png (one-object adherence and FVD-shapes against effective NFE).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from ablation import (
    PIPELINES,
    evaluate,
    finished,
    model_override,
    pipeline_seed_and_teacher,
    train_stage1,
    training_minutes,
)
from benchmarking import write_report

GRID = [(m, n, h) for m in (2, 1) for h in (2, 1, 3) for n in (1, 2, 4)]  # (M, N, H), in training order
TEACHER_EULER = {**{f"euler_{k}_no_cfg": f"{{steps:{k},guidance_scale:1.0}}" for k in (1, 2, 3, 4)},
                 **{f"euler_{k}_cfg": f"{{steps:{k}}}" for k in (1, 2, 3)}}  # setting -> evaluate sampler override
OWN_SAMPLER = "teacher, own sampler"
COLUMNS = {"nfe": "eff. NFE", "fvd": "FVD-shapes ↓", "all_1obj": "adherence 1 obj ↑", "direction_1obj":
           "direction 1 obj ↑", "count": "count ↑", "shape": "shape ↑", "clips_per_s": "clips / s"}


def student_runs(pipeline: Path, runs: Path, seed_pipeline: Path | None, kept: set[str],
                 train: bool) -> tuple[dict[str, tuple[Path, int, int]], list[str]]:
    """name -> (run folder, M, N) of every TMD student to evaluate, and the names of the untrained ones; trains the
    missing stage-1 students (with `train`) except those in `kept` (points an earlier report holds)."""
    seed, _ = pipeline_seed_and_teacher(pipeline)
    wanted = {}
    for m, n, h in GRID:
        folder = pipeline / f"stage1_m{m}n{n}" if (n, h) == (2, 2) else runs / f"m{m}n{n}h{h}_seed{seed}"
        wanted[f"stage 1 M{m} N{n} H{h}"] = (folder, m, n, h)
    wanted["stage 2 M2 N2 H2"] = (pipeline / "stage2_m2n2", 2, 2, None)
    wanted["stage 2 M1 N2 H2"] = (pipeline / "stage2_m1n2", 1, 2, None)
    if seed_pipeline:
        wanted["stage 1 M2 N2 H2, seed 1"] = (seed_pipeline / "stage1_m2n2", 2, 2, None)
    students, untrained = {}, []
    for label, (folder, m, n, h) in wanted.items():
        if not finished(folder):
            if label in kept:
                continue
            if not train or h is None:  # h None: a pipeline's own run, not trained here
                untrained.append(label)
                continue
            train_stage1(pipeline, [f"stage.module.head_blocks={h}"], folder, outer_steps=m, inner_steps=n)
        students[label] = (folder, m, n)
    return students, untrained


def teacher_agreement(points: dict[str, dict], earlier: dict[str, dict]) -> str:
    """How the teacher rows evaluated now compare with an earlier report's (identical for the same teacher, judge,
    prompts and noise)."""
    shared = [k for k in points if k.startswith("teacher") and k in earlier]
    if not shared:
        return "the earlier report has no teacher rows to compare"
    fvd = max(abs(points[k]["fvd"] - earlier[k]["fvd"]) for k in shared)
    adherence = max(abs(points[k]["all_1obj"] - earlier[k]["all_1obj"]) for k in shared)
    verdict = "identical" if fvd == 0 and adherence == 0 else "not identical"
    return (f"the {len(shared)} teacher rows evaluated here differ from the earlier report's by at most {fvd:.3g} "
            f"FVD-shapes and {adherence:.3g} one-object adherence ({verdict})")


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

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    colours = {1: "tab:orange", 2: "tab:blue", 3: "tab:green"}  # by head blocks H
    series = {f"TMD stage 1, M = {m}, H = {h}": (re.compile(rf"stage 1 M{m} N\d H{h}$"), colours[h],
                                                  "-" if m == 2 else ":", "o" if m == 2 else "s")
              for m in (2, 1) for h in (1, 2, 3)}
    series.update({"TMD stage 1, M = 2, N = 2, H = 2, seed 1": (re.compile(r"stage 1 .*seed"), "tab:blue", "", "x"),
                   "TMD stage 2 (N = 2, H = 2)": (re.compile(r"stage 2 "), "tab:red", "", "*"),
                   "teacher Euler, CFG 2": (re.compile(r".*CFG 2$"), "black", "-", "^"),
                   "teacher Euler, no CFG": (re.compile(r".*no CFG$"), "grey", "-", "v")})
    for axis, metric, title in ((axes[0], "all_1obj", "adherence, one-object prompts ↑"),
                                (axes[1], "fvd", "FVD-shapes ↓")):
        for label, (pattern, colour, line, marker) in series.items():
            chosen = sorted((p["nfe"], p[metric], k) for k, p in points.items() if pattern.match(k))
            if not chosen:
                continue
            axis.plot([c[0] for c in chosen], [c[1] for c in chosen], marker=marker, linestyle=line, color=colour,
                      label=label, markersize=9 if marker == "*" else 5)
            if label.startswith("TMD stage 1"):
                for x, y, k in chosen:
                    axis.annotate(k.split(" ")[3], (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
        if OWN_SAMPLER in points:
            own = points[OWN_SAMPLER]
            axis.axhline(own[metric], color="grey", linestyle="--", label=f"{OWN_SAMPLER} (NFE {own['nfe']:g})")
        axis.set_xlabel("effective NFE")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    axes[1].set_yscale("log")
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    figure.tight_layout(rect=(0, 0.17, 1, 1))
    figure.savefig(path, dpi=120)


def table(points: dict[str, dict], kept: set[str]) -> str:
    """One row per point, by effective NFE; points kept from an earlier report marked †."""
    lines = ["| model | " + " | ".join(COLUMNS.values()) + " |", "|---|" + "---|" * len(COLUMNS)]
    for label, p in sorted(points.items(), key=lambda item: item[1]["nfe"]):
        cells = [f"{p[c]:.1f}" if c in ("fvd", "clips_per_s") else f"{p[c]:.3g}" if c == "nfe" else f"{p[c]:.3f}"
                 for c in COLUMNS]
        lines.append(f"| {label}{' †' if label in kept else ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipeline", type=Path)
    parser.add_argument("--seed-pipeline", type=Path, help="a second pipeline run: its stage1_m2n2 is evaluated too")
    parser.add_argument("--runs", type=Path, default=Path("runs/nfe_sweep"))
    parser.add_argument("--out", default="experiments/results/nfe_sweep.md")
    parser.add_argument("--earlier", type=Path, help="an earlier report's JSON: its points whose run folders are not "
                        "here are kept, not trained again")
    parser.add_argument("--no-train", dest="train", action="store_false", help="evaluate only finished students")
    parser.add_argument("--note", default="", help="what else ran on the machine meanwhile (written to the report)")
    args = parser.parse_args()
    earlier = json.loads(args.earlier.read_text())["points"] if args.earlier else {}
    earlier_students = {k for k in earlier if k.startswith("stage")}
    students, untrained = student_runs(args.pipeline, args.runs, args.seed_pipeline, earlier_students, args.train)
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
    kept = earlier_students - set(points)
    points.update({label: earlier[label] for label in kept})
    out = Path(args.out)
    plot(points, out.with_suffix(".png"))
    trained = ", ".join(f"{label.removeprefix('stage 1 ')} {training_minutes(folder):.1f}"
                        for label, (folder, _, _) in students.items() if folder.is_relative_to(args.runs))
    trained = trained or "none (all finished earlier)"
    kept_text = (f" Points marked † are kept from the earlier report {args.earlier} (their run folders were not on "
                 f"the machine): {teacher_agreement(points, earlier)}." if kept else "")
    untrained_text = f" Not trained yet: {', '.join(untrained)}." if untrained else ""
    body = (f"TMD students from the pipeline run {args.pipeline} (`{PIPELINES.split(';')[0]}`; the seed-1 point from "
            f"`{PIPELINES.split(';')[1].strip()}`): stage-1 students over N in {{1, 2, 4}} and H in {{1, 2, 3}} at "
            f"M in {{1, 2}} (1 500 iterations each), and both stage-2 students (1 000 DMD2-v iterations with the "
            f"head rolled out), against the teacher's Euler sampler at 1-4 steps without CFG (NFE = steps) and 1-3 "
            f"steps with its CFG 2 (NFE = 2 x steps), and its own sampler (dashed). Effective NFE of a TMD student: "
            f"M (L - H + N H) / L with L = 6 blocks (Eq. 16). "
            f"Evaluation: {metrics['num_samples']} held-out prompts, evaluation seed {metrics['seed']}, one training "
            f"seed per point (the seed-1 row shows the spread of one point); every TMD student sampled at its training "
            f"grid.{kept_text}{untrained_text}\n\n![quality against NFE]"
            f"({out.with_suffix('.png').name})\n\n{table(points, kept)}\n\nWall time on 2 CPU cores: stage-1 "
            f"training here (minutes) {trained}; evaluation {eval_s / 60:.1f} min (earlier generated sets are "
            f"cached). {args.note}")
    command = f"python experiments/nfe_sweep.py {args.pipeline}" + (
        f" --seed-pipeline {args.seed_pipeline}" if args.seed_pipeline else "")
    write_report(out, "Quality against effective NFE (Fig. 6)", command, body)
    out.with_suffix(".json").write_text(json.dumps({"points": points, "kept_from_earlier": sorted(kept)}, indent=1))
    print(out.read_text())


if __name__ == "__main__":
    main()
