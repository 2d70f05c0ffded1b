"""TMD student: initialisation reproduces the teacher, rollout identities, d/ds estimators,
effective NFE, and a stage-1 loss that falls."""

from dataclasses import replace

import pytest
import torch
from conftest import TINY_WAN

from lightning_tmd.analysis.time_features import keep_slow_time_features
from lightning_tmd.losses import finite_difference_dds, jvp_dds
from lightning_tmd.modules.student import StudentModule
from lightning_tmd.nets.tmd_student import TMDStudent
from lightning_tmd.nets.wan import WanNet
from lightning_tmd.nets.wan_parts import edm_coefficients, wan_timestep
from lightning_tmd.sampling import effective_nfe, tmd_sample
from lightning_tmd.schedules import grid_floor, interpolate, shifted_grid

SHAPE = (2, 3, 2, 8, 8)  # batch, channels, frames, height, width -> 2 x 4 x 4 = 32 tokens


def teacher_net(seed: int = 0, prediction: str = "velocity") -> WanNet:
    torch.manual_seed(seed)
    net = WanNet.from_config(TINY_WAN, prediction=prediction, sigma_data=0.5).eval()
    with torch.no_grad():  # diffusers zero-initialises nothing we rely on; make the output layer non-trivial
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return net


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g)
    context = torch.randn(SHAPE[0], 5, TINY_WAN["text_dim"], generator=g)
    return x, context, g


@pytest.mark.parametrize("t_value", [0.999, 0.6, 0.2])
@pytest.mark.parametrize("head_blocks", [1, 2])
@pytest.mark.parametrize("prediction", ["velocity", "edm"])
def test_student_at_init_reproduces_teacher(t_value, head_blocks, prediction):
    teacher = teacher_net(prediction=prediction)
    student = TMDStudent.from_teacher(teacher, head_blocks).eval()
    x_t, context, g = inputs()
    t = torch.full((SHAPE[0],), t_value, dtype=torch.float64)
    with torch.no_grad():
        expected = teacher.velocity(x_t, t, context)
        main = student.backbone(x_t, t, context)
        y_s = torch.randn(SHAPE, generator=g)  # any inner state: the new paths start at zero
        got = student.head(y_s, t, t, main)
    assert (got - expected).abs().max() <= 1e-5


def test_concat_fusion_starts_near_teacher():
    teacher = teacher_net()
    student = TMDStudent.from_teacher(teacher, 1, fusion="concat").eval()
    x_t, context, g = inputs()
    t = torch.full((SHAPE[0],), 0.7, dtype=torch.float64)
    with torch.no_grad():
        expected = teacher(x_t, wan_timestep(t), context)
        got = student.head(torch.randn(SHAPE, generator=g), t, t, student.backbone(x_t, t, context))
    assert 0 < (got - expected).abs().max() < 0.1 * expected.abs().max()


def trained_student(seed: int = 0) -> TMDStudent:
    """A student whose fusion and (s - r) embedding are no longer zero."""
    student = TMDStudent.from_teacher(teacher_net(seed), 2).eval()
    with torch.no_grad():
        for p in list(student.fusion.parameters()) + list(student.gap_embedding.parameters()):
            p.add_(0.05 * torch.randn_like(p))
    return student


def test_one_step_rollout_is_one_head_call():
    student = trained_student()
    x_t, context, g = inputs()
    t = torch.full((SHAPE[0],), 0.9, dtype=torch.float64)
    y1 = torch.randn(SHAPE, generator=g)
    with torch.no_grad():
        main = student.backbone(x_t, t, context)
        rolled = student.rollout(main, y1, torch.tensor([1.0, 0.0], dtype=torch.float64))
        ones = torch.ones(SHAPE[0], dtype=torch.float64)
        head = student.head(y1, ones, 0 * ones, main)
    assert torch.allclose(rolled, head, atol=1e-6)


def test_rollout_is_step_weighted_sum_of_head_predictions():
    student = trained_student()
    x_t, context, g = inputs()
    t = torch.full((SHAPE[0],), 0.9, dtype=torch.float64)
    y1 = torch.randn(SHAPE, generator=g)
    grid = shifted_grid(4, 10.0)
    with torch.no_grad():
        main = student.backbone(x_t, t, context)
        rolled = student.rollout(main, y1, grid)
        # replay: y_hat = (1 - s_N) y1 + sum_j (s_j - s_{j-1}) head_j at the visited states
        y, total = y1, (1 - grid[0].item()) * y1
        ones = torch.ones(SHAPE[0], dtype=torch.float64)
        for s, r in zip(grid[:-1].tolist(), grid[1:].tolist()):
            head = student.head(y, s * ones, r * ones, main)
            total = total + (s - r) * head
            y = y - (s - r) * (y1 - head)
    assert torch.allclose(rolled, total, atol=1e-5)
    assert torch.allclose(rolled, y, atol=1e-6)


