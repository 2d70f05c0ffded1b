"""The memory estimator: state bytes equal the live tensors after a real optimizer step (stage 1 and
stage 2), parameter counts of the real classes built on meta, and the saved-tensor count."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from conftest import TINY_WAN
from diffusers import WanTransformer3DModel
from torch.utils.data import DataLoader

from lightning_tmd.analysis.memory import (
    WAN21_T2V_1_3B,
    Setup,
    Stage,
    build_stage,
    count_roles,
    saved_bytes,
    stage_updates,
    state_bytes,
)

TINY_STAGE2 = dict(head_blocks=1, inner_steps=2, disc_blocks=(1, 3), disc_widths=(8, 8, 8), disc_mlp_width=8)
CLIP = (3, 2, 8, 8)  # pixel clips of 2 frames of 8 x 8 for the 3-channel tiny Wan: 16 tokens


def batch(n: int = 2) -> dict[str, torch.Tensor]:
    return {"video": torch.randn(n, *CLIP), "context": torch.randn(n, 5, 16), "negative_context": torch.zeros(n, 5, 16)}


def live_state_bytes(module: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> int:
    """Parameters (trained, frozen and EMA), their gradients and the optimizers' state tensors."""
    params = list(module.parameters())
    total = sum(p.nbytes for p in params) + sum(p.grad.nbytes for p in params if p.grad is not None)
    return total + sum(t.nbytes for opt in optimizers for state in opt.state.values() for t in state.values()
                       if torch.is_tensor(t))


def test_stage1_state_bytes_equal_the_live_tensors_after_one_step():
    module = build_stage(TINY_WAN, Stage("tm", head_blocks=1, inner_steps=2, ema=True), device="cpu")
    optimizer = module.configure_optimizers()["optimizer"]
    module.stage1_loss(batch())["loss"].backward()
    optimizer.step()
    module.update_ema()
    roles = count_roles(module)
    assert [r.name for r in roles] == ["student", "ema"]
    assert sum(state_bytes(roles, Setup("single", frozen_bytes=4)).values()) == live_state_bytes(module, [optimizer])


@pytest.mark.parametrize("student", ["tmd", "one_pass"])
def test_stage2_state_bytes_equal_the_live_tensors_after_a_student_and_a_critic_step(student):
    """Iteration 0 updates the student, iteration 1 critic + discriminator; each role's gradients are freed
    after its step, so the states an update holds are every role's weights and optimizer states and its own
    gradients."""
    module = build_stage(TINY_WAN, Stage("dmd", student, **TINY_STAGE2), device="cpu")
    data = [{k: v[0] for k, v in batch(1).items()} for _ in range(4)]
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(data, batch_size=2))
    assert module.iteration == 2
    roles = count_roles(module)
    assert [(r.name, r.kind) for r in roles] == [("student", "trained"), ("critic", "trained"),
                                                 ("discriminator", "trained"), ("teacher", "frozen")]
    states = state_bytes(roles, Setup("single", frozen_bytes=4), held_gradients=())  # the tiny modules are all fp32
    assert states["ddp_buckets"] == 0 and states["gradients"] == 0
    assert all(p.grad is None for p in module.parameters())
    assert sum(states.values()) == live_state_bytes(module, trainer.optimizers)
    student_update = state_bytes(roles, Setup("single", frozen_bytes=4), held_gradients=("student",))
    assert student_update["gradients"] == 4 * roles[0].params


def wan_parameters(c: dict) -> int:
    """WanTransformer3DModel's parameter count written out by hand from its layers."""
    D, F, text, freq = c["num_attention_heads"] * c["attention_head_dim"], c["ffn_dim"], c["text_dim"], c["freq_dim"]
    patch = math.prod(c["patch_size"])
    attention = 4 * (D * D + D) + 2 * D  # q, k, v, out projections; RMSNorm weights on q and k
    block = 2 * attention + 2 * D + (D * F + F + F * D + D) + 6 * D  # cross-attn LayerNorm, FFN, AdaLN table
    root = (c["in_channels"] * patch * D + D) + (freq * D + D + D * D + D) + (D * 6 * D + 6 * D) \
        + (text * D + D + D * D + D) + (D * c["out_channels"] * patch + c["out_channels"] * patch) + 2 * D
    return c["num_layers"] * block + root


