"""NoiseRecipe: SNR table, zero terminal SNR, offset/pyramid noise, timesteps, x_t, targets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from sdtrain.config.sections import TrainingSection
from sdtrain.engine.noise import NoiseRecipe
from sdtrain.errors import ConfigError


def sd_scheduler() -> DDPMScheduler:
    return DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
    )


def recipe(is_v: bool = False, **training) -> NoiseRecipe:
    return NoiseRecipe(TrainingSection(**training), sd_scheduler(), is_v)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def hand_alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


def latents(b: int = 2, c: int = 4, h: int = 16, w: int = 16) -> torch.Tensor:
    return torch.randn((b, c, h, w), generator=gen(123))


def test_snr_table_matches_scaled_linear_schedule():
    r = recipe()
    a = hand_alphas_cumprod()
    expected = a / (1 - a)
    for t in (0, 1, 10, 250, 500, 999):
        assert r.snr[t].item() == pytest.approx(expected[t].item(), rel=1e-4)
    assert r.snr[0].item() == pytest.approx(1175.44, rel=1e-4)
    assert r.snr[999].item() == pytest.approx(4.68e-3, rel=1e-2)


def test_zero_terminal_snr_rescales_and_snr_table_follows():
    scheduler = sd_scheduler()
    before = scheduler.alphas_cumprod.clone()
    r = NoiseRecipe(TrainingSection(zero_terminal_snr=True), scheduler, True)
    # hand-made Lin et al. rescale in float64
    sqrt_bar = hand_alphas_cumprod().sqrt()
    first, last = sqrt_bar[0], sqrt_bar[-1]
    bar = ((sqrt_bar - last) * first / (first - last)) ** 2
    assert r.alphas_cumprod[-1].item() == 0.0
    assert r.snr[-1].item() == 0.0
    assert r.alphas_cumprod[0].item() == pytest.approx(before[0].item(), rel=1e-6)
    for t in (0, 100, 500, 900, 998):
        assert r.alphas_cumprod[t].item() == pytest.approx(bar[t].item(), rel=1e-3, abs=1e-9)
        expected_snr = (bar[t] / (1 - bar[t])).item()
        assert r.snr[t].item() == pytest.approx(expected_snr, rel=1e-3, abs=1e-9)
    # the SNR used for weighting is the rescaled one, unlike the reference's stale table
    assert r.snr[900].item() < recipe().snr[900].item()
    # the scheduler object is left alone
    assert torch.equal(scheduler.alphas_cumprod, before)


def test_zero_terminal_snr_at_last_step_is_pure_noise_and_v_is_minus_x0():
    r = recipe(is_v=True, zero_terminal_snr=True)
    x0 = latents()
    eps = torch.randn(x0.shape, generator=gen(5))
    t = torch.full((2,), 999)
    assert torch.allclose(r.add_noise(x0, eps, t), eps)
    assert torch.allclose(r.target(x0, eps, t), -x0)


def test_same_seed_same_draws_different_seed_different():
    r = recipe(
        noise_offset=0.1,
        noise_offset_random_strength=True,
        multires_noise_iterations=3,
        ip_noise_gamma=0.1,
        ip_noise_gamma_random_strength=True,
    )
    x0 = latents()
    a, b, c = r.sample(x0, gen(7)), r.sample(x0, gen(7)), r.sample(x0, gen(8))
    for field in ("noise", "timesteps", "noisy_latents", "target"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert not torch.equal(a.noise, c.noise)


def test_plain_noise_is_the_generators_first_draw():
    x0 = latents()
    expected = torch.randn(x0.shape, generator=gen(3))
    assert torch.equal(recipe().sample_noise(x0, gen(3)), expected)


def test_noise_offset_adds_a_per_channel_constant():
    x0 = latents()
    plain = recipe().sample_noise(x0, gen(1))
    offset = recipe(noise_offset=0.5).sample_noise(x0, gen(1))
    diff = offset - plain
    assert diff.std(dim=(2, 3)).max().item() < 1e-6  # constant over H, W
    g = gen(1)
    torch.randn(x0.shape, generator=g)
    expected = 0.5 * torch.randn((2, 4, 1, 1), generator=g)
    assert torch.allclose(diff, expected.expand_as(diff), atol=1e-6)


def test_noise_offset_random_strength_scales_by_one_uniform():
    x0 = latents()
    plain = recipe().sample_noise(x0, gen(1))
    noisy = recipe(noise_offset=0.5, noise_offset_random_strength=True).sample_noise(x0, gen(1))
    g = gen(1)
    torch.randn(x0.shape, generator=g)
    u = torch.rand(1, generator=g)
    expected = u * 0.5 * torch.randn((2, 4, 1, 1), generator=g)
    assert torch.allclose(noisy - plain, expected.expand_as(plain), atol=1e-6)


def test_adaptive_noise_scale_uses_abs_channel_mean_and_clamps_at_zero():
    x0 = torch.zeros((1, 2, 4, 4))
    x0[:, 0] = 2.0
    x0[:, 1] = -1.0
    plain = recipe().sample_noise(x0, gen(2))
    noisy = recipe(noise_offset=0.1, adaptive_noise_scale=0.5).sample_noise(x0, gen(2))
    g = gen(2)
    torch.randn(x0.shape, generator=g)
    z = torch.randn((1, 2, 1, 1), generator=g)
    strength = torch.tensor([0.1 + 0.5 * 2.0, 0.1 + 0.5 * 1.0]).reshape(1, 2, 1, 1)
    assert torch.allclose(noisy - plain, (strength * z).expand_as(plain), atol=1e-6)
    # a negative scale that drives the strength below zero is clamped: no offset at all
    clamped = recipe(noise_offset=0.1, adaptive_noise_scale=-1.0).sample_noise(x0, gen(2))
    assert torch.allclose(clamped, plain)


def test_multires_noise_is_unit_std_and_low_frequency_heavy():
    x0 = torch.zeros((8, 4, 64, 64))
    plain = recipe().sample_noise(x0, gen(4))
    pyramid = recipe(multires_noise_iterations=6, multires_noise_discount=0.4).sample_noise(
        x0, gen(4)
    )
    assert pyramid.std().item() == pytest.approx(1.0, abs=1e-5)
    # 16x16 block means: white noise keeps 1/256 of its variance there, the pyramid more
    pooled_plain = F.avg_pool2d(plain, 16).var().item()
    pooled_pyramid = F.avg_pool2d(pyramid, 16).var().item()
    assert pooled_plain == pytest.approx(1 / 256, rel=0.25)
    assert pooled_pyramid > 1.5 * pooled_plain
    strong = recipe(multires_noise_iterations=6, multires_noise_discount=0.8).sample_noise(
        x0, gen(4)
    )
    assert F.avg_pool2d(strong, 16).var().item() > 10 * pooled_plain


def test_multires_level_zero_and_one_follow_the_formula():
    x0 = torch.zeros((2, 4, 32, 32))
    out = recipe(multires_noise_iterations=2, multires_noise_discount=0.3).sample_noise(x0, gen(9))
    g = gen(9)
    eps = torch.randn(x0.shape, generator=g)
    r0 = float(torch.rand((), generator=g)) * 2 + 2
    assert r0 >= 2
    eps = eps + torch.randn(x0.shape, generator=g)  # level 0: full size, discount^0
    r1 = float(torch.rand((), generator=g)) * 2 + 2
    side = max(1, int(32 / r1))
    level = torch.randn((2, 4, side, side), generator=g)
    eps = eps + F.interpolate(level, size=(32, 32), mode="bilinear") * 0.3
    assert torch.allclose(out, eps / eps.std(), atol=1e-6)


def test_multires_stops_after_the_level_that_reaches_one_pixel():
    x0 = torch.zeros((1, 4, 16, 16))
    # r >= 2 so 16 / r^i reaches 1 by i = 4: more iterations change nothing
    few = recipe(multires_noise_iterations=5).sample_noise(x0, gen(11))
    many = recipe(multires_noise_iterations=50).sample_noise(x0, gen(11))
    assert torch.equal(few, many)


def test_timesteps_default_range_and_bounds():
    r = recipe()
    t = r.sample_timesteps(4096, gen(0))
    assert t.dtype == torch.long and t.min().item() >= 0 and t.max().item() <= 999
    assert t.max().item() > 990 and t.min().item() < 10
    assert torch.equal(t, torch.randint(0, 1000, (4096,), generator=gen(0)))
    t = recipe(min_timestep=200, max_timestep=300).sample_timesteps(512, gen(0))
    assert t.min().item() >= 200 and t.max().item() <= 299


def test_fixed_timestep_when_min_not_below_max():
    t = recipe(min_timestep=500, max_timestep=500).sample_timesteps(3, gen(0))
    assert t.tolist() == [500, 500, 500]
    with pytest.raises(ConfigError):
        recipe(min_timestep=1000)


def test_noisy_latents_match_diffusers_add_noise():
    scheduler = sd_scheduler()
    x0 = latents()
    eps = torch.randn(x0.shape, generator=gen(1))
    t = torch.tensor([3, 870])
    r = recipe()
    assert torch.allclose(r.noisy_latents(x0, eps, t, gen(0)), scheduler.add_noise(x0, eps, t))
    assert torch.equal(r.target(x0, eps, t), eps)
    v = recipe(is_v=True).target(x0, eps, t)
    assert torch.allclose(v, scheduler.get_velocity(x0, eps, t), atol=1e-6)


def test_ip_noise_gamma_perturbs_input_but_not_target():
    scheduler = sd_scheduler()
    x0 = latents()
    eps = torch.randn(x0.shape, generator=gen(1))
    t = torch.tensor([100, 600])
    r = recipe(ip_noise_gamma=0.1)
    x_t = r.noisy_latents(x0, eps, t, gen(6))
    extra = torch.randn(x0.shape, generator=gen(6))
    assert torch.allclose(x_t, scheduler.add_noise(x0, eps + 0.1 * extra, t), atol=1e-6)
    assert torch.equal(r.target(x0, eps, t), eps)

    rand = recipe(ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True)
    g = gen(6)
    u = torch.rand(1, generator=g)
    extra = torch.randn(x0.shape, generator=g)
    expected = scheduler.add_noise(x0, eps + u * 0.1 * extra, t)
    assert torch.allclose(rand.noisy_latents(x0, eps, t, gen(6)), expected, atol=1e-6)


def test_half_precision_latents_keep_their_dtype():
    x0 = latents().to(torch.bfloat16)
    sample = recipe(noise_offset=0.1, is_v=True).sample(x0, gen(0))
    assert sample.noise.dtype == torch.bfloat16
    assert sample.noisy_latents.dtype == torch.bfloat16
    assert sample.target.dtype == torch.bfloat16
