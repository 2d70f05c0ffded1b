"""What the reliability callbacks cost per stage-2 iteration: the non-finite guard (a finiteness check of every
gradient before each optimizer step, its vote across ranks and its log) and the pre-emption handler.

    python experiments/guard_overhead.py --steps 6 --out experiments/results/guard_overhead.md

Stage 2 of `shapes_tmd` (TMD M2 N2, batch 8, random weights) under a Lightning Trainer, once without the two
callbacks and once with them, each in a fresh interpreter: median student and critic iteration over `--steps`
student iterations (and 4x as many critic iterations) after one warm-up cycle. The guard's own hook is timed
inside the guarded run, and the check of a checkpoint's weights (once per save) on its own.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from benchmarking import benchmark_arguments, run_benchmark

CONF = Path(__file__).resolve().parents[1] / "conf"
CASES = ["without the callbacks", "with NonFiniteGuard + StopOnSignal"]


def measure(case: str, steps: int) -> dict:
    import lightning as L
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from lightning_tmd.callbacks import NonFiniteGuard, StopOnSignal
    from lightning_tmd.parallel import first_nonfinite

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=shapes_tmd", "output_dir=/tmp/guard_overhead",
                                          "stage.module.student_ckpt=null", "stage.module.teacher_ckpt=null"])
    torch.manual_seed(0)
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.stage.module, _convert_="all")
    student_every = module.hparams.student_every

    class TimedGuard(NonFiniteGuard):
        seconds = 0.0

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            start = time.perf_counter()
            super().on_before_optimizer_step(trainer, pl_module, optimizer)
            self.seconds += time.perf_counter() - start

    guard = TimedGuard()

    class Timer(L.Callback):
        rows: list[tuple[bool, float, float]] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.student, self.start, self.guard = pl_module.is_student_turn(), time.perf_counter(), guard.seconds

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.rows.append((self.student, time.perf_counter() - self.start, guard.seconds - self.guard))

    guarded = case != CASES[0]
    callbacks = [Timer(), *([guard, StopOnSignal()] if guarded else [])]
    trainer = L.Trainer(accelerator="cpu", max_steps=student_every * (steps + 1), logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=callbacks)
    trainer.fit(module, datamodule=datamodule)
    rows = Timer.rows[student_every:]  # after one warm-up cycle
    result = {"case": case, "threads": torch.get_num_threads(), "student_every": student_every}
    for role, student in (("student", True), ("critic", False)):
        result[f"{role}_s"] = statistics.median([s for is_student, s, _ in rows if is_student == student])
        result[f"{role}_guard_ms"] = 1e3 * statistics.median([g for is_student, _, g in rows if is_student == student])
    state = module.state_dict()
    start = time.perf_counter()
    first_nonfinite(state)
    result["save_check_ms"] = 1e3 * (time.perf_counter() - start)
    result["weights_M"] = sum(v.numel() for v in state.values()) / 1e6
    return result


def render(rows: list[dict]) -> str:
    plain, guarded = rows
    lines = [f"Stage 2 of `shapes_tmd` (TMD M2 N2, batch 8, random weights), {plain['threads']} CPU threads, nothing "
             "else running. Iteration times are medians; the guard's hook time is measured inside the guarded run.",
             "", "| update | s / iteration without | s / iteration with | difference | guard hook (ms) | "
             "guard hook / iteration |", "|---|---|---|---|---|---|"]
    for role in ("student", "critic"):
        a, b, hook = plain[f"{role}_s"], guarded[f"{role}_s"], guarded[f"{role}_guard_ms"]
        lines.append(f"| {role} | {a:.3f} | {b:.3f} | {100 * (b - a) / a:+.1f} % | {hook:.2f} | "
                     f"{hook / 10 / b:.2f} % |")
    lines += ["", f"Checking a checkpoint's {guarded['weights_M']:.1f} M values for non-finite ones (once per save): "
              f"{guarded['save_check_ms']:.1f} ms. The pre-emption handler does nothing per iteration on one "
              "process (a flag test); with several ranks it adds one boolean all-reduce per iteration."]
    return "\n".join(lines)


def main() -> None:
    args = benchmark_arguments(__doc__, 6, "experiments/results/guard_overhead.md").parse_args()
    run_benchmark(__file__, args, measure, CASES, "Reliability callbacks: cost per stage-2 iteration", render)


if __name__ == "__main__":
    main()
