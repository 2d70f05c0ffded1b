"""Optimisation helpers shared by the stage modules: optimizers, learning-rate schedule and EMA of weights."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch.distributed.tensor import DTensor

SCHEDULES = ("constant", "cosine")


def check_schedule(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule '{schedule}' is unknown: use one of {SCHEDULES}")


def warmup_then_decay(warmup_steps: int, schedule: str, total_steps: int | None,
                      min_ratio: float) -> Callable[[int], float]:
    """LR factor per step: linear warm-up, then constant or cosine decay to `min_ratio` at `total_steps`."""
    check_schedule(schedule)
    if schedule == "cosine" and not total_steps:
        raise ValueError("optim.schedule 'cosine' needs trainer.max_steps")
    warmup = max(1, warmup_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def ema_with_warmup(decay: float) -> Callable[[list[torch.Tensor], list[torch.Tensor], torch.Tensor], None]:
    """`multi_avg_fn` for `AveragedModel`: EMA whose decay ramps up as min(decay, (1 + n) / (10 + n)),
    so the random initial weights do not linger in the average (0.999 ** 1000 would still be 37 %)."""

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        n = float(num_averaged)
        weight = 1.0 - min(decay, (1.0 + n) / (10.0 + n))
        for sharded in (False, True):  # FSDP: sharded parameters and plain buffers in separate foreach calls
            pairs = [(a, c) for a, c in zip(averaged, current) if isinstance(a, DTensor) == sharded]
            if pairs:
                torch._foreach_lerp_([a for a, _ in pairs], [c for _, c in pairs], weight)

    return update


OPTIMIZERS = ("adamw", "muon")


def hidden_matrices(net: torch.nn.Module) -> list[str]:
    """Names of the weight matrices inside the transformer blocks: the parameters Muon orthogonalises.
    Embeddings, the output projection, the time/text MLPs, norms, biases and modulation tables are not."""
    return [name for name, p in net.named_parameters() if ".blocks." in f".{name}" and p.ndim == 2]


class MuonAdamW(torch.optim.Optimizer):
    """`torch.optim.Muon` on the hidden weight matrices and `torch.optim.AdamW` on every other parameter,
    stepped, scheduled and checkpointed as one optimizer.

    Muon's update is scaled to AdamW's RMS (`adjust_lr_fn="match_rms_adamw"`), so both share `lr` and
    `weight_decay`. The two optimizers share one `state` dict (their parameters are disjoint) and this
    optimizer's `param_groups` are theirs, so a learning-rate scheduler and `state_dict` see both.
    """

    def __init__(self, muon_params: list[torch.nn.Parameter], adamw_params: list[torch.nn.Parameter], lr: float,
                 betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0, momentum: float = 0.95,
                 eps: float = 1e-8) -> None:
        if not muon_params:
            raise ValueError("optimizer=muon: the net has no weight matrices in transformer blocks")
        self.muon = torch.optim.Muon(muon_params, lr=lr, weight_decay=weight_decay, momentum=momentum,
                                     adjust_lr_fn="match_rms_adamw")
        self.adamw = torch.optim.AdamW(adamw_params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
        super().__init__([{"params": muon_params + adamw_params}], {"lr": lr})
        self.param_groups = self.muon.param_groups + self.adamw.param_groups
        self.muon.state = self.adamw.state = self.state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # rebuilds `param_groups` and `state`: hand them to the children
        n = len(self.muon.param_groups)
        self.muon.param_groups, self.adamw.param_groups = self.param_groups[:n], self.param_groups[n:]
        self.muon.state = self.adamw.state = self.state


def check_optimizer(name: str) -> None:
    if name not in OPTIMIZERS:
        raise ValueError(f"stage.module.optim.name='{name}' is unknown: use one of {OPTIMIZERS}")


def build_optimizer(net: torch.nn.Module, name: str, lr: float, betas: tuple[float, float],
                    weight_decay: float, eps: float = 1e-8) -> torch.optim.Optimizer:
    """AdamW on every parameter (`adamw`), or Muon on the blocks' weight matrices and AdamW on the rest
    (`muon`, `MuonAdamW`)."""
    check_optimizer(name)
    if name == "muon":
        hidden = set(hidden_matrices(net))
        named = list(net.named_parameters())
        return MuonAdamW([p for n, p in named if n in hidden], [p for n, p in named if n not in hidden], lr, betas,
                         weight_decay, eps=eps)
    return torch.optim.AdamW(net.parameters(), lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)


FLAT_OPTIM_KEYS = {"optimizer": "name", "lr": "lr", "betas": "betas", "weight_decay": "weight_decay", "adam_eps": "eps",
                   "warmup_steps": "warmup_steps", "lr_schedule": "schedule", "min_lr_ratio": "min_lr_ratio"}


@dataclass(frozen=True)
class OptimizerSettings:
    """A role's optimizer and learning-rate schedule: a role module's `optim` argument (in the configs
    `stage.module.optim`, and in stage 2 `stage.module.student.optim` / `stage.module.critic.optim`).

    name: "adamw", or "muon" (Muon on the blocks' weight matrices, AdamW on the rest; `MuonAdamW`).
    lr, betas, weight_decay, eps: the optimizer's. warmup_steps: linear warm-up of the learning rate, then
    `schedule`: "constant", or "cosine" decay to `min_lr_ratio * lr` at the trainer's `max_steps`.
    """

    name: str = "adamw"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.01
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "constant"
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))  # a list from YAML or hparams

    @classmethod
    def resolve(cls, defaults: Mapping[str, Any], settings: Mapping[str, Any] | None,
                field: str = "optim") -> dict[str, Any]:
        """`settings` over a role's `defaults` over the class defaults, checked, as a plain dict (what the
        role saves in its hyper-parameters). `field` names the settings in errors."""
        values = {**defaults, **dict(settings or {})}
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"{field}.{unknown[0]} is not an optimizer setting: use {', '.join(known)}")
        check_optimizer(values.get("name", cls.name))
        check_schedule(values.get("schedule", cls.schedule))
        settled = asdict(cls(**values))
        return {**settled, "betas": [float(b) for b in settled["betas"]]}

    @staticmethod
    def from_flat(hparams: Mapping[str, Any]) -> dict[str, Any]:
        """The settings held by a checkpoint of the earlier layout, where they were a role's own arguments
        (optimizer, lr, betas, weight_decay, adam_eps, warmup_steps, lr_schedule, min_lr_ratio)."""
        return {new: hparams[old] for old, new in FLAT_OPTIM_KEYS.items() if old in hparams}

    def build(self, net: torch.nn.Module, extra_groups: list[dict[str, Any]] = ()) -> torch.optim.Optimizer:
        """The optimizer over `net` (`build_optimizer`), with `extra_groups` added (AdamW only)."""
        optimizer = build_optimizer(net, self.name, self.lr, self.betas, self.weight_decay, self.eps)
        for group in extra_groups:
            optimizer.add_param_group(group)
        return optimizer

    def lr_factor(self, total_steps: int | None) -> Callable[[int], float]:
        """The LR factor per step (`warmup_then_decay`)."""
        return warmup_then_decay(self.warmup_steps, self.schedule, total_steps, self.min_lr_ratio)
