"""Does a teacher use each caption attribute? Its clean-estimate error with the true caption against the
same caption with one attribute changed, at several noise levels, on held-out one-object clips; and the
error the best caption-only predictor (the mean clip per caption attribute) reaches at t = 1.

    python experiments/caption_sensitivity.py runs/shapes_teacher/main/checkpoints/last.ckpt --out table.md

A gap of zero for an attribute means the net ignores that word. At t = 1 the best prediction is the mean
clip given the caption, so the column "mean clip" shows how much each attribute could lower the error.
The column "frames shuffled" is the error on the same clips with their frames in another order (true
caption): how much the net leans on the order of the frames, i.e. on motion, to denoise.
"""

from __future__ import annotations

import argparse

import torch
from benchmarking import show_and_save

from lightning_tmd.data.shapes import ATTRIBUTES, ShapesDataset, caption_of, clip_settings, stacked
from lightning_tmd.generators import load_generator
from lightning_tmd.metrics.video import shuffle_frames
from lightning_tmd.schedules import interpolate

CHANGES = {"colour + 1": ("color", 1), "shape + 1": ("shape", 1), "direction + 1": ("direction", 1),
           "opposite direction": ("direction", 4)}


def captions_with(labels: dict[str, torch.Tensor], attribute: str | None = None, shift: int = 0) -> list[str]:
    objects = [{k: int(labels[k][i, 0]) for k in ATTRIBUTES} for i in range(len(labels["color"]))]
    for o in objects:
        if attribute:
            o[attribute] = (o[attribute] + shift) % len(ATTRIBUTES[attribute])
    return [caption_of([o]) for o in objects]


def mean_clip_error(train: dict, test: dict, keys: list[str]) -> float:
    """MSE of predicting each test clip by the mean training clip with the same `keys` attributes."""
    def key(labels, i):
        return tuple(int(labels[k][i, 0]) for k in keys)

    groups: dict[tuple, list[int]] = {}
    for i in range(len(train["videos"])):
        groups.setdefault(key(train["labels"], i), []).append(i)
    means = {k: train["videos"][v].mean(0) for k, v in groups.items()}
    pred = torch.stack([means[key(test["labels"], i)] for i in range(len(test["videos"]))])
    return ((pred - test["videos"]) ** 2).mean().item()


def one_object_sets(data: dict, clips: int) -> tuple[dict, dict]:
    """`clips` held-out one-object clips of a run's data settings, and 64 times as many training clips
    (for the mean-clip predictor)."""
    settings = {**clip_settings(data), "max_objects": 1}
    return (stacked(ShapesDataset(clips, start=10**7, **settings)),
            stacked(ShapesDataset(64 * clips, start=0, **settings)))


@torch.no_grad()
def clean_estimate_error(module, net, videos: torch.Tensor, noise: torch.Tensor, t_value: float,
                         context: torch.Tensor) -> float:
    """MSE of the net's clean estimate x0(x_t, t, c) against the clips, at one noise level."""
    t = torch.full((len(videos),), t_value, dtype=torch.float64)
    return ((module.x0(interpolate(videos, noise, t), t, context, net) - videos) ** 2).mean().item()


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt")
    parser.add_argument("--clips", type=int, default=128)
    parser.add_argument("--times", default="0.2,0.4,0.6,0.8,0.95")
    parser.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    loaded = load_generator(args.ckpt, ema=not args.raw)
    test, train = one_object_sets(loaded.config["data"], args.clips)
    module = loaded.module
    net = module.sampling_net()
    noise = torch.randn(test["videos"].shape, generator=torch.Generator().manual_seed(0))
    contexts = {"true caption": loaded.prompts(captions_with(test["labels"])).states}
    contexts.update({name: loaded.prompts(captions_with(test["labels"], *change)).states
                     for name, change in CHANGES.items()})
    shuffled = shuffle_frames(test["videos"], torch.Generator().manual_seed(1))
    lines = ["| t | " + " | ".join(contexts) + " | frames shuffled |", "|---|" + "---|" * (len(contexts) + 1)]
    for t_value in (float(v) for v in args.times.split(",")):
        errors = [clean_estimate_error(module, net, test["videos"], noise, t_value, c) for c in contexts.values()]
        errors.append(clean_estimate_error(module, net, shuffled, noise, t_value, contexts["true caption"]))
        lines.append(f"| {t_value} | " + " | ".join(f"{e:.4f}" for e in errors) + " |")
    mean = {"nothing": [], "colour": ["color"], "colour, shape": ["color", "shape"],
            "colour, direction": ["color", "direction"], "colour, shape, direction": list(ATTRIBUTES)}
    lines += ["", "| t = 1, mean clip given | MSE |", "|---|---|"]
    lines += [f"| {name} | {mean_clip_error(train, test, keys):.4f} |" for name, keys in mean.items()]
    text = f"Clean-estimate MSE of `{args.ckpt}` ({'raw' if args.raw else 'EMA'} weights), {args.clips} " \
           f"held-out one-object clips:\n\n" + "\n".join(lines) + "\n"
    show_and_save(text, args.out)


if __name__ == "__main__":
    main()
