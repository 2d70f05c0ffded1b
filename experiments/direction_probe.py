"""How fast does a teacher net learn to use the direction word near pure noise?

Near t = 1 the clip itself tells the net nothing, so the best clean estimate is the mean clip given the
caption: there the direction word is worth most (a clip moving right starts on the left). This probe
trains `experiment=shapes_teacher_base` plus `overrides` on one-object clips with training times drawn only
from U[t_min, 1], and every `--every` steps measures, on 128 held-out clips at t = 1, the clean-estimate
MSE with the true caption, with the opposite direction and with another colour. The direction gap
(opposite - true) is how much the net uses the direction word; the mean-clip gain (colour -> colour and
direction, from `caption_sensitivity.py`) is the most it could reach.

    python experiments/direction_probe.py --label "speed 0.06" --out table.md -- \
        data.speed=0.06 model.position_frequencies=3 model.config.in_channels=21

Rows are appended to `--out`, so several probes make one table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from caption_sensitivity import captions_with, clean_estimate_error, mean_clip_error, one_object_sets
from teacher_speed import teacher_training
from tqdm import tqdm

HEADER = ("| probe | overrides | step | clips | MSE true caption | opposite direction | other colour "
          "| direction gap | mean-clip direction gain (bound) |\n|---|---|---|---|---|---|---|---|---|\n")


def errors_at_noise(module, prompts, test: dict, noise: torch.Tensor) -> dict[str, float]:
    """Clean-estimate MSE at t = 1 with the true caption, the opposite direction and the next colour."""
    captions = {"true": captions_with(test["labels"]), "opposite": captions_with(test["labels"], "direction", 4),
                "colour": captions_with(test["labels"], "color", 1)}
    module.net.eval()
    errors = {k: clean_estimate_error(module, module.net, test["videos"], noise, 1.0, prompts(c).states)
              for k, c in captions.items()}
    module.net.train()
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of experiment=shapes_teacher_base")
    parser.add_argument("--label", required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--t-min", type=float, default=1.0, help="training times are drawn from U[t_min, 1]")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--clips", type=int, default=128)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    overrides = ["stage=teacher", "experiment=shapes_teacher_base", "data.max_objects=1",
                 f"data.batch_size={args.batch_size}", "stage.module.optim.warmup_steps=0", *args.overrides]
    cfg, datamodule, module, optimizer, next_batch = teacher_training(overrides)  # AdamW at a constant lr
    test, train = one_object_sets(cfg.data, args.clips)
    bound = mean_clip_error(train, test, ["color"]) - mean_clip_error(train, test, ["color", "direction"])
    noise = torch.randn(test["videos"].shape, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    rows, started = [], time.perf_counter()
    for step in tqdm(range(1, args.steps + 1), desc=args.label):
        batch = next_batch()
        x = batch["video"]
        t = args.t_min + (1 - args.t_min) * torch.rand(len(x), generator=generator, dtype=torch.float64)
        loss = module.flow_loss(batch, t, torch.randn(x.shape, generator=generator), batch["context"])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        if step % args.every == 0:
            e = errors_at_noise(module, datamodule.prompts, test, noise)
            rows.append(f"| {args.label} | {' '.join(args.overrides) or '–'} (t ~ U[{args.t_min:g}, 1]) | {step} "
                        f"| {step * len(x)} | {e['true']:.4f} | {e['opposite']:.4f} | {e['colour']:.4f} "
                        f"| {e['opposite'] - e['true']:.4f} | {bound:.4f} |")
            print(rows[-1], flush=True)
    print(f"{args.label}: {time.perf_counter() - started:.0f} s")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        text = out.read_text() if out.is_file() else HEADER
        out.write_text(text + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
