"""Seconds per stage-2 iteration (student and critic updates) on this machine, next to the sum of the
network passes each update needs, timed one by one.

    python experiments/stage2_speed.py --steps 10 --out experiments/results/stage2_speed.md

Each variant (TMD M2 N2 from `shapes_tmd`, DMD2-v M2 from `shapes_dmd2v`) runs in a fresh subprocess
(its own peak RSS) on real shapes batches (batch 8, 512 tokens) under a Lightning Trainer: the median
student and critic iteration over `--steps` iterations of each kind after warm-up. Then the passes:

    student update: student forward+backward | teacher CFG x0 (2B, no grad) | fake-score x0 (no grad)
                    | teacher features + discriminator, forward+backward to the input | AdamW step
    critic update:  student forward (no grad) | fake-score denoising forward+backward
                    | teacher features (2B, no grad) + discriminator forward+backward | AdamW step
"""

from __future__ import annotations

import resource
import statistics
import time
from pathlib import Path

import torch
from benchmarking import benchmark_arguments, run_benchmark

CONF = Path(__file__).resolve().parents[1] / "conf"
VARIANTS = {"TMD M2 N2 (shapes_tmd)": "shapes_tmd", "DMD2-v M2 (shapes_dmd2v)": "shapes_dmd2v"}


def median_time(fn, repeats: int) -> float:
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        fn()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(variant: str, steps: int) -> dict:
    import lightning as L
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from lightning_tmd.losses import discriminator_loss, generator_gan_loss
    from lightning_tmd.schedules import interpolate

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={VARIANTS[variant]}", "output_dir=/tmp/stage2_speed",
                                          "stage.module.student_ckpt=null", "stage.module.teacher_ckpt=null"])
    torch.manual_seed(0)
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.stage.module, _convert_="all")
    student_every = module.hparams.student_every
    iterations = student_every * (steps + 1)

    class Timer(L.Callback):
        rows: list[tuple[bool, float]] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.student, self.start = pl_module.is_student_turn(), time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.rows.append((self.student, time.perf_counter() - self.start))

    timer = Timer()
    trainer = L.Trainer(accelerator="cpu", max_steps=iterations, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
    trainer.fit(module, datamodule=datamodule)
    student_s = statistics.median([s for student, s in timer.rows[student_every:] if student])
    critic_s = statistics.median([s for student, s in timer.rows[student_every:] if not student])

    batch = datamodule.on_before_batch_transfer(next(iter(datamodule.train_dataloader())), 0)
    x, context, negative = batch["video"], batch["context"], batch["negative_context"]
    t = module.critic.sample_t(len(x), x.device)
    noise = torch.randn_like(x)
    student_opt, critic_opt = trainer.optimizers
    for p in module.parameters():  # what toggling does during training: no grads outside the timed role
        p.requires_grad_(False)

    def with_grads(params, fn):
        def run():
            for p in params:
                p.requires_grad_(True)
            fn()
            for p in params:
                p.requires_grad_(False)
                p.grad = None
        return run

    student_params = list(module.student.net.parameters())
    critic_params = list(module.critic.parameters())
    x_hat = module.student_sample(x, context).detach()
    x_hat_t = interpolate(x_hat, noise, t)

    def gan_generator():
        x_in = x_hat_t.clone().requires_grad_(True)
        generator_gan_loss(module.discriminate(x_in, t, context)).backward()

    def gan_critic():
        with torch.no_grad():
            features = module.teacher.discriminator_features(torch.cat([x_hat_t, interpolate(x, noise, t)]),
                                                             torch.cat([t, t]), torch.cat([context, context]),
                                                             module.critic.discriminator.blocks)
        fake, real = module.critic.discriminator(features).chunk(2)
        discriminator_loss(real, fake).backward()

    def adam_step(optimizer, params):
        def run():
            for p in params:
                p.grad = torch.zeros_like(p)
            optimizer.step()
        return run

    repeats = max(3, steps // 2)
    passes = {
        "student": {
            "student forward+backward": with_grads(student_params, lambda: module.student_sample(x, context)
                                                   .square().mean().backward()),
            "teacher CFG x0 (2B)": lambda: module.teacher_x0(x_hat_t, t, context, negative),
            "fake-score x0": lambda: torch.no_grad()(module.critic.x0)(x_hat_t, t, context),
            "teacher features + D, fwd+bwd": gan_generator,
            "AdamW step": adam_step(student_opt, student_params),
        },
        "critic": {
            "student forward (no grad)": lambda: torch.no_grad()(module.student_sample)(x, context),
            "fake-score denoising fwd+bwd": with_grads(list(module.critic.net.parameters()), lambda: module.critic
                                                       .denoising_loss_on(x_hat, context, t, noise).backward()),
            "teacher features (2B) + D fwd+bwd": with_grads(list(module.critic.discriminator.parameters()), gan_critic),
            "AdamW step": adam_step(critic_opt, critic_params),
        },
    }
    timed = {role: {name: median_time(fn, repeats) for name, fn in parts.items()} for role, parts in passes.items()}
    return {"variant": variant, "student_s": student_s, "critic_s": critic_s, "passes": timed,
            "peak_rss_GB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
            "threads": torch.get_num_threads(), "student_every": student_every}


def table(rows: list[dict]) -> str:
    lines = ["| variant | update | s / iteration | sum of its passes | ratio | peak RSS (GB) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        for role in ("student", "critic"):
            total = sum(r["passes"][role].values())
            lines.append(f"| {r['variant']} | {role} | {r[f'{role}_s']:.3f} | {total:.3f} | "
                         f"{r[f'{role}_s'] / total:.2f} | {r['peak_rss_GB']:.2f} |")
    k = rows[0]["student_every"]
    lines += ["", f"One cycle of {k} iterations (1 student + {k - 1} critic updates): "
              + ", ".join(f"{r['variant']} {r['student_s'] + (k - 1) * r['critic_s']:.2f} s" for r in rows) + "."]
    for r in rows:
        lines += ["", f"Passes of {r['variant']} (s):", "", "| update | pass | s |", "|---|---|---|"]
        lines += [f"| {role} | {name} | {s:.3f} |" for role, parts in r["passes"].items() for name, s in parts.items()]
    return "\n".join(lines)


def main() -> None:
    parser = benchmark_arguments(__doc__, 6, "experiments/results/stage2_speed.md")
    args = parser.parse_args()

    def render(rows: list[dict]) -> str:
        return (f"Stage 2 on the embedded teacher: batch 8, 512 tokens, {rows[0]['threads']} threads, random weights "
                "(the cost does not depend on them); discriminator heads on teacher blocks 2, 4, 6; --steps timed "
                "student iterations and 4x as many critic iterations.\n\n" + table(rows))

    run_benchmark(__file__, args, measure, list(VARIANTS), "Stage-2 speed on this machine", render)


if __name__ == "__main__":
    main()
