"""Pipeline runs of several training seeds in one table, with the distillation targets checked on their means.

Each run is a pipeline folder (`python -m lightning_tmd.pipeline pipeline.seed=<k> pipeline.name=<name>`); rows
are matched by (model, setting) and every metric is shown per seed and as the mean. The targets: stage 2 beats
its stage-1 start, TMD keeps the teacher's one-object adherence (M2 N2: >= 0.9 x, M1 N2: >= 0.75 x) and its
FVD-shapes within the teacher's seed spread, TMD beats DMD2-v at the same M and the teacher's Euler sampler at the
nearest NFE.

    python experiments/seed_table.py runs/pipeline/shapes runs/pipeline/shapes_seed1 \
        --out experiments/results/pipeline_seeds.md
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from benchmarking import write_report

METRICS = {"fvd": "FVD-shapes ↓", "all_1obj": "adherence 1 obj ↑", "direction_1obj": "direction 1 obj ↑",
           "count": "count ↑", "adherence": "adherence ↑"}


def load_rows(folder: Path) -> dict[tuple[str, str], dict]:
    """(model, setting) -> evaluation row of one pipeline run."""
    results = json.loads((folder / "results.json").read_text())
    return {(r["model"], r["setting"]): r for r in results["evaluation"]["rows"]}


def collect(folders: list[Path]) -> tuple[list[tuple[str, str]], dict[tuple[str, str], list[dict | None]]]:
    """Row keys in first-seen order and each key's row per run (None where a run lacks it)."""
    runs = [load_rows(f) for f in folders]
    keys = list(dict.fromkeys(k for run in runs for k in run))
    return keys, {k: [run.get(k) for run in runs] for k in keys}


def mean_of(rows: list[dict | None], metric: str) -> float | None:
    values = [r[metric] for r in rows if r is not None]
    return statistics.fmean(values) if values else None


def spread_of(rows: list[dict | None], metric: str) -> float:
    """Half the range over the runs (0 for one run)."""
    values = [r[metric] for r in rows if r is not None]
    return (max(values) - min(values)) / 2 if len(values) > 1 else 0.0


def cell(rows: list[dict | None], metric: str) -> str:
    digits = 1 if metric == "fvd" else 3
    values = [f"{r[metric]:.{digits}f}" if r is not None else "–" for r in rows]
    mean = mean_of(rows, metric)
    if len(rows) == 1 or mean is None:
        return values[0]
    return f"{mean:.{digits}f} ({' / '.join(values)})"


def table(keys, rows) -> str:
    lines = ["| model | setting | eff. NFE | seeds | " + " | ".join(METRICS.values()) + " |",
             "|---|---|---|---|" + "---|" * len(METRICS)]
    for key in keys:
        present = [r for r in rows[key] if r is not None]
        nfe = present[0].get("nfe")
        nfe_text = "–" if nfe is None else f"{float(nfe):.3g}"
        lines.append(f"| {key[0]} | {key[1]} | {nfe_text} | {len(present)} | "
                     + " | ".join(cell(rows[key], m) for m in METRICS) + " |")
    return "\n".join(lines)


def student_keys(keys, prefix: str) -> dict[int, tuple[str, str]]:
    """M -> the (model, setting) key of the stage's row, e.g. prefix 'stage2_m' -> {2: ('stage2_m2n2', ...)}."""
    found = {}
    for key in keys:
        if key[0].startswith(prefix):
            found[int(key[0][len(prefix)])] = key
    return found


