"""Training pixels on small images written by the test (§4.4, §4.5, §4.8)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from sdtrain.data.buckets import assign_bucket, make_bucket_resolutions
from sdtrain.data.transforms import (
    INTERPOLATIONS,
    TransformSpec,
    alpha_mask,
    color_aug,
    face_crop,
    face_from_name,
    load_image,
    prepare_pixels,
    resize,
    resize_and_crop,
    to_tensor,
)
from sdtrain.errors import ConfigError, DataError


def gradient(width: int, height: int) -> np.ndarray:
    """RGB image whose red channel is the column index and green the row index (mod 256)."""
    x = np.arange(width) % 256
    y = np.arange(height) % 256
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 0] = x[None, :]
    image[..., 1] = y[:, None]
    image[..., 2] = 77
    return image


def save(path, array: np.ndarray, **kwargs):
    Image.fromarray(array).save(path, **kwargs)
    return path


def test_load_image_rgb_and_rgba(tmp_path):
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 128
    path = save(tmp_path / "a.png", rgba)
    assert load_image(path, with_alpha=False).mode == "RGB"
    image = load_image(path, with_alpha=True)
    assert image.mode == "RGBA" and image.size == (6, 4)
    # transparent pixels keep their stored colour (no compositing)
    assert np.asarray(load_image(path, False))[0, 0].tolist() == [200, 0, 0]
    gray = save(tmp_path / "g.png", np.full((3, 5), 9, np.uint8))
    assert load_image(gray, with_alpha=True).mode == "RGBA"
    palette = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    palette.putpalette([10, 20, 30, 40, 50, 60])
    palette.save(tmp_path / "p.png", transparency=0)
    assert np.asarray(load_image(tmp_path / "p.png", True)).tolist() == [
        [[10, 20, 30, 0], [40, 50, 60, 255]]
    ]
    assert np.asarray(load_image(tmp_path / "p.png", False))[0, 1].tolist() == [40, 50, 60]


def test_load_image_scales_16_bit_greyscale(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((2, 2), 65535, np.uint16)).save(path)
    assert np.asarray(load_image(path, False))[0, 0].tolist() == [255, 255, 255]
    Image.fromarray(np.full((2, 2), 32896, np.uint16)).save(path)
    assert np.asarray(load_image(path, False))[0, 0].tolist() == [128, 128, 128]


def test_exif_rotated_jpeg_loads_upright(tmp_path):
    # stored 40x20 (landscape) with orientation 6 = "rotate 90 CW to display": upright is 20x40
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)  # left half red
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rot.jpg"
    Image.fromarray(stored).save(path, exif=exif.tobytes(), quality=95)
    image = load_image(path, with_alpha=False)
    assert image.size == (20, 40)
    pixels = np.asarray(image).astype(int)
    assert pixels[5, 10, 0] > 200 and pixels[5, 10, 2] < 60  # red on top after rotating CW
    assert pixels[35, 10, 2] > 200 and pixels[35, 10, 0] < 60


def test_corrupt_and_missing_files_raise_data_error(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(DataError) as info:
        load_image(bad, False)
    assert str(bad) in info.value.message and info.value.hint
    truncated = save(tmp_path / "t.jpg", gradient(64, 64))
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(DataError, match="t.jpg"):
        load_image(truncated, False)
    with pytest.raises(DataError, match="missing.png"):
        load_image(tmp_path / "missing.png", False)


def test_resize_and_crop_centre_box(tmp_path):
    image = Image.fromarray(gradient(200, 100))
    out = resize_and_crop(image, (200, 100), (128, 64), None, (36, 18))
    assert out.size == (128, 64)
    pixels = np.asarray(out)
    assert pixels[0, 0, :2].tolist() == [36, 18]  # the window starts at (left, top)
    assert pixels[-1, -1, :2].tolist() == [36 + 127, 18 + 63]
    with pytest.raises(ValueError):
        resize_and_crop(image, (200, 100), (128, 64), None, (80, 0))


def test_bucket_pipeline_gives_exact_bucket_size(tmp_path):
    buckets = make_bucket_resolutions((128, 128), 64, 256, 32)
    for size in [(300, 200), (97, 131), (128, 128), (40, 400)]:
        choice = assign_bucket(size, buckets, 128 * 128, 32, no_upscale=False)
        path = save(tmp_path / f"{size[0]}x{size[1]}.png", gradient(*size))
        spec = TransformSpec(bucket=choice.bucket, resized=choice.resized)
        prepared = prepare_pixels(path, spec, random.Random(0))
        assert tuple(prepared.pixels.shape) == (3, choice.bucket[1], choice.bucket[0])
        assert prepared.mask is None


def test_interpolation_names_and_default_choice():
    image = Image.fromarray(gradient(64, 64))
    for name in INTERPOLATIONS:
        assert resize(image, (32, 48), name).size == (32, 48)
    with pytest.raises(ConfigError) as info:
        resize(image, (32, 32), "hamming")
    assert "lanczos" in info.value.problems[0].message
    # shrinking defaults to area (box averaging): a 2x2 block average
    checker = np.zeros((2, 2, 3), np.uint8)
    checker[0, 0] = checker[1, 1] = 200
    assert np.asarray(resize(Image.fromarray(checker), (1, 1), None))[0, 0, 0] == 100
    # enlarging defaults to lanczos (ringing overshoots a hard edge; box would not)
    edge = np.zeros((1, 8, 3), np.uint8)
    edge[:, 4:] = 255
    up = np.asarray(resize(Image.fromarray(edge), (32, 1), None)).astype(int)
    assert np.asarray(resize(Image.fromarray(edge), (32, 1), "lanczos")).tolist() == up.tolist()
    assert up[0, :, 0].tolist() != np.repeat(edge[0, :, 0], 4).tolist()


def test_rgba_resize_keeps_colour_of_transparent_pixels():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 1] = 180  # green everywhere, fully transparent
    out = np.asarray(resize(Image.fromarray(rgba), (4, 4), "lanczos"))
    assert out[..., 1].min() == 180 and out[..., 3].max() == 0


def test_flip_and_alpha_mask_follow_the_image(tmp_path):
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., :3] = gradient(64, 64)
    rgba[:, :16, 3] = 255  # left quarter opaque
    path = save(tmp_path / "m.png", rgba)
    for flipped in (False, True):
        spec = TransformSpec(bucket=(64, 64), resized=(64, 64), flip=flipped, alpha_mask=True)
        pixels, mask, box = prepare_pixels(path, spec, random.Random(0))
        assert mask.shape == (64, 64) and mask.dtype == np.float32
        opaque_side = mask[:, 48:] if flipped else mask[:, :16]
        assert opaque_side.min() == 1.0 and mask.sum() == 64 * 16
        red = pixels[0]  # column index, scaled to [-1, 1]
        expected_first = 63 if flipped else 0
        assert red[0, 0].item() == pytest.approx(expected_first / 255 * 2 - 1)
        assert box == (0, 0, 64, 64)
    rgb_path = save(tmp_path / "rgb.png", gradient(8, 8))
    assert alpha_mask(load_image(rgb_path, True)).min() == 1.0


def test_to_tensor_range_and_layout():
    array = np.zeros((2, 3, 3), np.uint8)
    array[0, 1] = (255, 0, 128)
    tensor = to_tensor(Image.fromarray(array))
    assert tensor.shape == (3, 2, 3) and tensor.dtype == torch.float32
    assert tensor[:, 0, 1].tolist() == pytest.approx([1.0, -1.0, 128 / 255 * 2 - 1], abs=1e-6)
    assert tensor.min().item() == -1.0


def test_random_crop_is_deterministic_per_rng(tmp_path):
    path = save(tmp_path / "big.png", gradient(160, 64))
    spec = TransformSpec(bucket=(64, 64), resized=(160, 64), random_crop=True)
    a = prepare_pixels(path, spec, random.Random(3)).pixels
    b = prepare_pixels(path, spec, random.Random(3)).pixels
    assert torch.equal(a, b)
    lefts = {
        round((prepare_pixels(path, spec, random.Random(s)).pixels[0, 0, 0].item() + 1) * 127.5)
        for s in range(20)
    }
    assert len(lefts) > 5 and all(0 <= x <= 96 for x in lefts)
    centre = prepare_pixels(
        path, TransformSpec(bucket=(64, 64), resized=(160, 64)), random.Random()
    )
    assert centre.crop_ltrb == (0, 19, 64, 45)  # 160x64 fitted into 64x64: 64x25.6
    assert round((centre.pixels[0, 0, 0].item() + 1) * 127.5) == 48  # (160 - 64) // 2


def test_color_aug_changes_rgb_only_and_is_seeded():
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., :3] = (180, 90, 40)
    rgba[..., 3] = 77
    image = Image.fromarray(rgba)
    outs = [np.asarray(color_aug(image, random.Random(s))) for s in range(40)]
    assert all((o[..., 3] == 77).all() for o in outs)
    changed = [o for o in outs if not np.array_equal(o, rgba)]
    assert 3 <= len(changed) <= 25  # applied with probability 0.33
    for o in changed:
        assert np.abs(o[..., :3].astype(int) - rgba[..., :3]).max() <= 40
    assert np.array_equal(color_aug(image, random.Random(9)), color_aug(image, random.Random(9)))


def test_face_from_name():
    assert face_from_name("x/dog_120_80_40_50.png") == (120, 80, 40, 50)
    assert face_from_name("x/a_dog_0_80_40_50.png") is None
    assert face_from_name("x/my_dog_photo_one_two.png") is None
    assert face_from_name("x/dog_1_2_3.png") is None


def test_face_crop_centres_the_face(tmp_path):
    image = Image.fromarray(gradient(200, 160))
    # face at (150, 60), 40 px, range (1, 1): min(W, H) / 40 > 1, so the scale stays 1
    out = face_crop(image, (64, 64), (150, 60, 40, 40), (1.0, 1.0), False, random.Random(0))
    assert out.size == (64, 64)
    pixels = np.asarray(out)
    assert pixels[0, 0, :2].tolist() == [150 - 32, 60 - 32]
    # a face near the border: the window is clamped inside the image
    edge = face_crop(image, (64, 64), (195, 5, 40, 40), (1.0, 1.0), False, random.Random(0))
    assert np.asarray(edge)[0, 0, :2].tolist() == [200 - 64, 0]
    # scale range: the result is the target size for every draw
    for seed in range(5):
        out = face_crop(image, (64, 48), (100, 80, 60, 60), (0.2, 0.8), True, random.Random(seed))
        assert out.size == (64, 48)


def test_face_crop_enlarges_small_images_instead_of_failing():
    image = Image.fromarray(gradient(40, 30))
    out = face_crop(image, (64, 64), (20, 15, 10, 10), (0.3, 0.6), False, random.Random(0))
    assert out.size == (64, 64)


def test_prepare_pixels_uses_face_crop_only_when_named_and_enabled(tmp_path):
    path = save(tmp_path / "dog_150_60_40_40.png", gradient(200, 160))
    spec = TransformSpec(bucket=(64, 64), resized=(80, 64), face_crop_range=(1.0, 1.0))
    prepared = prepare_pixels(path, spec, random.Random(0))
    assert prepared.crop_ltrb == (0, 0, 64, 64)
    assert round((prepared.pixels[0, 0, 0].item() + 1) * 127.5) == 118  # face-centred window
    plain = prepare_pixels(path, TransformSpec(bucket=(64, 64), resized=(80, 64)), random.Random(0))
    assert plain.crop_ltrb == (0, 6, 64, 57)  # 64x51.2 fit


class Scripted(random.Random):
    """A Random whose random()/uniform() return scripted values (to pick color_aug branches)."""

    def __init__(self, randoms: list[float], uniform: float) -> None:
        super().__init__(0)
        self._randoms = list(randoms)
        self._uniform = uniform

    def random(self) -> float:
        return self._randoms.pop(0)

    def uniform(self, a: float, b: float) -> float:
        return self._uniform


def test_color_aug_hue_shift_is_a_real_rgb_hue_rotation():
    red = Image.fromarray(np.full((2, 2, 3), (255, 0, 0), np.uint8))
    shifted = np.asarray(color_aug(red, Scripted([0.1, 0.9], uniform=8.0)))[0, 0].astype(int)
    # +8 OpenCV units = +16 degrees: red turns slightly orange (G ~ 68), blue stays 0
    assert shifted[0] >= 250 and 60 <= shifted[1] <= 72 and shifted[2] <= 2


def test_color_aug_gamma_acts_on_normalised_values():
    grey = Image.fromarray(np.full((2, 2, 3), 180, np.uint8))
    out = np.asarray(color_aug(grey, Scripted([0.1, 0.2], uniform=1.05)))
    assert out[0, 0].tolist() == [round(255 * (180 / 255) ** 1.05)] * 3  # 177, not clipped 255
    untouched = np.asarray(color_aug(grey, Scripted([0.5], uniform=1.05)))
    assert (untouched == 180).all()
