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
    config = teacher(lr=1e-3).configure_optimizers()
    assert config["optimizer"].param_groups[0]["lr"] == 1e-3 * config["lr_scheduler"]["scheduler"].lr_lambdas[0](0)
