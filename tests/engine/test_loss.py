"""LossRecipe: element losses, c schedules, mask, per-sample weights, timestep weighting, checks."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from diffusers import DDPMScheduler

from sdtrain.config.sections import TrainingSection
from sdtrain.engine.loss import LossRecipe, check_recipe, element_loss
from sdtrain.engine.noise import NoiseRecipe
from sdtrain.errors import ConfigError

T = torch.tensor([0, 100, 500, 999])


def hand_snr() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    a = torch.cumprod(1 - betas, dim=0)
    return a / (1 - a)


def hand_alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


def loss_recipe(is_v: bool = False, **training) -> LossRecipe:
    section = TrainingSection(**training)
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False
    )
    return LossRecipe(section, NoiseRecipe(section, scheduler, is_v))


def unit_error(b: int = 4, shape=(4, 8, 8)) -> tuple[torch.Tensor, torch.Tensor]:
    """pred/target whose element-wise l2 and l1 are exactly 1 everywhere."""
    target = torch.randn((b, *shape), generator=torch.Generator().manual_seed(0))
    return target + 1.0, target


def per_sample(recipe: LossRecipe, **kw) -> list[float]:
    pred, target = unit_error()
    scalar, values = recipe.compute(pred, target, T, **kw)
    assert scalar.item() == pytest.approx(values.mean().item())
    return values.tolist()


def test_plain_l2_is_mean_squared_error():
    pred = torch.randn((2, 4, 8, 8))
    target = torch.randn((2, 4, 8, 8))
    scalar, values = loss_recipe().compute(pred, target, torch.tensor([1, 2]))
    assert values.shape == (2,)
    assert torch.allclose(values, ((pred - target) ** 2).mean(dim=(1, 2, 3)))
    assert scalar.item() == pytest.approx(torch.nn.functional.mse_loss(pred, target).item())


def test_l1_is_mean_absolute_error():
    pred, target = torch.randn((2, 4, 8, 8)), torch.randn((2, 4, 8, 8))
    _, values = loss_recipe(loss_type="l1").compute(pred, target, torch.tensor([1, 2]))
    assert torch.allclose(values, (pred - target).abs().mean(dim=(1, 2, 3)))


def test_loss_is_float32_for_half_inputs():
    pred, target = unit_error()
    scalar, values = loss_recipe().compute(pred.bfloat16(), target.bfloat16(), T)
    assert scalar.dtype == torch.float32 and values.dtype == torch.float32


def test_min_snr_weights_eps_and_v_against_hand_values():
    snr = hand_snr()[T]
    eps = per_sample(loss_recipe(min_snr_gamma=5.0))
    v = per_sample(loss_recipe(is_v=True, min_snr_gamma=5.0))
    for i in range(len(T)):
        s = snr[i].item()
        assert eps[i] == pytest.approx(min(s, 5.0) / s, rel=1e-4)
        assert v[i] == pytest.approx(min(s, 5.0) / (s + 1), rel=1e-4)
    assert eps[0] == pytest.approx(5.0 / 1175.44, rel=1e-4)  # high SNR is down-weighted
    assert eps[3] == 1.0  # SNR < gamma: weight 1


def test_scale_v_pred_like_noise_pred_caps_snr_at_1000():
    snr = hand_snr()[T]
    values = per_sample(loss_recipe(is_v=True, scale_v_pred_loss_like_noise_pred=True))
    for i in range(len(T)):
        s = min(snr[i].item(), 1000.0)
        assert values[i] == pytest.approx(s / (s + 1), rel=1e-4)
    assert values[0] == pytest.approx(1000 / 1001, rel=1e-6)


def test_v_pred_like_loss_adds_the_v_scaled_loss():
    snr = hand_snr()[T]
    values = per_sample(loss_recipe(v_pred_like_loss=0.5))
    for i in range(len(T)):
        s = min(snr[i].item(), 1000.0)
        assert values[i] == pytest.approx(1 + 0.5 / (s / (s + 1)), rel=1e-4)


def test_debiased_estimation_eps_and_v():
    snr = hand_snr()[T]
    eps = per_sample(loss_recipe(debiased_estimation_loss=True))
    v = per_sample(loss_recipe(is_v=True, debiased_estimation_loss=True))
    for i in range(len(T)):
        s = min(snr[i].item(), 1000.0)
        assert eps[i] == pytest.approx(1 / math.sqrt(s), rel=1e-4)
        assert v[i] == pytest.approx(1 / (s + 1), rel=1e-4)


def test_weightings_apply_in_reference_order():
    snr = hand_snr()[T]
    values = per_sample(
        loss_recipe(min_snr_gamma=5.0, v_pred_like_loss=0.2, debiased_estimation_loss=True)
    )
    for i in range(len(T)):
        s = snr[i].item()
        c = min(s, 1000.0)
        expected = min(s, 5.0) / s
        expected = expected + expected / (c / (c + 1)) * 0.2
        expected = expected / math.sqrt(c)
        assert values[i] == pytest.approx(expected, rel=1e-4)


def test_zero_terminal_snr_weights_stay_finite():
    t = torch.tensor([998, 999])
    pred, target = unit_error(b=2)
    for is_v, kw in [
        (False, {"min_snr_gamma": 5.0}),
        (False, {"debiased_estimation_loss": True}),
        (False, {"v_pred_like_loss": 0.1}),
        (True, {"min_snr_gamma": 5.0}),
        (True, {"debiased_estimation_loss": True}),
        (True, {"scale_v_pred_loss_like_noise_pred": True}),
    ]:
        recipe = loss_recipe(is_v=is_v, zero_terminal_snr=True, **kw)
        scalar, values = recipe.compute(pred, target, t)
        assert torch.isfinite(values).all(), kw
    eps_min_snr = loss_recipe(zero_terminal_snr=True, min_snr_gamma=5.0)
    assert eps_min_snr.compute(pred, target, t)[1].tolist() == [1.0, 1.0]  # lim min(s,γ)/s
    v_debiased = loss_recipe(is_v=True, zero_terminal_snr=True, debiased_estimation_loss=True)
    assert v_debiased.compute(pred, target, t)[1][1].item() == pytest.approx(1.0)
    # the floor keeps 1/sqrt(SNR) bounded by 1/sqrt(1e-3)
    eps_debiased = loss_recipe(zero_terminal_snr=True, debiased_estimation_loss=True)
    assert eps_debiased.compute(pred, target, t)[1][1].item() == pytest.approx(1e-3**-0.5)


def test_huber_small_c_is_scaled_l1_and_large_c_is_l2():
    d = torch.tensor([0.5, -2.0, 3.0]).reshape(3, 1, 1, 1)
    zero = torch.zeros_like(d)
    small = element_loss(d, zero, "huber", torch.full((3,), 1e-4))
    assert torch.allclose(small, 2 * 1e-4 * d.abs(), rtol=1e-3)
    large = element_loss(d, zero, "huber", torch.full((3,), 1e3))
    assert torch.allclose(large, d**2, rtol=1e-3)


def test_smooth_l1_small_c_is_twice_l1_and_large_c_is_l2_over_c():
    d = torch.tensor([0.5, -2.0, 3.0]).reshape(3, 1, 1, 1)
    zero = torch.zeros_like(d)
    small = element_loss(d, zero, "smooth_l1", torch.full((3,), 1e-4))
    assert torch.allclose(small, 2 * d.abs(), rtol=1e-3)
    large = element_loss(d, zero, "smooth_l1", torch.full((3,), 1e3))
    assert torch.allclose(large, d**2 / 1e3, rtol=1e-3)


def test_huber_c_schedules():
    t = torch.tensor([0, 500, 999])
    const = loss_recipe(loss_type="huber", huber_schedule="constant", huber_c=0.2, huber_scale=2.0)
    assert const.huber_c(t).tolist() == pytest.approx([0.4, 0.4, 0.4])
    expo = loss_recipe(loss_type="huber", huber_schedule="exponential", huber_c=0.1, huber_scale=3)
    assert expo.huber_c(t).tolist() == pytest.approx(
        [3.0, 3.0 * 0.1**0.5, 3.0 * 0.1**0.999], rel=1e-5
    )
    a = hand_alphas_cumprod()[t]
    sigma = ((1 - a) / a) ** 0.5
    expected = ((1 - 0.1) / (1 + sigma) ** 2 + 0.1).tolist()
    snr = loss_recipe(loss_type="huber", huber_schedule="snr", huber_c=0.1)
    assert snr.huber_c(t).tolist() == pytest.approx(expected, rel=1e-4)
    # huber_scale applies to the snr schedule too (the reference ignores it there, §13.22)
    scaled = loss_recipe(loss_type="huber", huber_schedule="snr", huber_c=0.1, huber_scale=2.0)
    assert scaled.huber_c(t).tolist() == pytest.approx([2 * x for x in expected], rel=1e-4)


def test_huber_loss_uses_the_per_sample_c():
    pred, target = unit_error(b=3)
    t = torch.tensor([0, 500, 999])
    recipe = loss_recipe(loss_type="huber", huber_schedule="exponential", huber_c=0.1)
    c = recipe.huber_c(t)
    _, values = recipe.compute(pred, target, t)
    expected = 2 * c * (torch.sqrt(1 + c**2) - c)  # |d| = 1 everywhere
    assert torch.allclose(values, expected, rtol=1e-5)
    _, smooth = loss_recipe(loss_type="smooth_l1", huber_schedule="exponential").compute(
        pred, target, t
    )
    assert torch.allclose(smooth, 2 * (torch.sqrt(1 + c**2) - c), rtol=1e-5)


def test_masked_loss_divides_by_all_elements():
    pred, target = unit_error(b=2, shape=(4, 4, 4))  # latent 4x4 -> pixel mask 32x32
    mask = torch.ones((2, 32, 32))
    mask[0, :, 16:] = 0  # sample 0: right half masked out
    _, values = loss_recipe().compute(pred, target, torch.tensor([1, 1]), mask=mask)
    assert values.tolist() == pytest.approx([0.5, 1.0])
    # (B, 1, H, W) works too, and area interpolation averages partial cells
    mask4 = torch.ones((2, 1, 32, 32))
    mask4[:, :, :, :4] = 0  # half of latent column 0 (8 pixels wide)
    _, values = loss_recipe().compute(pred, target, torch.tensor([1, 1]), mask=mask4)
    assert values.tolist() == pytest.approx([1 - 0.5 / 4] * 2)


def test_loss_weights_apply_only_where_given():
    pred, target = unit_error(b=2)
    t = torch.tensor([10, 10])
    _, plain = loss_recipe().compute(pred, target, t)
    _, weighted = loss_recipe().compute(pred, target, t, loss_weights=torch.tensor([1.0, 0.25]))
    assert plain.tolist() == pytest.approx([1.0, 1.0])
    assert weighted.tolist() == pytest.approx([1.0, 0.25])


def test_check_recipe_errors_and_warnings():
    with pytest.raises(ConfigError) as err:
        check_recipe(TrainingSection(scale_v_pred_loss_like_noise_pred=True), is_v=False)
    assert err.value.problems[0].key == "training.scale_v_pred_loss_like_noise_pred"
    with pytest.raises(ConfigError) as err:
        check_recipe(TrainingSection(v_pred_like_loss=0.1), is_v=True)
    assert err.value.problems[0].key == "training.v_pred_like_loss"
    assert check_recipe(TrainingSection(scale_v_pred_loss_like_noise_pred=True), is_v=True) == []
    warnings = check_recipe(TrainingSection(zero_terminal_snr=True), is_v=False)
    assert any("zero_terminal_snr" in w for w in warnings)
    assert check_recipe(TrainingSection(zero_terminal_snr=True), is_v=True) == []
    assert any("huber_c" in w for w in check_recipe(TrainingSection(huber_c=0.3), is_v=False))
    assert check_recipe(TrainingSection(loss_type="huber", huber_c=0.3), is_v=False) == []
    warnings = check_recipe(TrainingSection(min_timestep=600, max_timestep=400), is_v=False)
    assert any("t = 400" in w for w in warnings)


def test_loss_recipe_logs_warnings_and_raises_errors(caplog):
    with caplog.at_level(logging.WARNING, logger="sdtrain.engine.loss"):
        loss_recipe(zero_terminal_snr=True)
    assert "zero_terminal_snr" in caplog.text
    with pytest.raises(ConfigError):
        loss_recipe(is_v=True, v_pred_like_loss=0.1)
