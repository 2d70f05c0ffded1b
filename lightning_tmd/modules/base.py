"""What every trainable role shares: an EMA of `self.net` for sampling, its optimizer with a warm-up
schedule (also what stage 2 steps for the role), and condition dropout to the negative prompt."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from lightning_tmd.optim import OptimizerSettings, ema_with_warmup
from lightning_tmd.parallel import load_full_state, prepare_nets, reshard


def planned_steps(trainer: L.Trainer | None) -> int | None:
    """The trainer's max_steps; None outside a Trainer (benchmarks, notebooks) or without a step limit."""
    return trainer.max_steps if trainer is not None and trainer.max_steps > 0 else None


class GeneratorModule(L.LightningModule):
    """Base for modules whose trained network is `self.net`.

    Subclasses call `init_ema(decay)` after building `self.net`, and keep `optim` (an `OptimizerSettings` as a
    dict: `OptimizerSettings.resolve` over the class's `OPTIM_DEFAULTS`) and `cond_dropout` in hparams. A role
    trained by another module (stage 2's student and critic) is stepped there with the optimizer and schedule of
    its own `configure_optimizers`, so its learning rate is set in one place.
    """

    OPTIM_DEFAULTS: dict[str, Any] = {}

    net: nn.Module
    ema: AveragedModel | None

    def init_ema(self, decay: float | None) -> None:
        """EMA of the weights used for sampling, with a decay warm-up (None: sample with the raw weights)."""
        self.ema = AveragedModel(self.net, multi_avg_fn=ema_with_warmup(decay), use_buffers=True) if decay else None
        if self.ema is not None:
            self.ema.requires_grad_(False)

    def configure_model(self) -> None:
        """Under `strategy=fsdp` (Lightning's ModelParallelStrategy): FSDP2-shard the nets; then read empty nets
        (`model.meta_init`) from model.path, each rank its shards."""
        prepare_nets(self)

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load `self.net`'s weights (full tensors; into its shards when sharded) and restart the EMA from them."""
        load_full_state(self.net, state_dict)
        if self.ema is not None:
            self.ema.module.load_state_dict(self.net.state_dict())
            self.ema.n_averaged.zero_()

    def load_teacher(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Start from a teacher's `WanNet` weights (a net that is a `WanNet`; others override)."""
        self.load_weights(state_dict)

    def sampling_net(self) -> nn.Module:
        """The EMA weights when kept, else the raw weights."""
        return self.ema.module if self.ema is not None else self.net

    def drop_condition(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(context with captions replaced by the negative prompt with probability `cond_dropout`,
        the (B,) mask of replaced rows)."""
        context = batch["context"]
        dropped = torch.rand(len(context), device=context.device) < self.hparams.cond_dropout
        return torch.where(dropped[:, None, None], batch["negative_context"], context), dropped

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimizer step, then the EMA update (before callbacks can checkpoint the step)."""
        super().optimizer_step(*args, **kwargs)
        self.update_ema()

    def extra_param_groups(self) -> list[dict[str, Any]]:
        """Parameter groups trained beside `self.net` by the same optimizer (none by default)."""
        return []

    def update_ema(self) -> None:
        if self.ema is not None:
            reshard(self.net)  # under FSDP: average the sharded weights
            self.ema.update_parameters(self.net)

    @staticmethod
    def upgrade_hparams(hparams: dict[str, Any]) -> dict[str, Any]:
        """Constructor arguments, in today's layout, of a checkpoint written while the optimizer settings were
        the role's own arguments (lr, betas, ...); {} for today's layout. Overrides for `load_from_checkpoint`
        (`generators.load_generator` passes them)."""
        return {} if "optim" in hparams else {"optim": OptimizerSettings.from_flat(hparams)}

    @property
    def optim(self) -> OptimizerSettings:
        """The role's optimizer settings."""
        return OptimizerSettings(**self.hparams.optim)

    def configure_optimizers(self, total_steps: int | None = None) -> dict[str, Any]:
        """The role's optimizer (over `self.net` and `extra_param_groups`) and its per-step LR schedule, which
        ends at `total_steps` of this optimizer (None: the trainer's max_steps)."""
        optimizer = self.optim.build(self.net, self.extra_param_groups())
        if total_steps is None:
            total_steps = planned_steps(self._trainer)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, self.optim.lr_factor(total_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