def targets(keys, rows) -> list[str]:
    """The distillation targets, each as a line saying measured values and met / not met."""
    def m(key, metric):
        return mean_of(rows[key], metric)

    lines = []
    teacher = ("teacher", "own sampler")
    t_adh, t_fvd, t_fvd_spread = m(teacher, "all_1obj"), m(teacher, "fvd"), spread_of(rows[teacher], "fvd")
    stage1, stage2 = student_keys(keys, "stage1_m"), student_keys(keys, "stage2_m")
    dmd = {1: ("dmd2v_m1", "outer_steps 1"), 2: ("dmd2v_m2", "outer_steps 2")}
    euler = [k for k in keys if k[0] == "teacher" and k != teacher]
    for outer, key in sorted(stage2.items()):
        adh, fvd = m(key, "all_1obj"), m(key, "fvd")
        spread = max(spread_of(rows[key], "all_1obj"), spread_of(rows[stage1[outer]], "all_1obj"))
        d_adh = adh - m(stage1[outer], "all_1obj")
        d_fvd = fvd - m(stage1[outer], "fvd")
        lines.append(f"- M{outer}: stage 2 vs stage 1: one-object adherence {d_adh:+.3f} (seed half-range "
                     f"{spread:.3f}), FVD-shapes {d_fvd:+.1f}: "
                     f"{'met' if d_adh > spread and d_fvd <= 0 else 'not met'} (adherence up beyond the spread, "
                     "FVD not worse).")
        share = 0.9 if outer == 2 else 0.75
        lines.append(f"- M{outer}: one-object adherence {adh:.3f} = {adh / t_adh:.2f} x the teacher's {t_adh:.3f} "
                     f"(target >= {share}): {'met' if adh >= share * t_adh else 'not met'}.")
        if outer == 2:
            direction = m(key, "direction_1obj")
            lines.append(f"- M2: one-object direction {direction:.3f} (target >= 0.90): "
                         f"{'met' if direction >= 0.9 else 'not met'}; FVD-shapes {fvd:.1f} against the teacher's "
                         f"{t_fvd:.1f} ± {t_fvd_spread:.1f}: "
                         f"{'met' if fvd <= t_fvd + max(t_fvd_spread, spread_of(rows[key], 'fvd')) else 'not met'}.")
        if dmd[outer] in rows:
            d_adh, d_fvd = m(dmd[outer], "all_1obj"), m(dmd[outer], "fvd")
            seeds = sum(r is not None for r in rows[dmd[outer]])
            lines.append(f"- M{outer}: TMD vs DMD2-v ({seeds} seed{'s' if seeds > 1 else ''}): adherence {adh:.3f} vs "
                         f"{d_adh:.3f}, FVD-shapes {fvd:.1f} vs {d_fvd:.1f}: "
                         f"{'TMD better in both' if adh > d_adh and fvd < d_fvd else 'mixed or worse'}.")
        nfe = float(rows[key][0]["nfe"] if rows[key][0] else next(r for r in rows[key] if r)["nfe"])
        nearest = min(euler, key=lambda k: abs(float(next(r for r in rows[k] if r)["nfe"]) - nfe))
        e_adh, e_fvd = m(nearest, "all_1obj"), m(nearest, "fvd")
        lines.append(f"- M{outer}: TMD vs the teacher's '{nearest[1]}' (nearest NFE): adherence {adh:.3f} vs "
                     f"{e_adh:.3f}, FVD-shapes {fvd:.1f} vs {e_fvd:.1f}: "
                     f"{'TMD better in both' if adh > e_adh and fvd < e_fvd else 'mixed or worse'}.")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="pipeline run folders, one per training seed")
    parser.add_argument("--out", default="experiments/results/pipeline_seeds.md")
    args = parser.parse_args()
    keys, rows = collect(args.folders)
    seeds = [json.loads((f / "results.json").read_text())["evaluation"]["seed"] for f in args.folders]
    body = (f"Runs: {', '.join(f'`{f}` (evaluation seed {s})' for f, s in zip(args.folders, seeds))}. Each cell: "
            "the mean over the runs that have the row, then the value of each run.\n\n"
            + table(keys, rows) + "\n\nTargets (on the means):\n\n" + "\n".join(targets(keys, rows)))
    command = "python experiments/seed_table.py " + " ".join(map(str, args.folders))
    print(write_report(args.out, "Distillation over training seeds", command, body))
    out = Path(args.out).with_suffix(".json")
    out.write_text(json.dumps({"runs": [str(f) for f in args.folders],
                               "rows": [{"model": k[0], "setting": k[1], "per_run": rows[k]} for k in keys]}, indent=2))


if __name__ == "__main__":
    main()
