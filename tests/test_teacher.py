import copy

import pytest
import torch
from conftest import TINY_WAN

from lightning_tmd.modules.teacher import TeacherModule


def teacher(**kwargs):
    return TeacherModule({"config": TINY_WAN}, **kwargs).eval()


def batch_inputs(batch=2):
    return torch.randn(batch, 3, 4, 8, 8), torch.tensor([0.9, 0.2], dtype=torch.float64), torch.randn(batch, 5, 16)


def test_cfg_with_scale_one_equals_the_conditional_prediction():
    module = teacher()
    x, t, ctx = batch_inputs()
    neg = torch.randn_like(ctx)
    with torch.no_grad():
        cond = module.velocity(x, t, ctx)
        torch.testing.assert_close(module.guided_velocity(x, t, ctx, neg, 1.0), cond, atol=1e-5, rtol=0)
        uncond = module.velocity(x, t, neg)
        torch.testing.assert_close(module.guided_velocity(x, t, ctx, neg, 3.0), uncond + 3 * (cond - uncond),
                                   atol=1e-5, rtol=1e-5)


def test_x0_is_x_t_minus_t_v():
    module = teacher()
    x, t, ctx = batch_inputs()
    with torch.no_grad():
        expected = x - t.float().view(-1, 1, 1, 1, 1) * module.velocity(x, t, ctx)
        torch.testing.assert_close(module.x0(x, t, ctx), expected)


def test_sample_reports_nfe_and_is_seeded():
    module = teacher()
    ctx, neg = torch.randn(2, 5, 16), torch.randn(2, 5, 16)

    def run(**kw):
        return module.sample(ctx, neg, shape=(3, 4, 8, 8), steps=3, generator=torch.Generator().manual_seed(1), **kw)

    clips, nfe = run(guidance_scale=4.0)
    assert clips.shape == (2, 3, 4, 8, 8) and nfe == 6
    assert torch.equal(clips, run(guidance_scale=4.0)[0])
    assert run(guidance_scale=1.0)[1] == 3
    # shifted_grid(3, 3) = [0.999, 0.857, 0.600, 0]: CFG at the first step only
    clips_interval, nfe = run(guidance_scale=4.0, guidance_interval=[0.95, 1.0])
    assert nfe == 4 and not torch.equal(clips_interval, clips)
    torch.testing.assert_close(run(guidance_scale=4.0, guidance_interval=[0.0, 1.0])[0], clips)


def test_a_bad_guidance_interval_is_named():
    with pytest.raises(ValueError, match="guidance_interval"):
        teacher(guidance_interval=[0.8, 0.2])
    with pytest.raises(ValueError, match="guidance_interval"):
        teacher().sample(torch.randn(1, 5, 16), torch.randn(1, 5, 16), shape=(3, 4, 8, 8), steps=2,
                         guidance_interval=[0.5, 1.5])


def test_stochastic_sampler_is_fixed_by_the_starting_noise():
    module = teacher()
    ctx, neg = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    noise = torch.randn(2, 3, 4, 8, 8, generator=torch.Generator().manual_seed(2))

    def run(churn):
        return module.sample(ctx, neg, noise=noise, steps=3, churn=churn)

    clips, nfe = run(0.3)
    assert nfe == 6 and torch.equal(clips, run(0.3)[0])  # churn noise seeded by the starting noise
    assert not torch.allclose(clips, run(0.0)[0])


def test_ema_follows_the_weights():
    module = teacher(ema_decay=0.5)
    before = [p.clone() for p in module.ema.module.parameters()]
    with torch.no_grad():
        for p in module.net.parameters():
            p.add_(1.0)
    module.update_ema()  # the first update copies
    module.update_ema()
    for b, e, p in zip(before, module.ema.module.parameters(), module.net.parameters()):
        torch.testing.assert_close(e, p)
        assert not torch.equal(b, e)
    assert module.sampling_net() is module.ema.module


def test_ema_decay_warms_up_from_the_first_update():
    module = teacher(ema_decay=0.999)
    module.update_ema()  # copies
    with torch.no_grad():
        for p in module.net.parameters():
            p.add_(1.0)
    module.update_ema()  # n = 1: decay min(0.999, 2 / 11)
    ema, net = next(module.ema.module.parameters()), next(module.net.parameters())
    torch.testing.assert_close(net - ema, torch.full_like(ema, 2 / 11))


