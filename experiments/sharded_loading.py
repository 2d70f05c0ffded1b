"""Meta-device construction and sharded loading (`model.meta_init`): what each rank materialises while stage 2's
nets (teacher, TMD student, critic, the student's EMA copy, discriminator) are built empty, FSDP2-sharded and read
from a Wan diffusers folder, and whether the result equals a one-process load bit for bit.

    torchrun --nproc_per_node 2 experiments/sharded_loading.py --folder <a Wan diffusers folder>
    torchrun --nproc_per_node 2 experiments/sharded_loading.py --tiny   # a tiny Wan saved to a temporary folder

Equal means: every parameter and rotary table equals the same build in one process, unsharded, and every Wan net
(teacher, critic, the student's and its EMA's) equals diffusers' own `from_pretrained` of the folder.

Counted, not read off RSS: the bytes of parameters each rank holds before sharding (the empty Wan nets hold none;
the fusion layers, gap embedding and discriminator heads are built whole, then sharded), the bytes of its shards
after reading, and the largest full tensor it held while reading (one tensor at a time). The bound checked:
peak per rank <= model / W + one Wan block.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule
from torch.distributed.tensor import DTensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_tmd.modules.dmd import DMDModule  # noqa: E402
from lightning_tmd.nets.wan import WanNet  # noqa: E402
from lightning_tmd.parallel import fill_empty_nets, shard_nets  # noqa: E402

TINY = {"patch_size": [1, 4, 4], "num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 4,
        "out_channels": 4, "text_dim": 32, "freq_dim": 16, "ffn_dim": 48, "num_layers": 4, "rope_max_seq_len": 1024}
TINY_DISCRIMINATOR = {"blocks": [2, 4], "widths": [8, 16, 16], "mlp_width": 16}


def nbytes(tensor: torch.Tensor, local: bool = False) -> int:
    if local and isinstance(tensor, DTensor):
        tensor = tensor.to_local()
    return tensor.numel() * tensor.element_size()


def stage2_module(folder: str, meta_init: bool, discriminator: dict) -> DMDModule:
    """Stage 2's module over the folder's Wan (TMD student H = 1 with an EMA), its frozen teacher built as
    `configure_model` builds it."""
    torch.manual_seed(0)  # the layers that are not in the folder start alike on every rank
    module = DMDModule({"path": folder, "meta_init": meta_init}, {"kind": "tmd", "head_blocks": 1, "ema_decay": 0.99},
                       {"discriminator": discriminator})
    module.teacher = module.build_teacher_and_starting_weights()
    return module


def full_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (the frozen teacher's and the rotary tables too), gathered whole."""
    named = [*module.named_parameters(), *module.named_buffers()]
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in named}


def offloaded_units(module: torch.nn.Module) -> list[str]:
    """The FSDP2 units that keep their shards in host memory (CPU offload policy)."""
    return sorted(name for name, m in module.named_modules() if isinstance(m, FSDPModule) and isinstance(
        m._get_fsdp_state()._fsdp_param_group.offload_policy, CPUOffloadPolicy))


