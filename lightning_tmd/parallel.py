"""FSDP2 for the project's nets, for Lightning's `ModelParallelStrategy` (the strategy that supports
manual optimization; `FSDPStrategy` does not).

`shard_nets` applies `fully_shard` to every `WanTransformerBlock`, then to every net around them (Wan,
TMD student, discriminator, EMA copies), innermost first. The nets call each other through methods other
than `forward` (`WanNet.embed`, `TMDStudent.head`, ...): those listed in a class's `fsdp_methods` are
registered so that FSDP gathers the net's own parameters around them.

Precision: the blocks gather their weights in `param_dtype` (bf16 on GPUs) and FSDP casts their inputs.
The Wan and TMD nets take times (t, s, r) beside activations, so FSDP does not cast their inputs (it would
round t = 0.999 to 1.0 and s = 0.605 to 0.60547 in bf16); they cast activations to their weights' dtype
themselves. The flow head of a TMD student (its blocks and the layers of its nets) can gather in another
dtype, `head_param_dtype`: fp32 lets stage 1's finite difference d/ds run in fp32 (docs/method.md §Stage 1).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from diffusers.models.transformers.transformer_wan import WanTransformerBlock
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.distributed.tensor import DTensor

from lightning_tmd.nets.discriminator import Discriminator
from lightning_tmd.nets.tmd_student import TMDStudent
from lightning_tmd.nets.wan import WanNet
from lightning_tmd.nets.wan_parts import copy_full

SHARDED_NETS = (WanNet, TMDStudent, Discriminator)


def dtype_of(name: str | None) -> torch.dtype | None:
    return getattr(torch, name) if name else None


class FSDP2Strategy(ModelParallelStrategy):
    """`ModelParallelStrategy` (data parallel only) with the settings `shard_nets` reads.

    Args:
        param_dtype: dtype of the gathered parameters in forward/backward (bf16 on GPUs; the sharded
            master weights and the optimizer state stay fp32). None: no casting.
        reduce_dtype: dtype of the gradient reduce-scatter.
        reshard_after_forward: free gathered block parameters after forward (ZeRO-3); False keeps them
            until backward (ZeRO-2: more memory, fewer all-gathers).
        head_param_dtype: dtype of the gathered parameters of TMD students' flow heads (their last H blocks
            and the nets' own layers); None: `param_dtype`. "float32" makes stage 1's finite difference exact
            to fp32 (under autocast the head's other calls still compute in bf16).
        offload: parts of the LightningModule (`teacher`, `student`, `critic` in stage 2; `net`, `ema` in the
            others) whose shards, gradients and optimizer states live in host memory (FSDP2's CPU offload: each
            unit's weights come to the GPU while gathered, the optimizer steps them on the CPU).
    Other keyword arguments go to `ModelParallelStrategy` (`save_distributed_checkpoint`, ...).
    """

    def __init__(self, param_dtype: str | None = "bfloat16", reduce_dtype: str | None = "float32",
                 reshard_after_forward: bool = True, head_param_dtype: str | None = None,
                 offload: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, **kwargs)
        self.mp_policy = MixedPrecisionPolicy(param_dtype=dtype_of(param_dtype), reduce_dtype=dtype_of(reduce_dtype))
        self.head_mp_policy = replace(self.mp_policy, param_dtype=dtype_of(head_param_dtype or param_dtype))
        self.reshard_after_forward = reshard_after_forward
        self.offload = tuple(offload or ())

    def model_to_device(self) -> None:
        """With offloaded parts: every parameter is an FSDP2 shard already placed (on the device, or in host
        memory when offloaded), so only the buffers move; a blanket `.to(device)` would pull the offloaded
        shards onto the GPU."""
        if not self.offload:
            return super().model_to_device()
        for module in self.model.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = buffer.to(self.root_device)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # every process is a data-parallel rank
        super().setup_environment()


def process_rank() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_sharded(module: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in module.parameters())


def offloaded_modules(module: nn.Module, parts: tuple[str, ...]) -> set[int]:
    """The ids of every module inside the named parts of `module` (`strategy.offload`)."""
    names = [name for name, _ in module.named_children()]
    ids = set()
    for part in parts:
        if part not in names:
            raise ValueError(f"strategy.offload: '{part}' is not a part of {type(module).__name__}; choose from "
                             f"{names}")
        ids |= {id(m) for m in module.get_submodule(part).modules()}
    return ids


def shard_nets(module: nn.Module, mesh: Any, mp_policy: MixedPrecisionPolicy | None = None,
               reshard_after_forward: bool = True, head_mp_policy: MixedPrecisionPolicy | None = None,
               offload: tuple[str, ...] = ()) -> None:
    """`fully_shard` each Wan block, then each net containing them, innermost first; every parameter
    must end up in a unit (else its gradients would not be reduced across ranks). The flow heads of TMD
    students gather with `head_mp_policy` (default: `mp_policy`); the units inside the parts named in
    `offload` keep their shards in host memory (marked `host_offload`)."""
    check_identical_across_ranks(module)
    policy = mp_policy or MixedPrecisionPolicy()
    head_policy = head_mp_policy or policy
    head = {id(m) for student in module.modules() if isinstance(student, TMDStudent)
            for m in (student, student.wan, *student.wan.transformer.blocks[student.split:])}
    host = offloaded_modules(module, offload)

    def shard(unit: nn.Module, **kwargs: Any) -> None:
        if id(unit) in host:
            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
            unit.host_offload = True
        fully_shard(unit, mesh=mesh, **kwargs)

    for block in [m for m in module.modules() if isinstance(m, WanTransformerBlock)]:
        shard(block, reshard_after_forward=reshard_after_forward,
              mp_policy=head_policy if id(block) in head else policy)
    nets = [m for m in module.modules() if isinstance(m, SHARDED_NETS)]
    for net in reversed(nets):  # modules() lists outer nets before the nets inside them
        net_policy = head_policy if id(net) in head else policy
        if isinstance(net, (WanNet, TMDStudent)):  # times pass uncast; the nets cast activations themselves
            net_policy = replace(net_policy, cast_forward_inputs=False)
        # a net's own weights (embeddings, fusion, output layer) are small: they stay gathered from
        # forward to backward, so nested method calls and outputs FSDP cannot trace are safe
        shard(net, reshard_after_forward=False, mp_policy=net_policy)
        for name in getattr(type(net), "fsdp_methods", ()):
            register_fsdp_forward_method(net, name)
    left = [name for name, p in module.named_parameters() if not isinstance(p, DTensor)]
    if left:
        raise RuntimeError(f"parameters outside every FSDP unit (their gradients would not be reduced): {left[:5]}")


def check_identical_across_ranks(module: nn.Module) -> None:
    """Every rank must start from the same weights (randomly initialised fusion layers and discriminator
    heads included): compare a float64 checksum of all parameters across ranks."""
    _, world = process_rank()
    if world == 1:
        return
    with torch.no_grad():  # empty (meta-device) nets are read from the same folder on every rank after sharding
        checksum = float(sum(p.detach().double().sum() + p.detach().double().abs().sum() for p in module.parameters()
                             if not p.is_meta))
    sums = [None] * world
    dist.all_gather_object(sums, checksum)
    if len(set(sums)) > 1:
        raise RuntimeError(f"the ranks hold different weights before sharding (checksums {sums}): build the model "
                           "with the same seed on every rank (train.py seeds before instantiating)")


def shard_for_strategy(module: Any) -> None:
    """In a LightningModule's `configure_model`: shard its nets when the trainer's strategy is a
    `ModelParallelStrategy` (it sets `module.device_mesh`); once only."""
    mesh = module.device_mesh
    if mesh is None or is_sharded(module):
        return
    strategy = module.trainer.strategy
    shard_nets(module, mesh["data_parallel"], getattr(strategy, "mp_policy", None),
               getattr(strategy, "reshard_after_forward", True), getattr(strategy, "head_mp_policy", None),
               getattr(strategy, "offload", ()))


def fill_empty_nets(module: nn.Module, device: torch.device | str) -> int:
    """After sharding (or without FSDP): allocate and read every empty Wan net in `module` (`model.meta_init`:
    teacher, student, critic and their EMA copies) from its folder, each rank its own shards. Returns the bytes
    of the largest full tensor read (0 when nothing was empty)."""
    largest = max((net.fill_empty("cpu" if getattr(net, "host_offload", False) else device)
                   for net in module.modules()
                   if isinstance(net, WanNet) and net.weights_folder is not None
                   and any(p.is_meta for p in net.parameters())), default=0)
    left = [name for name, p in module.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"parameters left on the meta device after filling the empty nets: {left[:5]}")
    return largest


def root_device(module: Any) -> torch.device:
    """The device a LightningModule's trainer runs it on (the CPU outside a Trainer)."""
    return module.trainer.strategy.root_device if module._trainer is not None else torch.device("cpu")


def prepare_nets(module: Any) -> None:
    """A LightningModule's `configure_model`: shard its nets under FSDP, then read the empty ones
    (`model.meta_init`) from their folder onto the trainer's device."""
    shard_for_strategy(module)
    fill_empty_nets(module, root_device(module))


def load_full_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """`module.load_state_dict(state)` from full tensors, also into FSDP-sharded (DTensor) parameters: each rank
    copies its own shards, one tensor at a time."""
    if not is_sharded(module):
        module.load_state_dict(state)
        return
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise KeyError(f"the weights do not fit the net: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, target in own.items():
        copy_full(target, state[key])


def reshard(module: nn.Module) -> None:
    """Put FSDP-sharded nets back into their sharded parameters (nets keep their own weights gathered
    from forward on; the EMA update needs the sharded ones). No-op without FSDP."""
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def full_value(value: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (e.g. a gradient norm under FSDP); plain tensors pass through."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def local_value(value: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; plain tensors pass through."""
    return value.to_local() if isinstance(value, DTensor) else value


def first_nonfinite(state: dict) -> str | None:
    """The key of the first floating-point tensor with a non-finite value (on this rank's shards) in a nested
    state dict, else None."""
    for key, value in state.items():
        if isinstance(value, dict):
            inner = first_nonfinite(value)
            if inner is not None:
                return f"{key}.{inner}"
        elif isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(
                local_value(value)).all():
            return str(key)
    return None
