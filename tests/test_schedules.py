import pytest
import torch

from lightning_tmd.sampling import euler_sample, guided_velocity_fn, renoise
from lightning_tmd.schedules import sample_shifted_uniform, sample_train_times, shift, shifted_grid, with_high_noise


def test_shifted_grid_values():
    grid = shifted_grid(2, 10)
    assert grid.dtype == torch.float64 and len(grid) == 3
    torch.testing.assert_close(grid, torch.tensor([0.999, 0.9090909, 0.0], dtype=torch.float64),
                               atol=5e-4, rtol=0)
    torch.testing.assert_close(shifted_grid(4, 5), torch.tensor([0.999, 0.937, 0.833, 0.624, 0.0],
                                                                dtype=torch.float64), atol=1e-3, rtol=0)
    assert shifted_grid(1, 10).tolist() == [0.999, 0.0]
    uniform = torch.tensor([1.0, 2 / 3, 1 / 3, 0.0], dtype=torch.float64)
    torch.testing.assert_close(shifted_grid(3, 1.0, t_max=1.0), uniform)


def test_shift_fixes_ends_and_moves_mass_to_noise():
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    assert shift(t, 3).tolist() == [0.0, 0.75, 1.0]
    samples = sample_shifted_uniform(10_000, 5, generator=torch.Generator().manual_seed(0))
    assert samples.min() >= shift(0.001, 5) and samples.max() <= shift(0.999, 5)
    assert samples.median() > 0.75


def test_high_noise_fraction_moves_that_share_of_times_near_pure_noise():
    g = torch.Generator().manual_seed(0)
    t = sample_shifted_uniform(40_000, 1, generator=g)  # uniform: 10 % above 0.9
    mixed = with_high_noise(t, 0.5, 0.9, generator=g)
    assert (mixed > 0.9).double().mean().item() == pytest.approx(0.5 + 0.5 * 0.1, abs=0.01)
    assert mixed.max() <= 0.999 and torch.equal(with_high_noise(t, 0.0), t)
    kept = mixed <= 0.9  # below 0.9 every time is one of the original draws
    assert torch.equal(mixed[kept], t[kept])
    with pytest.raises(ValueError, match="fraction"):
        with_high_noise(t, 1.5)


def test_unknown_time_sampling_is_named():
    with pytest.raises(ValueError, match="logit_normal"):
        sample_train_times(4, "cosine")


def test_euler_sampler_is_exact_for_a_straight_flow():
    data, noise = torch.randn(3, 2), torch.randn(3, 2)
    grid = shifted_grid(7, 3, t_max=1.0)
    out = euler_sample(lambda x, t: noise - data, noise, grid)
    torch.testing.assert_close(out, data)


def test_guidance_interval_guides_only_inside_it_and_counts_evaluations():
    grid = shifted_grid(10, 3)
    seen = []

    def cond(x, t):
        seen.append(("cond", float(t[0])))
        return torch.zeros_like(x)

    def cfg(x, t):
        seen.append(("cfg", float(t[0])))
        return torch.zeros_like(x)

    velocity, nfe = guided_velocity_fn(cond, cfg, (0.5, 1.0))
    euler_sample(velocity, torch.randn(2, 3), grid)
    guided = [kind == "cfg" for kind, _ in seen]
    assert guided == [t >= 0.5 for t in grid[:-1].tolist()] and any(guided) and not all(guided)
    assert nfe() == 10 + sum(guided)
    velocity, nfe = guided_velocity_fn(cond)
    euler_sample(velocity, torch.randn(2, 3), grid)
    assert nfe() == 10


def test_stochastic_sampler_lands_on_the_data_of_an_exact_denoiser():
    """With churn, x_t is re-noised before every step; for a point-mass data set the exact velocity
    (x - data) / t still brings every path to the data, and renoise keeps the path's noise level."""
    data, noise = torch.randn(4, 3), torch.randn(4, 3)
    grid = shifted_grid(10, 3)
    out = euler_sample(lambda x, t: (x - data) / t[:, None].float(), noise, grid, churn=0.5,
                       generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, data, atol=1e-5, rtol=0)
    x_t = (1 - 0.3) * data[0] + 0.3 * noise[0]
    moved = renoise(x_t.expand(20000, 3), 0.3, 0.6, torch.Generator().manual_seed(1))
    a = 0.4 / 0.7  # clean part (1 - 0.3) -> (1 - 0.6); total noise std 0.3 -> 0.6
    torch.testing.assert_close(moved.mean(0), a * x_t, atol=0.02, rtol=0)
    torch.testing.assert_close(moved.std(0), torch.full((3,), (0.6**2 - (a * 0.3) ** 2) ** 0.5), atol=0.02, rtol=0)