def measure(folder: str, discriminator: dict, device: str, offload: tuple[str, ...]) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    module = stage2_module(folder, True, discriminator)
    before = sum(nbytes(p) for p in module.parameters() if not p.is_meta)
    empty = sum(nbytes(p) for p in module.parameters() if p.is_meta)
    shard_nets(module, init_device_mesh(device, (world,)), offload=offload)
    largest = fill_empty_nets(module, device)
    shards = sum(nbytes(p, local=True) for p in module.parameters())
    total = sum(nbytes(p) for p in module.parameters())  # a DTensor's numel is the full tensor's
    block = max(sum(nbytes(p) for p in b.parameters()) for b in module.teacher.net.transformer.blocks)
    ours = full_state(module)
    reference = stage2_module(folder, True, discriminator)  # the same build in one process, unsharded
    fill_empty_nets(reference, device)
    mismatched = [k for k, v in full_state(reference).items() if not torch.equal(v, ours[k])]
    pretrained = WanNet.from_pretrained(folder).to(device)  # and every Wan equals diffusers' own load
    wans = {name: net for name, net in module.named_modules() if isinstance(net, WanNet)}
    mismatched += [f"{name}.{k} (from_pretrained)" for name in wans for k, v in
                   {**pretrained.state_dict(), **dict(pretrained.named_buffers())}.items()
                   if not torch.equal(v, ours[f"{name}.{k}"])]
    host = offloaded_units(module)
    return {"offloaded_units": host, "offloaded_on_cpu": all(
                p.device.type == "cpu" for name in host for p in module.get_submodule(name).parameters()),
            "wan_nets": sorted(wans), "rank": rank, "world_size": world, "model_bytes": total,
            "empty_bytes_built": empty,
            "whole_bytes_before_sharding": before, "shard_bytes": shards, "largest_full_tensor_bytes": largest,
            "block_bytes": block, "peak_bytes": max(before, shards + largest),
            "bound_bytes": total // world + block, "mismatched": mismatched}


def save_tiny(folder: Path) -> None:
    torch.manual_seed(0)
    WanNet.from_config(TINY).save_pretrained(folder)


def report(rows: list[dict], folder: str) -> str:
    mib = 2**20
    lines = ["| rank | model (all nets) MiB | built empty MiB | built whole before sharding MiB | shards MiB | "
             "largest tensor read MiB | peak MiB | model / W + one block MiB | equal to one-process load |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['rank']} | {r['model_bytes'] / mib:.3f} | {r['empty_bytes_built'] / mib:.3f} | "
                     f"{r['whole_bytes_before_sharding'] / mib:.3f} | {r['shard_bytes'] / mib:.3f} | "
                     f"{r['largest_full_tensor_bytes'] / mib:.3f} | {r['peak_bytes'] / mib:.3f} | "
                     f"{r['bound_bytes'] / mib:.3f} | {'yes' if not r['mismatched'] else r['mismatched'][:3]} |")
    host = rows[0]["offloaded_units"]
    return (f"Folder: {folder}; {rows[0]['world_size']} ranks. Stage 2's nets: teacher, TMD student (H = 1) with "
            "its EMA copy, critic, discriminator. FSDP2 units kept in host memory (`strategy.offload`): "
            f"{len(host)} ({', '.join(host[:3])}{', ...' if len(host) > 3 else ''}).\n\n" + "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", help="a Wan diffusers folder (or its transformer/)")
    parser.add_argument("--tiny", action="store_true", help="save a tiny Wan to a temporary folder and use it")
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl)")
    parser.add_argument("--offload", nargs="*", default=[], help="parts kept in host memory (strategy.offload)")
    parser.add_argument("--out", default="experiments/results/sharded_loading.md")
    args = parser.parse_args()
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    folder = args.folder
    if args.tiny:  # rank 0 saves it, the others wait for it
        folder = str(Path(tempfile.gettempdir()) / f"tiny_wan_{os.environ.get('MASTER_PORT', '0')}")
        if dist.get_rank() == 0:
            save_tiny(Path(folder))
        dist.barrier()
    row = measure(folder, TINY_DISCRIMINATOR if args.tiny else {}, args.device, tuple(args.offload))
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if dist.get_rank() == 0:
        command = f"torchrun --nproc_per_node {row['world_size']} experiments/sharded_loading.py " + (
            "--tiny" if args.tiny else f"--folder {args.folder}") + "".join(f" --offload {p}" for p in args.offload)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        text = f"# Sharded loading (model.meta_init)\n\nCommand: `{command}`\n\n{report(rows, folder)}\n"
        Path(args.out).write_text(text)
        Path(args.out).with_suffix(".json").write_text(json.dumps({"rows": rows}, indent=1))
        print(text)
    dist.barrier()  # no rank tears gloo down while another still has work in flight
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