def test_finite_difference_matches_jvp_in_float64():
    student = keep_slow_time_features(trained_student().double())
    x_t, context, g = inputs()
    x_t, context = x_t.double(), context.double()
    n = SHAPE[0]
    t = torch.full((n,), 0.8, dtype=torch.float64)
    y1 = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    y_s = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    tangent = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    s = torch.tensor([0.6, 0.35], dtype=torch.float64)
    r = torch.tensor([0.2, 0.0], dtype=torch.float64)
    with torch.no_grad():
        main = student.backbone(x_t, t, context)
        both = main.select(torch.tensor([0, 1, 0, 1]))
        fd = finite_difference_dds(
            lambda y, s_: student.average_velocity(y, s_, torch.cat([r, r]), both, torch.cat([y1, y1])),
            y_s, s, r, tangent, delta=5e-3)
        exact = jvp_dds(lambda y, s_: student.average_velocity(y, s_, r, main, y1), y_s, s, tangent)
    relative = (fd - exact).norm() / exact.norm()
    assert exact.norm() > 0
    assert relative <= 1e-3


def test_finite_difference_is_one_sided_near_r_and_the_end():
    calls = []

    def u_fn(y, s):
        calls.append(s.clone())
        return y * 0 + s.view(-1, 1) ** 2  # d/ds = 2 s (the y-move is multiplied by zero)

    y = torch.zeros(3, 4, dtype=torch.float64)
    s = torch.tensor([0.5, 0.203, 0.998], dtype=torch.float64)
    r = torch.tensor([0.0, 0.2, 0.0], dtype=torch.float64)
    dds = finite_difference_dds(u_fn, y, s, r, torch.ones_like(y), delta=5e-3, s_max=0.999)
    hi, lo = calls[0].chunk(2)
    assert torch.allclose(hi, torch.tensor([0.505, 0.208, 0.998], dtype=torch.float64))  # backward at the end
    assert torch.allclose(lo, torch.tensor([0.495, 0.203, 0.993], dtype=torch.float64))  # forward above r
    assert torch.allclose(dds[:, 0], 2 * s, atol=6e-3)


@pytest.mark.parametrize(("m", "n", "h", "blocks", "expected"), [
    (1, 2, 5, 30, 7 / 6), (2, 2, 5, 30, 7 / 3), (1, 4, 5, 40, 1.375), (2, 4, 5, 40, 2.75), (3, 1, 5, 30, 3.0),
])
def test_effective_nfe(m, n, h, blocks, expected):
    assert effective_nfe(m, n, h, blocks) == pytest.approx(expected, abs=1e-12)


def test_grid_floor_picks_the_inner_point_at_or_below_s():
    grid = shifted_grid(2, 10.0)  # [0.999, 0.90893, 0]
    mid = grid[1].item()
    s = torch.tensor([0.95, mid, 0.5, 0.9995], dtype=torch.float64)
    assert torch.equal(grid_floor(grid, s), torch.tensor([mid, mid, 0.0, 0.999], dtype=torch.float64))
    assert grid_floor(grid, grid[1:2], strict=True).item() == 0.0


