"""Stage-2 building blocks: the VSD gradient, GAN losses, the Conv3D discriminator on teacher features."""

import torch
import torch.nn.functional as F
from conftest import TINY_WAN

from lightning_tmd.losses import denoising_loss, discriminator_loss, generator_gan_loss, vsd_loss
from lightning_tmd.nets.discriminator import Discriminator
from lightning_tmd.nets.wan import WanNet


def test_vsd_gradient_is_the_normalised_score_difference():
    g = torch.Generator().manual_seed(0)
    x_hat = torch.randn(3, 3, 2, 4, 4, generator=g, requires_grad=True)
    x0_fake, x0_teacher = torch.randn(2, 3, 3, 2, 4, 4, generator=g)
    vsd_loss(x_hat, x0_fake, x0_teacher).backward()
    scale = (x_hat.detach() - x0_teacher).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    expected = (x0_fake - x0_teacher) / (scale + 1e-6) / x_hat.numel()
    assert torch.allclose(x_hat.grad, expected, atol=1e-7)


def test_vsd_is_zero_when_fake_and_teacher_agree():
    x_hat = torch.randn(2, 3, 2, 4, 4, requires_grad=True)
    x0 = torch.randn(2, 3, 2, 4, 4)
    loss = vsd_loss(x_hat, x0, x0)
    loss.backward()
    assert loss.item() == 0.0 and x_hat.grad.abs().max() == 0


def test_gan_losses_are_binary_cross_entropy():
    real, fake = torch.randn(4, 3), torch.randn(4, 3)
    bce = F.binary_cross_entropy_with_logits
    expected = bce(real, torch.ones_like(real)) + bce(fake, torch.zeros_like(fake))
    assert torch.allclose(discriminator_loss(real, fake), expected)
    assert torch.allclose(generator_gan_loss(fake), bce(fake, torch.ones_like(fake)))
    assert denoising_loss(real, real).item() == 0.0


def test_discriminator_reads_teacher_block_features():
    torch.manual_seed(0)
    teacher = WanNet.from_config(TINY_WAN).eval()
    x, context = torch.randn(2, 3, 4, 16, 16), torch.randn(2, 5, TINY_WAN["text_dim"])
    blocks = [1, 2, 3]
    with torch.no_grad():
        features = teacher.block_features(x, torch.full((2,), 500.0), context, blocks)
    channels = teacher.inner_dim // 4  # patch (1, 2, 2)
    assert features[0].shape == (2, channels, 4, 16, 16)
    disc = Discriminator(blocks, channels, widths=(8, 16, 16), mlp_width=8)
    logits = disc(features)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    discriminator_loss(logits, -logits).backward()
    assert all(p.grad is not None for p in disc.parameters())


def test_critic_starts_as_the_teacher_and_learns_to_denoise(smoke_checkpoint):
    from lightning_tmd.modules.critic import CriticModule
    from lightning_tmd.modules.teacher import TeacherModule

    teacher = TeacherModule.load_from_checkpoint(smoke_checkpoint).eval()
    config = torch.load(smoke_checkpoint, weights_only=False)["run_config"]["model"]
    critic = CriticModule(model=config, teacher_ckpt=str(smoke_checkpoint), optim={"lr": 3e-3})
    critic.setup("fit")
    g = torch.Generator().manual_seed(0)
    x_t, context = torch.randn(2, 3, 4, 16, 16, generator=g), torch.randn(2, 4, 16, generator=g)
    t = torch.full((2,), 0.7, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(critic.x0(x_t, t, context), teacher.x0(x_t, t, context, teacher.sampling_net()))
    optimizer = critic.configure_optimizers()["optimizer"]
    samples = torch.rand(4, 3, 4, 16, 16, generator=g) * 2 - 1
    context = torch.randn(4, 4, 16, generator=g)
    losses = []
    for step in range(30):
        loss = critic.denoising_loss_on(samples, context, generator=torch.Generator().manual_seed(step % 3))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3])


def test_discriminator_heads_stay_informative_at_small_feature_sizes():
    """Smoke-size features (2 channels on 4 x 16 x 16) used to shrink to one voxel, where GroupNorm outputs zero
    and every input got the same logit."""
    from lightning_tmd.nets.discriminator import Conv3DHead

    torch.manual_seed(0)
    head = Conv3DHead(2, (8, 16, 16), mlp_width=8)
    features = torch.randn(6, 2, 4, 16, 16)
    assert head.convs(features).shape[2:] == (2, 2, 2)
    logits = head(features)
    assert logits.std() > 1e-3 and len(set(logits.tolist())) == 6
    wan_size = torch.randn(1, 2, 21, 60, 104)  # Wan2.1's latent grid: every stride applies
    assert head.convs(wan_size).shape[2:] == (3, 4, 7)


def test_a_few_discriminator_steps_separate_real_from_fake_features():
    torch.manual_seed(0)
    disc = Discriminator([1, 2], in_channels=2, widths=(8, 16, 16), mlp_width=8)
    optimizer = torch.optim.Adam(disc.parameters(), lr=3e-3)
    real = [torch.randn(8, 2, 4, 16, 16) for _ in range(2)]
    fake = [0.5 * torch.randn(8, 2, 4, 16, 16) + 0.3 for _ in range(2)]
    for _ in range(30):
        loss = discriminator_loss(disc(real), disc(fake))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    real_new, fake_new = [torch.randn(8, 2, 4, 16, 16)] * 2, [0.5 * torch.randn(8, 2, 4, 16, 16) + 0.3] * 2
    with torch.no_grad():
        accuracy = ((disc(real_new) > 0).float().mean() + (disc(fake_new) < 0).float().mean()) / 2
    assert accuracy > 0.9
