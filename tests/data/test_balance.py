"""Regularization balancing against the reference vectors (§4.7, §14)."""

from __future__ import annotations

import random

import pytest

from sdtrain.data.balance import balance_regularization


def reference_loop(num_train: int, reg_repeats: list[int]) -> list[int]:
    """The reference's loop, written out literally, to cross-check the closed form."""
    out = [0] * len(reg_repeats)
    if sum(reg_repeats) == 0:
        return out
    n, first = 0, True
    while n < num_train:
        for i, r in enumerate(reg_repeats):
            if first:
                out[i] = r
                n += r
            else:
                out[i] += 1
                n += 1
            if n >= num_train:
                break
        first = False
    return out


def test_fewer_reg_samples_are_raised_round_robin():
    got = balance_regularization(10 * 10, [1] * 30)
    assert got == [4] * 10 + [3] * 20
    assert sum(got) == 100


def test_more_reg_samples_use_a_prefix():
    got = balance_regularization(10 * 10, [1] * 300)
    assert got == [1] * 100 + [0] * 200


def test_overshoot_is_less_than_one_image():
    assert balance_regularization(10, [3, 3, 3, 3]) == [3, 3, 3, 3]  # 12: overshoot 2 < 3
    assert balance_regularization(9, [3, 3, 3, 3]) == [3, 3, 3, 0]


def test_no_train_images_uses_no_reg():
    assert balance_regularization(0, [1, 2, 3]) == [0, 0, 0]


def test_no_reg_images():
    assert balance_regularization(50, []) == []


def test_negative_counts_are_rejected():
    with pytest.raises(ValueError):
        balance_regularization(-1, [1])


def test_closed_form_equals_reference_loop():
    rng = random.Random(1)
    for _ in range(300):
        reg = [rng.randint(0, 5) for _ in range(rng.randint(1, 12))]
        num_train = rng.randint(0, 80)
        assert balance_regularization(num_train, reg) == reference_loop(num_train, reg), (
            num_train,
            reg,
        )
