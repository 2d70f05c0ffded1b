"""Seconds per TMD stage-1 step (finite-difference vs JVP d/ds, and plain TM) and student sampling
latency on this machine.

    python experiments/stage1_speed.py --steps 10 --out experiments/results/stage1_speed.md

Each variant runs in a fresh subprocess (its own peak RSS) on the `shapes_tmd_stage1` experiment
(batch 8, 512 tokens, H = 2 of 6 blocks): the median of `--steps` timed steps (stage-1 loss with CFG
target, backward, AdamW, after 2 warm-up steps) on real shapes batches with cached text, then the
time to sample 8 clips at each (M, N). With the teacher checkpoint of the experiment present, the
student starts from it, and the finite-difference d/ds is compared with the JVP on one batch.
"""

from __future__ import annotations

import resource
import statistics
import time
from pathlib import Path

import torch
from benchmarking import benchmark_arguments, run_benchmark

CONF = Path(__file__).resolve().parents[1] / "conf"
VARIANTS = {  # name -> stage.module overrides
    "TM-MF, finite difference": ["stage.module.derivative=finite_difference"],
    "TM-MF, JVP": ["stage.module.derivative=jvp"],
    "TM (r = s)": ["stage.module.objective=tm"],
}
SAMPLERS = [(1, 2), (2, 2), (2, 4)]


def measure(variant: str, steps: int) -> dict:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    overrides = ["experiment=shapes_tmd_stage1", "output_dir=/tmp", *VARIANTS[variant]]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    torch.manual_seed(0)
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.stage.module, _convert_="all")
    from_teacher = Path(cfg.stage.module.teacher_ckpt or "").is_file()
    if from_teacher:
        module.setup("fit")  # the teacher's weights (the cost is the same with random ones)
    agreement = fd_vs_jvp(module, datamodule.on_before_batch_transfer(next(iter(datamodule.train_dataloader())), 0))
    optimizer = module.configure_optimizers()["optimizer"]
    batches = iter(datamodule.train_dataloader())
    times = []
    for i in range(steps + 2):
        batch = datamodule.on_before_batch_transfer(next(batches), 0)
        start = time.perf_counter()
        loss = module.stage1_loss(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        module.update_ema()
        if i >= 2:
            times.append(time.perf_counter() - start)
    sampling = {}
    context = datamodule.prompts(["a red circle moving up"] * 8).states
    for m, n in SAMPLERS:
        start = time.perf_counter()
        _, nfe = module.sample(context, shape=datamodule.clip_shape, outer_steps=m, inner_steps=n)
        sampling[f"M{m}N{n}"] = (time.perf_counter() - start, nfe)
    return {"variant": variant, "step_s": statistics.median(times), "sampling": sampling,
            "fd_vs_jvp": agreement, "from_teacher": from_teacher,
            "peak_rss_GB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
            "threads": torch.get_num_threads()}


def fd_vs_jvp(module, batch: dict, deltas: tuple[float, ...] = (5e-3, 1e-3, 2e-4)) -> dict[str, float]:
    """||FD - JVP|| / ||JVP|| of d/ds u_theta on one batch at s ~ U(0.1, 0.9), r = the inner grid point
    below, for each finite-difference delta."""
    from lightning_tmd.schedules import grid_floor, interpolate

    x = batch["video"]
    g = torch.Generator().manual_seed(0)
    s = 0.1 + 0.8 * torch.rand(len(x), generator=g, dtype=torch.float64)
    r = grid_floor(module.inner_grid(), s)
    t = module.outer_grid()[:1].expand(len(x))
    x1, y1 = torch.randn(x.shape, generator=g), torch.randn(x.shape, generator=g)
    y = x1 - x
    y_s = interpolate(y, y1, s)
    hp = module.hparams
    with torch.no_grad():
        main = module.net.backbone(interpolate(x, x1, t), t, batch["context"])
    hp.derivative = "jvp"
    exact = module.dds(main, y1, y_s, s, r, y1 - y)
    hp.derivative, default_delta = "finite_difference", hp.fd_delta
    out = {}
    for delta in deltas:
        hp.fd_delta = delta
        out[f"{delta:g}"] = ((module.dds(main, y1, y_s, s, r, y1 - y) - exact).norm() / exact.norm()).item()
    hp.fd_delta = default_delta
    return out


def table(rows: list[dict]) -> str:
    head = "| stage-1 variant | s / step | peak RSS (GB) | threads |"
    lines = [head, "|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['step_s']:.3f} | {r['peak_rss_GB']:.2f} | {r['threads']} |" for r in rows]
    start = "the teacher-initialised" if rows[0]["from_teacher"] else "a randomly initialised"
    agreement = ", ".join(f"{v:.4f} at delta = {k}" for k, v in rows[0]["fd_vs_jvp"].items())
    lines += ["", f"Finite difference vs JVP of d/ds u on {start} student, one batch: relative difference "
              f"||FD - JVP|| / ||JVP|| = {agreement}."]
    sampling = rows[0]["sampling"]
    lines += ["", "| sampler (M, N) | effective NFE | s / 8 clips |", "|---|---|---|"]
    lines += [f"| {name} | {nfe:.3f} | {seconds:.3f} |" for name, (seconds, nfe) in sampling.items()]
    return "\n".join(lines)


def main() -> None:
    args = benchmark_arguments(__doc__, 10, "experiments/results/stage1_speed.md").parse_args()
    note = "shapes_tmd_stage1: batch 8, 512 tokens, H = 2 of 6 blocks\n\n"
    run_benchmark(__file__, args, measure, list(VARIANTS), "Stage-1 speed on this machine",
                  lambda rows: note + table(rows))


if __name__ == "__main__":
    main()