def test_lr_warms_up_then_decays_by_cosine():
    from lightning_tmd.optim import warmup_then_decay

    factor = warmup_then_decay(10, "cosine", 110, 0.1)
    assert factor(0) == 0.1 and factor(9) == 1.0
    assert factor(10) == 1.0 and abs(factor(60) - 0.55) < 1e-9 and abs(factor(110) - 0.1) < 1e-9
    assert warmup_then_decay(10, "constant", None, 0.1)(500) == 1.0


def test_optimizers_are_built_outside_a_trainer():
    config = teacher(optim={"lr": 1e-3}).configure_optimizers()
    assert config["optimizer"].param_groups[0]["lr"] == 1e-3 * config["lr_scheduler"]["scheduler"].lr_lambdas[0](0)


def test_optimizer_settings_are_one_typed_group_over_the_roles_defaults():
    from lightning_tmd.optim import OptimizerSettings

    module = teacher(optim={"lr": 1e-3})
    assert module.optim == OptimizerSettings(lr=1e-3, warmup_steps=200)  # the teacher's default warm-up stays
    assert module.hparams.optim["warmup_steps"] == 200  # saved whole, so a checkpoint says what trained it
    with pytest.raises(ValueError, match="optim.learning_rate is not an optimizer setting"):
        teacher(optim={"learning_rate": 1e-3})
    flat = {"optimizer": "muon", "lr": 2e-3, "lr_schedule": "cosine", "adam_eps": 1e-6, "ema_decay": 0.99}
    assert TeacherModule.upgrade_hparams(flat) == {"optim": {"name": "muon", "lr": 2e-3, "schedule": "cosine",
                                                             "eps": 1e-6}}
    assert TeacherModule.upgrade_hparams(dict(module.hparams)) == {}


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    from lightning_tmd.optim import MuonAdamW, hidden_matrices

    module = teacher(optim={"name": "muon", "lr": 1e-3})
    names = hidden_matrices(module.net)
    assert names and all(".blocks." in f".{n}" and n.endswith("weight") for n in names)
    assert not any("patch_embedding" in n or "proj_out" in n or "condition_embedder" in n for n in names)
    optimizer = module.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, MuonAdamW)
    by_id = {id(p): n for n, p in module.net.named_parameters()}
    muon = {by_id[id(p)] for g in optimizer.muon.param_groups for p in g["params"]}
    adamw = {by_id[id(p)] for g in optimizer.adamw.param_groups for p in g["params"]}
    assert muon == set(names) and not muon & adamw and muon | adamw == set(by_id.values())


def muon_run(optimizer, schedule, net, steps, x):
    for _ in range(steps):
        net(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()


def test_muon_adamw_steps_schedules_and_resumes_both_parts_exactly():
    from lightning_tmd.optim import build_optimizer

    def fresh():
        torch.manual_seed(0)
        net = torch.nn.Sequential()
        net.blocks = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU())  # blocks.0.weight: Muon
        net.head = torch.nn.Linear(8, 3)
        optimizer = build_optimizer(net, "muon", 1e-2, (0.9, 0.99), 0.01)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
        return net, optimizer, schedule

    x = torch.randn(16, 4)
    net, optimizer, schedule = fresh()
    before = [p.clone() for p in net.parameters()]
    muon_run(optimizer, schedule, net, 3, x)
    assert all(not torch.equal(a, b) for a, b in zip(before, net.parameters()))  # Muon and AdamW parts moved
    assert {g["lr"] for o in (optimizer.muon, optimizer.adamw) for g in o.param_groups} == {1e-2 / 8}
    assert "momentum_buffer" in optimizer.muon.state[net.blocks[0].weight]
    assert "exp_avg" in optimizer.state[net.head.weight]

    resumed, resumed_optimizer, resumed_schedule = fresh()
    resumed.load_state_dict(net.state_dict())
    resumed_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # as if read from a file
    resumed_schedule.load_state_dict(schedule.state_dict())
    muon_run(optimizer, schedule, net, 2, x)
    muon_run(resumed_optimizer, resumed_schedule, resumed, 2, x)
    for a, b in zip(net.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert resumed_optimizer.muon.param_groups[0] is resumed_optimizer.param_groups[0]