def test_tmd_sampler_is_deterministic_in_its_noise():
    student = trained_student()
    _, context, _ = inputs()
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    outer, inner = shifted_grid(2, 10.0), shifted_grid(2, 10.0)
    a = tmd_sample(student, context, noise, outer, inner, torch.Generator().manual_seed(0))
    b = tmd_sample(student, context, noise, outer, inner, torch.Generator().manual_seed(0))
    c = tmd_sample(student, context, noise, outer, inner, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert a.shape == noise.shape and torch.isfinite(a).all()


def tiny_student_module(**kwargs) -> StudentModule:
    torch.manual_seed(0)
    config = {**TINY_WAN, "patch_size": list(TINY_WAN["patch_size"])}
    return StudentModule(model={"config": config}, head_blocks=1, **kwargs)


def tiny_batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = 4
    return {
        "video": torch.rand((n, 3, 2, 8, 8), generator=g) * 2 - 1,
        "context": torch.randn(n, 5, TINY_WAN["text_dim"], generator=g),
        "negative_context": torch.zeros(n, 5, TINY_WAN["text_dim"]),
    }


@pytest.mark.parametrize("derivative", ["finite_difference", "jvp"])
def test_stage1_loss_falls_on_an_overfit_batch(derivative):
    # a stationary target: no CFG (it follows the student's own unconditional prediction)
    module = tiny_student_module(derivative=derivative, guidance_scale=1.0,
                                 optim={"lr": 2e-3, "warmup_steps": 1})
    keep_slow_time_features(module.net)  # a random time MLP makes d/ds u (and so the MeanFlow target) huge
    optimizer = module.configure_optimizers()["optimizer"]
    batch = tiny_batch()
    losses = []
    for step in range(60):
        torch.manual_seed(step % 4)  # the same four draws of (t, s, r, noise) over and over
        loss = module.stage1_loss(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.85 * first, (first, last)


def test_student_sample_reports_effective_nfe():
    module = tiny_student_module(outer_steps=2, inner_steps=3).eval()
    clips, nfe = module.sample(torch.randn(2, 5, 16), shape=(3, 2, 8, 8))
    assert clips.shape == (2, 3, 2, 8, 8)
    assert nfe == pytest.approx(2 * (1 + 2 * 1 / 3))
    _, nfe = module.sample(torch.randn(2, 5, 16), shape=(3, 2, 8, 8), outer_steps=1, inner_steps=1)
    assert nfe == 1.0


def test_student_rejects_bad_settings():
    with pytest.raises(ValueError, match="head_blocks"):
        StudentModule(model={"config": {**TINY_WAN, "patch_size": [1, 2, 2]}}, head_blocks=3)
    with pytest.raises(ValueError, match="derivative"):
        tiny_student_module(derivative="autograd")
    with pytest.raises(ValueError, match="fusion"):
        tiny_student_module(fusion="add")


def test_student_initialises_from_a_wan_diffusers_folder(tmp_path):
    teacher = teacher_net()
    teacher.save_pretrained(tmp_path / "transformer")
    module = StudentModule(model={"path": str(tmp_path)}, head_blocks=1)
    module.setup("fit")  # no teacher_ckpt: the folder's weights are the teacher
    x_t, context, g = inputs()
    t = torch.full((SHAPE[0],), 0.5, dtype=torch.float64)
    with torch.no_grad():
        expected = teacher(x_t, wan_timestep(t), context)
        got = module.net.head(torch.randn(SHAPE, generator=g), t, t, module.net.backbone(x_t, t, context))
    assert (got - expected).abs().max() <= 1e-5


def test_an_edm_students_head_reads_its_output_through_the_outer_preconditioning():
    """head = c_skip(t) x_t + c_out(t) F at the outer (x_t, t), whatever the inner (s, r); selecting rows
    of the main feature keeps each row's own coefficients."""
    student = TMDStudent.from_teacher(teacher_net(prediction="edm"), 1).eval()
    x_t, context, g = inputs()
    t = torch.tensor([0.9, 0.3], dtype=torch.float64)
    s, r = torch.tensor([0.7, 0.5], dtype=torch.float64), torch.tensor([0.2, 0.1], dtype=torch.float64)
    y_s = torch.randn(SHAPE, generator=g)
    with torch.no_grad():
        main = student.backbone(x_t, t, context)
        raw = student.head(y_s, s, r, replace(main, skip=None, out_scale=None))  # F itself
        c_skip, c_out = edm_coefficients(t, 0.5)
        expected = c_skip.view(-1, 1, 1, 1, 1).float() * x_t + c_out.view(-1, 1, 1, 1, 1).float() * raw
        assert (student.head(y_s, s, r, main) - expected).abs().max() <= 1e-5
        flipped = torch.tensor([1, 0])
        got = student.head(y_s[flipped], s[flipped], r[flipped], main.select(flipped))
        assert (got - expected[flipped]).abs().max() <= 1e-5


def test_the_finite_difference_runs_in_fp32_under_bf16_autocast():
    """Under bf16-mixed training the stage-1 target's d/ds must still be resolved: the same derivative as
    in fp32, while the difference taken inside autocast (the naive way) is far off."""
    module = tiny_student_module()
    keep_slow_time_features(module.net)
    batch = tiny_batch()
    g = torch.Generator().manual_seed(3)
    x = batch["video"]
    n = len(x)
    t = torch.full((n,), 0.8, dtype=torch.float64)
    x1, y1 = torch.randn(x.shape, generator=g), torch.randn(x.shape, generator=g)
    s = torch.tensor([0.605, 0.35, 0.95, 0.999], dtype=torch.float64)
    r = torch.tensor([0.2, 0.0, 0.5, 0.0], dtype=torch.float64)
    y = x1 - x
    y_s = interpolate(y, y1, s)
    v = y1 - y
    with torch.no_grad():
        main = module.net.backbone(interpolate(x, x1, t), t, batch["context"])
        reference = module.dds(main, y1, y_s, s, r, v)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = module.dds(main, y1, y_s, s, r, v)
            both = main.select(torch.arange(n).repeat(2))
            naive = finite_difference_dds(
                lambda y_, s_: module.net.average_velocity(y_, s_, torch.cat([r, r]), both, torch.cat([y1, y1])),
                y_s, s, r, v, 5e-3, 0.0, module.hparams.t_max)
    error = lambda d: float((d - reference).norm() / reference.norm())  # noqa: E731
    assert reference.norm() > 0
    assert error(mixed) <= 1e-2
    assert error(naive) > 0.1, error(naive)


@pytest.mark.parametrize("prediction", ["velocity", "edm"])
def test_a_sample_target_student_at_init_ends_its_inner_flow_at_the_teachers_clean_estimate(prediction):
    """y = x (Table 10) keeps the head a velocity: u = (y_s - (x_t - t head)) / s. At s = t the head is the
    teacher's velocity, so one inner step to 0 lands on the teacher's x0 and the outer step is its Euler step."""
    teacher = teacher_net(prediction=prediction)
    student = TMDStudent.from_teacher(teacher, 2, inner_target="sample").eval()
    x_t, context, g = inputs()
    t = torch.full((SHAPE[0],), 0.6, dtype=torch.float64)
    with torch.no_grad():
        v = teacher.velocity(x_t, t, context)
        main = student.backbone(x_t, t, context)
        y_s, y1 = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
        y_hat = y_s - 0.6 * student.average_velocity(y_s, t, t, main, y1)
        x_next = student.transition(x_t, t, torch.full_like(t, 0.2), y_hat)
    torch.testing.assert_close(y_hat, x_t - 0.6 * v, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_next, x_t - 0.4 * v, atol=1e-5, rtol=1e-5)


def test_a_checkpointed_head_keeps_only_the_inputs_of_its_fusion_and_output_layers():
    """With model.checkpoint_blocks each head call recomputes its fusion and output layers in backward: what it
    saves drops by what those layers saved, down to their inputs, and the gradients stay the same."""
    from lightning_tmd.analysis.memory import saved_bytes

    torch.manual_seed(0)
    student = TMDStudent(WanNet.from_config({**TINY_WAN, "num_layers": 4}, checkpoint_blocks=True), 2)
    keep_slow_time_features(student)
    x_t, context, g = inputs()
    t = torch.full((SHAPE[0],), 0.7, dtype=torch.float64)
    main = student.backbone(x_t, t, context)
    shared = (student, main.hidden, main.tokens.context, main.tokens.timestep_proj, x_t)

    def blocks_only(y):  # the head with only its blocks checkpointed
        hidden, temb, modulation = student.head_input(y, t, t, main)
        hidden = student.wan.run_blocks(main.tokens, student.split, student.num_blocks, hidden, modulation)
        return student.wan.unembed(hidden, temb, main.tokens.grid)

    y = torch.randn(SHAPE, generator=g, requires_grad=True)
    with torch.no_grad():
        hidden, temb, _ = student.head_input(y, t, t, main)
    fusion = saved_bytes(lambda y_: student.head_input(y_, t, t, main)[0], y, exclude=shared)
    output = saved_bytes(lambda h: student.wan.unembed(h, temb, main.tokens.grid), hidden.requires_grad_(),
                         exclude=(*shared, temb))
    before = saved_bytes(blocks_only, y, exclude=shared)
    after = saved_bytes(lambda y_: student.head(y_, t, t, main), y, exclude=shared)
    kept_inputs = 4 * (y.nelement() + hidden.nelement() + temb.nelement()) + 2 * 8 * t.nelement()  # + s, r
    assert after <= before - fusion - output + kept_inputs, (before, after, fusion, output)
    assert after < 0.6 * before

    grads = []
    for head in (blocks_only, lambda y_: student.head(y_, t, t, main)):
        student.zero_grad()
        y.grad = None
        head(y).square().sum().backward(retain_graph=True)
        grads.append([y.grad.clone()] + [p.grad.clone() for p in student.parameters() if p.grad is not None])
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(*grads))