def test_wan_1_3b_parameters_from_the_meta_built_classes():
    with torch.device("meta"):
        diffusers_count = sum(p.numel() for p in WanTransformer3DModel(**WAN21_T2V_1_3B).parameters())
    roles = {r.name: r for r in count_roles(build_stage(WAN21_T2V_1_3B, Stage("dmd", "tmd")))}
    assert roles["teacher"].params == roles["critic"].params == diffusers_count == wan_parameters(WAN21_T2V_1_3B)
    assert 1.40e9 < diffusers_count < 1.44e9
    D, F = 1536, 8960
    fusion, gap = (2 * D * F + F + D) + 3 * D + 1, (256 * D + D) + (D * D + D)  # gated MLP + table + gate; emb(s-r)
    assert roles["student"].params == diffusers_count + fusion + gap
    assert roles["teacher"].block * 30 + roles["teacher"].root == diffusers_count


def test_states_are_replicated_by_ddp_and_divided_by_fsdp():
    roles = count_roles(build_stage(WAN21_T2V_1_3B, Stage("tm")))
    trained = roles[0].params
    ddp, fsdp = state_bytes(roles, Setup("ddp")), state_bytes(roles, Setup("fsdp", gpus=8))
    assert ddp["ddp_buckets"] == 4 * trained and ddp["weights"] + ddp["gradients"] == 8 * trained
    assert fsdp["weights"] == pytest.approx(4 * trained / 8) and fsdp["ddp_buckets"] == 0
    assert fsdp["optimizer"] == pytest.approx(8 * trained / 8 + 4 * roles[0].tensors)  # step counters unsharded


def test_offloaded_roles_leave_their_states_on_the_host():
    roles = count_roles(build_stage(WAN21_T2V_1_3B, Stage("dmd", **TINY_STAGE2)))
    on_gpu = state_bytes(roles, Setup("fsdp", gpus=8))
    offloaded = state_bytes(roles, Setup("fsdp", gpus=8, offload=("student", "critic", "discriminator")))
    teacher = [r for r in roles if r.name == "teacher"]
    assert sum(offloaded.values()) == pytest.approx(sum(state_bytes(teacher, Setup("fsdp", gpus=8)).values()))
    assert sum(offloaded.values()) < 0.2 * sum(on_gpu.values())
    with pytest.raises(ValueError, match="CPU offload is FSDP2's"):
        Setup("ddp", offload=("student",))


def test_saved_bytes_counts_each_saved_storage_once_and_skips_parameters():
    x = torch.randn(4, 8, requires_grad=True)
    assert saved_bytes(lambda a: a * a, x) == x.nbytes  # x saved twice, one storage
    assert saved_bytes(torch.sigmoid, x) == x.nbytes  # the output
    linear = torch.nn.Linear(8, 3)
    assert saved_bytes(linear, x) == x.nbytes  # the input; the weight is a parameter
    assert saved_bytes(lambda a: a * a, x, exclude=(x,)) == 0


def test_stage_passes_and_bad_settings():
    tmd, critic = stage_updates(Stage("dmd", "tmd", head_blocks=5, inner_steps=4, disc_blocks=(19, 29, 39)), 40)
    assert dict((p, c) for p, c, _ in tmd.passes)["block"] == 35 + 4 * 5
    assert dict((p, c) for p, c, _ in tmd.passes)["frozen_block"] == 39
    assert dict((p, k) for p, _, k in critic.passes)["disc"] == 2  # real and fake
    with pytest.raises(ValueError, match="Stage.kind 'kd' is unknown"):
        build_stage(TINY_WAN, Stage("kd"))
    with pytest.raises(ValueError, match="Setup.strategy 'zero3' is unknown"):
        Setup("zero3")
