"""GPU check of what CPUs cannot cover: bf16 autocast with flash attention through stage-1 (TM-MF) and
stage-2 (DMD, TMD and DMD2-v students) iterations on a mid-size random Wan (Wan2.1-1.3B width: 1536
wide, 12 heads, FFN 8960, 4096-wide text, 16 latent channels; 6 blocks instead of 30), and FSDP2
(`fully_shard` per Wan block, bf16 `MixedPrecisionPolicy`) on one GPU. Reports seconds per iteration
and peak GPU memory as a markdown table.

    python experiments/gpu_check.py --out gpu_check.md      (or: bash experiments/gpu_check.sh)
    python experiments/gpu_check.py --num-layers 30 --head-blocks 5 --batch-size 1 --skip-fsdp   # full 1.3B size

Each check runs on its own; a failing one is reported with its error and the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import traceback
from pathlib import Path

import torch

MID_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
               out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=6, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
LATENT = (16, 5, 30, 52)  # 17 frames of 240 x 416 after the Wan VAE: 5 x 15 x 26 = 1950 tokens
TEXT_TOKENS = 512
DISCRIMINATOR = {"blocks": [2, 4, 6], "widths": [256, 512, 512], "mlp_width": 256}
MODEL = {"path": None, "config": MID_WAN, "dtype": "float32", "checkpoint_blocks": False}


def random_batch(batch_size: int, device: str = "cuda") -> dict[str, torch.Tensor]:
    return {"video": torch.randn(batch_size, *LATENT, device=device),
            "context": torch.randn(batch_size, TEXT_TOKENS, 4096, device=device),
            "negative_context": torch.randn(batch_size, TEXT_TOKENS, 4096, device=device)}


ATTENTION = {"flash_only": True}


def flash():
    """Flash attention only (fails loudly where it cannot run); PyTorch's own choice after a refusal."""
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION]) if ATTENTION["flash_only"] else nullcontext()


def timed(step, steps: int, warmup: int = 2) -> float:
    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def stage1(batch_size: int, steps: int, head_blocks: int = 1, fsdp: bool = False) -> dict:
    from lightning_tmd.modules.student import StudentModule

    torch.manual_seed(0)
    module = StudentModule(MODEL, head_blocks=head_blocks, outer_steps=2, inner_steps=2).cuda()
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in module.net.wan.transformer.blocks:
            fully_shard(block, mp_policy=policy)
        fully_shard(module.net, mp_policy=policy)
        for method in ("backbone", "head"):  # the student is called through these, not forward()
            register_fsdp_forward_method(module.net, method)
    optimizer = torch.optim.AdamW(module.net.parameters(), lr=1e-5)
    batch = random_batch(batch_size)
    losses = []

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=not fsdp), flash():
            loss = module.stage1_loss(batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.net.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())

    torch.cuda.reset_peak_memory_stats()
    seconds = timed(step, steps)
    assert all(map(lambda v: v == v, losses)), f"non-finite stage-1 loss: {losses}"
    return {"s_per_iteration": seconds, "peak_GiB": torch.cuda.max_memory_allocated() / 2**30,
            "last_loss": losses[-1]}


def stage2(student: dict, batch_size: int, iterations: int) -> dict:
    import lightning as L
    from torch.utils.data import DataLoader, Dataset

    from lightning_tmd.modules.dmd import DMDModule

    class RandomLatents(Dataset):
        def __len__(self) -> int:
            return 10_000

        def __getitem__(self, index: int) -> dict:
            g = torch.Generator().manual_seed(index)
            return {"video": torch.randn(*LATENT, generator=g),
                    "context": torch.randn(TEXT_TOKENS, 4096, generator=g),
                    "negative_context": torch.zeros(TEXT_TOKENS, 4096)}

    class Timer(L.Callback):
        def __init__(self) -> None:
            self.rows: list[tuple[str, float]] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            torch.cuda.synchronize()
            self.kind = "student" if pl_module.is_student_turn() else "critic"
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            torch.cuda.synchronize()
            self.rows.append((self.kind, time.perf_counter() - self.start))
            assert all(torch.isfinite(v).all() for v in outputs.values()), outputs

    torch.manual_seed(0)
    module = DMDModule(MODEL, {"lr": 1e-5, "warmup_steps": 0, **student}, critic={"discriminator": DISCRIMINATOR})
    timer = Timer()
    trainer = L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=iterations, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[timer])
    torch.cuda.reset_peak_memory_stats()
    with flash():
        trainer.fit(module, DataLoader(RandomLatents(), batch_size=batch_size, num_workers=2))
    student_s = [s for kind, s in timer.rows[2:] if kind == "student"]
    critic_s = [s for kind, s in timer.rows[2:] if kind == "critic"]
    return {"s_per_student_iteration": statistics.median(student_s) if student_s else None,
            "s_per_critic_iteration": statistics.median(critic_s), "iterations": len(timer.rows),
            "peak_GiB": torch.cuda.max_memory_allocated() / 2**30}


