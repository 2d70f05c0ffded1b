"""Does the shapes judge read an object's shape from its outline or from its size?

In the default shapes data one radius serves every shape, so areas differ by shape (at 32 x 32: circle
~72 pixels, square ~67, triangle ~41) and a judge trained on those clips can credit size as shape. This
probe scores one-object clips with each judge variant and, as a baseline that sees nothing but size, an
area reader (the object's mean pixel area, nearest of the three default areas):

* real clips at the default sizes, at one common area (each shape's default area in turn: a triangle
  drawn as large as a circle, a circle as small as a triangle, ...), and at random areas;
* generated clips of the given checkpoints on held-out one-object prompts (same seeds for every model).

Per condition and reader: shape accuracy and the confusion (rows: captioned shape, columns: read shape).

    python experiments/judge_shape_probe.py --out experiments/results/judge_shape_probe.md \
        --model teacher=runs/pipeline/shapes/teacher/checkpoints/last.ckpt --sampler 'teacher={"steps": 50}'
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch
from benchmarking import show_and_save

from lightning_tmd.data.datamodule import VAL_START
from lightning_tmd.data.shapes import AREA_PER_RADIUS2, BACKGROUND, SHAPES, ShapesDataset, stacked
from lightning_tmd.generators import load_generator
from lightning_tmd.metrics.judge import JUDGE_VARIANTS, ensure_judge, judge_file_name, shape_confusion
from lightning_tmd.sampling import sample_clips

CLIPS = {"frames": 8, "size": 32, "max_objects": 2, "speed": 0.09, "seed": 0}  # the default teacher's clips
CIRCLE = AREA_PER_RADIUS2["circle"]
CONDITIONS = {  # name -> object_areas (units of the default circle's area)
    "real, default sizes": None,
    "real, all at the circle's area": (1.0, 1.0),
    "real, all at the square's area": (AREA_PER_RADIUS2["square"] / CIRCLE,) * 2,
    "real, all at the triangle's area": (AREA_PER_RADIUS2["triangle"] / CIRCLE,) * 2,
    "real, random areas": JUDGE_VARIANTS["outline"],
}


def area_reader_confusion(videos: torch.Tensor, labels: dict, size: int) -> torch.Tensor:
    """Confusion of a reader that sees only size: one-object clips, the object's pixel area (non-background
    pixels, mean over frames) -> the shape whose default area is nearest."""
    radius2 = (0.15 * size) ** 2
    default_areas = torch.tensor([AREA_PER_RADIUS2[s] * radius2 for s in SHAPES])
    area = (videos.amax(dim=1) > BACKGROUND + 0.5).float().sum(dim=(2, 3)).mean(dim=1)  # (B,)
    read = (area[:, None] - default_areas).abs().argmin(dim=1)
    true = labels["shape"][:, 0]
    return torch.bincount(true * len(SHAPES) + read, minlength=len(SHAPES) ** 2).view(len(SHAPES), len(SHAPES))


def accuracy(confusion: torch.Tensor) -> float:
    return float(confusion.diag().sum() / confusion.sum())


def confusion_text(confusion: torch.Tensor) -> str:
    """'circle 40/3/1, square ...': per captioned shape, how often each shape was read (row-normalised %)."""
    rows = confusion.float() / confusion.sum(dim=1, keepdim=True).clamp(min=1)
    return "; ".join(f"{shape}: " + " / ".join(f"{100 * v:.0f}" for v in row) for shape, row in zip(SHAPES, rows))


def one_object_set(count: int, object_areas, offset: int = 20_000) -> dict:
    dataset = ShapesDataset(count, start=VAL_START + offset, object_areas=object_areas,
                            **{**CLIPS, "max_objects": 1})
    return stacked(dataset)


def parse_pairs(items: list[str]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=512, help="real one-object clips per condition")
    parser.add_argument("--generated", type=int, default=256, help="one-object prompts per generated set")
    parser.add_argument("--model", action="append", default=[], help="NAME=CKPT (repeatable)")
    parser.add_argument("--sampler", action="append", default=[], help="NAME=JSON sampler overrides")
    parser.add_argument("--cache-dir", default=".cache/lightning_tmd")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # e.g. that a judge is trained first
    started = time.perf_counter()
    torch.set_num_threads(2)

    judges = {variant: ensure_judge(f"{args.cache_dir}/{judge_file_name(CLIPS, variant)}", CLIPS["frames"],
                                    CLIPS["size"], CLIPS["max_objects"], CLIPS["speed"], variant=variant)[0]
              for variant in JUDGE_VARIANTS}
    sets = {name: one_object_set(args.clips, areas) for name, areas in CONDITIONS.items()}
    samplers = {name: json.loads(value) for name, value in parse_pairs(args.sampler).items()}
    prompts = one_object_set(args.generated, None, offset=30_000)
    for name, ckpt in parse_pairs(args.model).items():
        loaded = load_generator(ckpt)
        seeds = list(range(args.generated))
        clips, nfe = sample_clips(loaded.module, loaded.prompts, prompts["captions"], seeds, loaded.clip_shape,
                                  progress=True, **samplers.get(name, {}))
        sets[f"{name} ({json.dumps(samplers.get(name, {}))}, NFE {nfe:g})"] = {
            "videos": clips.clamp(-1, 1), "labels": prompts["labels"]}

    header = "| clips | reader | shape accuracy | read as circle / square / triangle (%, per captioned shape) |"
    results, lines = [], [header, "|---|---|---|---|"]
    for name, data in sets.items():
        readers = {f"judge ({variant})": shape_confusion(net, data["videos"], data["labels"])
                   for variant, net in judges.items()}
        readers["area only"] = area_reader_confusion(data["videos"], data["labels"], CLIPS["size"])
        for reader, confusion in readers.items():
            results.append({"clips": name, "reader": reader, "accuracy": accuracy(confusion),
                            "confusion": confusion.tolist()})
            lines.append(f"| {name} | {reader} | {accuracy(confusion):.3f} | {confusion_text(confusion)} |")

    command = "python experiments/judge_shape_probe.py " + " ".join(
        [f"--model {m}" for m in args.model] + [f"--sampler '{s}'" for s in args.sampler])
    text = (f"# Does the judge read shape from the outline or from the size?\n\nCommand: `{command.strip()}`\n\n"
            f"{args.clips} real one-object clips per condition (8 x 32 x 32, speed 0.09, held-out indices), "
            f"{args.generated} generated clips per model (held-out one-object prompts, seeds 0..{args.generated - 1}). "
            "Judges: `original` (trained on the default clips), `outline` (trained on clips of random object "
            f"areas U{JUDGE_VARIANTS['outline']} x the circle's). Area only: the object's pixel area, nearest "
            "default area. Chance: 0.333.\n\n" + "\n".join(lines)
            + f"\n\nWall time {time.perf_counter() - started:.0f} s, {torch.get_num_threads()} threads.\n")
    show_and_save(text, args.out)
    if args.out:
        with open(args.out.removesuffix(".md") + ".json", "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
