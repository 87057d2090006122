"""The shared learning-measurement helpers: pixel tests on rendered shapes, fixed noise."""

from __future__ import annotations

import harness  # tests/learning is on sys.path (pytest rootdir-relative import)
import numpy as np
import pytest
import torch

from sdtrain.data import toyworld as tw


def _shapes(n: int, seed: int = 4) -> list[tw.ShapeSpec]:
    rng = np.random.default_rng(seed)
    return [tw.random_shape(rng) for _ in range(n)]


def test_rendered_shapes_score_as_their_caption():
    for spec in _shapes(60):
        score = harness.score_shape_image(tw.render(spec), spec.colour, spec.background)
        assert score.background_ok and score.colour_ok, tw.caption(spec)
        assert score.shape_class == harness.SHAPE_CLASS[spec.shape], (tw.caption(spec), score)


def test_wrong_colours_fail_the_pixel_test():
    spec = tw.ShapeSpec("circle", "red", "blue", 32.0, 32.0, 16.0)
    image = tw.render(spec)
    assert not harness.score_shape_image(image, "green", "blue").colour_ok
    assert not harness.score_shape_image(image, "red", "white").background_ok


def test_main_blob_keeps_the_largest_component_and_fills_its_holes():
    mask = np.zeros((64, 64), dtype=bool)
    mask[10:30, 10:30] = True
    mask[15:20, 15:20] = False  # a hole
    mask[50:53, 50:53] = True  # a speck
    blob = harness.main_blob(mask)
    assert blob[10:30, 10:30].all() and blob.sum() == 400
    assert not harness.main_blob(np.zeros((8, 8), dtype=bool)).any()


def test_image_tensor_round_trip():
    images = [image for image, _ in tw.sample_world(2, 3)]
    back = harness.tensor_to_images(harness.images_to_tensor(images))
    assert [a.tobytes() for a in images] == [b.tobytes() for b in back]


@pytest.fixture(scope="module")
def tiny():
    """A random tiny SD1-shaped model (the denoise/generate plumbing needs no trained weights)."""
    from sdtrain.models.builtin import load_builtin

    bundle = load_builtin("builtin:tiny-sd1")
    bundle.vae.register_to_config(scaling_factor=1.0)
    return bundle


def test_denoise_loss_is_deterministic_and_prompt_sensitive(tiny):
    images = [image for image, _ in tw.sample_world(3, 2)]
    args = (tiny.unet, tiny.text_encoder, tiny.tokenizer, tiny.vae, images)
    first = harness.denoise_loss(*args, "a red circle on a blue background", seeds=(0, 1))
    again = harness.denoise_loss(*args, "a red circle on a blue background", seeds=(0, 1))
    other = harness.denoise_loss(*args, "a green star on a black background", seeds=(0, 1))
    assert first == again
    assert first != other
    state = torch.get_rng_state()
    harness.denoise_loss(*args, "x", seeds=(5,))
    assert torch.equal(state, torch.get_rng_state())


def test_generate_is_deterministic_per_seed(tiny):
    args = (tiny.unet, tiny.text_encoder, tiny.tokenizer, tiny.vae, ["a red circle"])
    first = harness.generate(*args, seed=1, steps=3)
    again = harness.generate(*args, seed=1, steps=3)
    other = harness.generate(*args, seed=2, steps=3)
    assert first[0].size == (64, 64)
    assert first[0].tobytes() == again[0].tobytes() != other[0].tobytes()
