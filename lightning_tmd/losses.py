"""Pure loss functions (no modules, no state)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def flow_matching_loss(velocity_pred: torch.Tensor, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """E ||v_theta(x_t, t) - (noise - x)||^2, mean over elements, in fp32."""
    return F.mse_loss(velocity_pred.float(), (noise - x).float())


def adaptive_l2_loss(pred: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    """MeanFlow's adaptive normalisation (p = 1): mean over samples of ||d||^2 / sg(||d||^2 + c),
    d = pred - target, squared norms summed over each sample's elements, in fp32."""
    sq = (pred.float() - target.float()).pow(2).flatten(1).sum(1)
    return (sq / (sq.detach() + c)).mean()


def finite_difference_dds(u_fn, y_s: torch.Tensor, s: torch.Tensor, r: torch.Tensor, tangent: torch.Tensor,
                          delta: float = 5e-3, s_min: float = 0.0, s_max: float = 1.0) -> torch.Tensor:
    """d/ds u(y_s, s) along dy/ds = `tangent` by a finite difference, per sample (docs/method.md §Stage 1):

        [u(y_s + (s_hi - s) v, s_hi) - u(y_s + (s_lo - s) v, s_lo)] / (s_hi - s_lo)

    central (s -/+ delta) where both ends stay inside (r, s_max], forward where s - delta <= r or
    < s_min, backward where s + delta > s_max. `u_fn(y, s)` takes a batch twice the size of y_s
    (both ends in one call). The difference is taken in float64; returns float64.
    """
    below_ok = (s - delta > r) & (s - delta >= s_min)
    above_ok = (s + delta <= s_max) | ~below_ok
    s_hi = torch.where(above_ok, s + delta, s)
    s_lo = torch.where(below_ok, s - delta, s)

    def moved(s_new: torch.Tensor) -> torch.Tensor:
        step = (s_new - s).view(-1, *([1] * (y_s.ndim - 1)))
        return (y_s.double() + step * tangent.double()).to(y_s.dtype)

    u_hi, u_lo = u_fn(torch.cat([moved(s_hi), moved(s_lo)]), torch.cat([s_hi, s_lo])).double().chunk(2)
    return (u_hi - u_lo) / (s_hi - s_lo).view(-1, *([1] * (y_s.ndim - 1)))


def jvp_dds(u_fn, y_s: torch.Tensor, s: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
    """d/ds u(y_s, s) along (dy/ds, ds/ds) = (tangent, 1) by forward-mode autodiff (`torch.func.jvp`),
    under the math SDPA kernel (the fused CPU/GPU kernels have no forward AD)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        _, dds = torch.func.jvp(u_fn, (y_s, s), (tangent.to(y_s.dtype), torch.ones_like(s)))
    return dds


def vsd_gradient(x_hat: torch.Tensor, x0_fake: torch.Tensor, x0_teacher: torch.Tensor,
                 eps: float = 1e-6) -> torch.Tensor:
    """The DMD update direction in fp32, without grad (Eq. 11; docs/method.md Q3):
    (x0_fake - x0_teacher) / mean|x_hat - x0_teacher|, normalised per sample. A non-finite input stays
    non-finite (the non-finite guard then skips the step; nothing here hides it)."""
    with torch.no_grad():
        x0_teacher = x0_teacher.float()
        scale = (x_hat.float() - x0_teacher).abs().mean(dim=tuple(range(1, x_hat.ndim)), keepdim=True)
        return (x0_fake.float() - x0_teacher) / (scale + eps)


def vsd_loss(x_hat: torch.Tensor, x0_fake: torch.Tensor, x0_teacher: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Variational score distillation (DMD) along `vsd_gradient` (see `vsd_loss_along`)."""
    return vsd_loss_along(x_hat, vsd_gradient(x_hat, x0_fake, x0_teacher, eps))


def vsd_loss_along(x_hat: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0.5 * mse(x_hat, sg(x_hat - grad)) in fp32, so d loss / d x_hat = grad / numel: the student
    moves along the teacher's minus the fake score."""
    x_hat32 = x_hat.float()
    return 0.5 * F.mse_loss(x_hat32, x_hat32.detach() - grad)


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Minimax BCE averaged over heads and samples: softplus(-D(real)) + softplus(D(fake))."""
    return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()


def generator_gan_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss -log sigmoid(D(fake)) = softplus(-D(fake)), averaged."""
    return F.softplus(-fake_logits.float()).mean()


def denoising_loss(x0_pred: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The fake score's denoising loss in x0 space, unweighted: ||x0_pred - x||^2 (mean, fp32)."""
    return F.mse_loss(x0_pred.float(), x.float())
