"""Where does a teacher decide a clip's layout? Two views of one checkpoint on one-object prompts:

1. The mean clip it has learnt: its clean estimate from pure noise (t = 1) averaged over noises, as a
   profile along x (brightness above the background, averaged over y) in the first, middle and last frame,
   for a prompt moving right and the same prompt moving left. A net that uses the direction word puts
   frame 0's mass on the left for "right" and on the right for "left".
2. The sampler step by step (Euler with CFG, as `TeacherModule.sample`): the per-frame centroid of the
   bright part of the clean estimate x0(x_t) at chosen steps, so one sees when each frame's position is
   fixed and whether the frames lie on one path.

    python experiments/layout_trace.py runs/shapes_teacher/fast_motion/checkpoints/last.ckpt \
        --out experiments/results/layout_trace/fast_motion.md
"""

from __future__ import annotations

import argparse

import torch
from benchmarking import show_and_save

from lightning_tmd.generators import load_generator
from lightning_tmd.sampling import euler_sample
from lightning_tmd.schedules import shifted_grid

PAIR = ("a red circle moving right", "a red circle moving left")
TRACED = ("a red circle moving right", "a blue square moving left", "a green circle moving up",
          "a yellow square moving down")


def mean_clip_profiles(loaded, caption: str, noises: int = 16, columns: int = 16) -> torch.Tensor:
    """(T, columns): the t = 1 clean estimate averaged over `noises` noises, brightness above the
    background (max over channels + 1) averaged over rows and pooled to `columns` bins along x."""
    module, net = loaded.module, loaded.module.sampling_net()
    context = loaded.prompts([caption] * noises).states
    noise = torch.randn((noises, *loaded.clip_shape), generator=torch.Generator().manual_seed(0))
    x0 = module.x0(noise, torch.ones(noises, dtype=torch.float64), context, net).mean(0)  # (C, T, H, W)
    profile = (x0.amax(0) + 1).mean(1)  # (T, W)
    return profile.unflatten(1, (columns, -1)).mean(2)


def bright_centroids(x0: torch.Tensor, share: float = 0.4) -> torch.Tensor:
    """(N, T, 2) (x, y) centroid of the pixels brighter than `share` of each frame's brightest."""
    light = (x0.amax(1) + 1).clamp_min(0)  # (N, T, H, W)
    light = torch.where(light > share * light.flatten(2).amax(-1)[..., None, None], light, torch.zeros_like(light))
    mass = light.flatten(2).sum(-1).clamp_min(1e-6)
    xs = torch.arange(x0.shape[-1], dtype=x0.dtype)
    ys = torch.arange(x0.shape[-2], dtype=x0.dtype)
    return torch.stack([(light.sum(2) * xs).sum(-1) / mass, (light.sum(3) * ys).sum(-1) / mass], -1)


def trace_sampler(loaded, captions: tuple[str, ...], steps: int, every: int, seed: int = 0) -> list[tuple]:
    """[(t, centroids (N, T, 2))] of the clean estimate at every `every`-th Euler step and the last one,
    recorded from inside the teacher's own sampler (`euler_sample` with batched CFG)."""
    module, net = loaded.module, loaded.module.sampling_net()
    hp = module.hparams
    context = loaded.prompts(list(captions)).states
    negative = loaded.prompts.negative(len(captions)).states
    noise = torch.randn((len(captions), *loaded.clip_shape), generator=torch.Generator().manual_seed(seed))
    rows = []

    def recorded_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v = module.guided_velocity(x, t, context, negative, hp.guidance_scale, net)
        rows.append((float(t[0]), bright_centroids(x - float(t[0]) * v)))
        return v

    euler_sample(recorded_velocity, noise, shifted_grid(steps, hp.sample_shift))
    return [row for i, row in enumerate(rows) if i % every == 0 or i == steps - 1]


def numbers(values) -> str:
    return " ".join(f"{v:.1f}" for v in values)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    loaded = load_generator(args.ckpt)
    frames = loaded.clip_shape[1]
    lines = [f"Layout trace of `{args.ckpt}` (EMA weights), `python experiments/layout_trace.py {args.ckpt}`.", "",
             "**Mean clip at t = 1** (brightness above the background, averaged over rows, 16 bins left to right):",
             "", "| prompt | frame | profile |", "|---|---|---|"]
    for caption in PAIR:
        profile = mean_clip_profiles(loaded, caption)
        for k in (0, frames // 2, frames - 1):
            lines.append(f"| {caption} | {k} | " + " ".join(f"{v:.2f}" for v in profile[k].tolist()) + " |")
    lines += ["", f"**Clean-estimate centroids along the sampler** ({args.steps} Euler steps, shift "
              f"{loaded.module.hparams.sample_shift:g}, CFG {loaded.module.hparams.guidance_scale:g}, seed 0; x and y "
              "in pixels, frames 0 to last):", "", "| t | prompt | x per frame | y per frame |", "|---|---|---|---|"]
    for t, centroids in trace_sampler(loaded, TRACED, args.steps, args.every):
        for caption, c in zip(TRACED, centroids):
            lines.append(f"| {t:.3f} | {caption} | {numbers(c[:, 0].tolist())} | {numbers(c[:, 1].tolist())} |")
    show_and_save("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