def run_check(name: str, fn, *args) -> dict:
    print(f"== {name}", flush=True)
    try:
        result = {"check": name, "ok": True, **fn(*args)}
    except Exception as error:  # report and go on with the other checks
        traceback.print_exc()
        result = {"check": name, "ok": False, "error": f"{type(error).__name__}: {error}"[:300]}
        if "No available kernel" in str(error) and ATTENTION["flash_only"]:
            ATTENTION["flash_only"] = False  # say so, and measure with PyTorch's kernel choice instead
            result = {**run_check(name + " (flash refused; default SDPA)", fn, *args), "error": result["error"]}
    torch.cuda.empty_cache()
    print(json.dumps(result), flush=True)
    return result


def table(results: list[dict], header: str) -> str:
    lines = [header, "", "| check | ok | s / iteration | s / student it. | s / critic it. | peak GiB | note |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        cells = [f"{r[k]:.3f}" if isinstance(r.get(k), float) else "–"
                 for k in ("s_per_iteration", "s_per_student_iteration", "s_per_critic_iteration", "peak_GiB")]
        lines.append(f"| {r['check']} | {'yes' if r['ok'] else 'no'} | {' | '.join(cells)} | {r.get('error', '')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--num-layers", type=int, default=6, help="Wan blocks (Wan2.1-1.3B has 30)")
    parser.add_argument("--head-blocks", type=int, default=1)
    parser.add_argument("--skip-fsdp", action="store_true")
    parser.add_argument("--out", default="gpu_check.md")
    args = parser.parse_args()
    MID_WAN["num_layers"] = args.num_layers
    blocks, h = args.num_layers, args.head_blocks
    DISCRIMINATOR["blocks"] = sorted({max(1, blocks // 3), max(1, 2 * blocks // 3), blocks})
    assert torch.cuda.is_available(), "no GPU visible"
    b, steps = args.batch_size, args.steps
    tmd = {"kind": "tmd", "head_blocks": h, "outer_steps": 2, "inner_steps": 2}
    results = [
        run_check("stage 1 TM-MF (FD), bf16 autocast, flash", stage1, b, steps, h),
        run_check("stage 2 TMD M2 N2, bf16-mixed, flash", stage2, tmd, b, 12),
        run_check("stage 2 DMD2-v M2, bf16-mixed, flash", stage2, {"kind": "one_pass", "outer_steps": 2}, b, 12),
    ]
    if not args.skip_fsdp:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29512")
        torch.distributed.init_process_group("nccl", rank=0, world_size=1)
        results.append(run_check("stage 1 TM-MF, FSDP2 fully_shard per block, bf16 policy", stage1, b, steps, h, True))
        torch.distributed.destroy_process_group()
    device = torch.cuda.get_device_name()
    header = (f"{device}, torch {torch.__version__}; random Wan (1536 wide, {blocks} blocks, H = {h}), latent "
              f"{LATENT} = 1950 tokens, {TEXT_TOKENS} text tokens, batch {b}; medians after 2 warm-up iterations")
    text = table(results, header)
    Path(args.out).write_text(f"# GPU check\n\nCommand: `python experiments/gpu_check.py`\n\n{text}\n")
    print(text)


if __name__ == "__main__":
    main()
