"""Bucket list, bucket choice and crop geometry against the reference vectors (§4.1-4.4, §14)."""

from __future__ import annotations

import random

import pytest

from sdtrain.data.buckets import (
    BucketChoice,
    assign_bucket,
    assign_fixed,
    crop_ltrb,
    make_bucket_resolutions,
    normalize_bucket_limits,
    trim_offsets,
)

REF_512 = [
    (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640),
    (448, 576), (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256),
    (896, 256), (960, 256), (1024, 256),
]  # fmt: skip


def test_bucket_list_512_matches_reference():
    assert make_bucket_resolutions((512, 512), 256, 1024, 64) == REF_512


def test_bucket_list_768_matches_reference():
    half = [
        (256, 1024), (320, 1024), (384, 1024), (448, 1024), (512, 1024), (576, 960),
        (576, 1024), (640, 896), (704, 832),
    ]  # fmt: skip
    expected = sorted({*half, *[(h, w) for w, h in half], (768, 768)})
    got = make_bucket_resolutions((768, 768), 256, 1024, 64)
    assert got == expected
    assert len(got) == 19


def test_bucket_list_never_exceeds_area_and_respects_limits():
    got = make_bucket_resolutions((640, 384), 320, 768, 32)
    assert got == sorted(set(got))
    for w, h in got:
        assert w * h <= 640 * 384
        assert w % 32 == 0 and h % 32 == 0
        assert 320 <= w <= 768 and 320 <= h <= 768 or (w, h) == (480, 480)


@pytest.mark.parametrize(
    ("size", "bucket", "resized"),
    [
        ((1024, 768), (576, 448), (597, 448)),
        ((300, 200), (640, 384), (640, 427)),
        ((1920, 1080), (640, 384), (683, 384)),
        ((2000, 3000), (384, 640), (427, 640)),
    ],
)
def test_assign_bucket_reference_examples(size, bucket, resized):
    choice = assign_bucket(size, REF_512, 512 * 512, 64, no_upscale=False)
    assert choice.bucket == bucket
    assert choice.resized == resized
    assert choice.ar_error == pytest.approx(bucket[0] / bucket[1] - size[0] / size[1])
    # one side equals the bucket, the other covers it
    assert min(r - b for r, b in zip(choice.resized, choice.bucket, strict=True)) == 0
    assert all(r >= b for r, b in zip(choice.resized, choice.bucket, strict=True))


def test_assign_bucket_exact_size_wins_over_equal_aspect():
    # (768, 320) and (704, 320) are both buckets; an image of exactly one of them keeps it
    choice = assign_bucket((768, 320), REF_512, 512 * 512, 64, no_upscale=False)
    assert choice == BucketChoice((768, 320), (768, 320), 0.0)


def test_assign_bucket_ties_take_the_first_bucket():
    buckets = [(256, 512), (512, 256), (384, 768)]  # first and last share aspect 0.5
    assert assign_bucket((100, 200), buckets, 0, 64, False).bucket == (256, 512)


@pytest.mark.parametrize(
    ("size", "bucket", "resized"),
    [
        ((1024, 768), (512, 384), (512, 384)),
        ((300, 200), (256, 192), (300, 200)),
        ((2000, 3000), (384, 576), (384, 576)),
        ((512, 512), (512, 512), (512, 512)),
    ],
)
def test_assign_bucket_no_upscale_reference_examples(size, bucket, resized):
    choice = assign_bucket(size, None, 512 * 512, 64, no_upscale=True)
    assert (choice.bucket, choice.resized) == (bucket, resized)


def test_no_upscale_never_enlarges_and_never_pads():
    for size in [(333, 1000), (1500, 97), (4000, 3000), (65, 65), (800, 600)]:
        choice = assign_bucket(size, None, 512 * 512, 64, no_upscale=True)
        assert choice.resized[0] <= size[0] and choice.resized[1] <= size[1]
        assert choice.bucket[0] <= choice.resized[0] and choice.bucket[1] <= choice.resized[1]
        assert choice.bucket[0] % 64 == 0 and choice.bucket[1] % 64 == 0


def test_no_upscale_image_narrower_than_step_is_rejected():
    with pytest.raises(ValueError, match="50x1000"):
        assign_bucket((50, 1000), None, 512 * 512, 64, no_upscale=True)
    # extreme aspect that shrinks below one step on its short side: no ZeroDivisionError
    with pytest.raises(ValueError, match="20000x10"):
        assign_bucket((20000, 10), None, 512 * 512, 64, no_upscale=True)


def test_assign_bucket_needs_a_list_when_upscaling():
    with pytest.raises(ValueError):
        assign_bucket((100, 100), None, 512 * 512, 64, no_upscale=False)


def test_assign_fixed_cover_scales_to_resolution():
    assert assign_fixed((1024, 768), (512, 512)) == BucketChoice((512, 512), (683, 512), 1 - 4 / 3)
    assert assign_fixed((300, 600), (512, 512)).resized == (512, 1024)
    assert assign_fixed((512, 512), (512, 512)).resized == (512, 512)


def test_normalize_bucket_limits_rounds_and_warns():
    lo, hi, warnings = normalize_bucket_limits((512, 512), 300, 1000, 64)
    assert (lo, hi) == (256, 1024)
    assert len(warnings) == 2 and "300" in warnings[0] and "1000" in warnings[1]
    assert normalize_bucket_limits((512, 768), 256, 1024, 64) == (256, 1024, [])


def test_normalize_bucket_limits_rejects_resolution_outside_limits():
    with pytest.raises(ValueError, match="min_bucket_reso"):
        normalize_bucket_limits((256, 512), 320, 1024, 64)
    with pytest.raises(ValueError, match="max_bucket_reso"):
        normalize_bucket_limits((512, 1280), 256, 1024, 64)


def test_crop_ltrb_centres_the_fit():
    assert crop_ltrb((1024, 768), (576, 448)) == (0, 8, 576, 440)  # 576x432 fit
    assert crop_ltrb((2000, 3000), (384, 640)) == (0, 32, 384, 608)  # 384x576 fit
    assert crop_ltrb((300, 200), (640, 384)) == (32, 0, 608, 384)  # 576x384 fit
    assert crop_ltrb((512, 512), (512, 512)) == (0, 0, 512, 512)


def test_trim_offsets_centre_and_random():
    rng = random.Random(0)
    assert trim_offsets((597, 448), (576, 448), False, rng) == (10, 0)
    assert trim_offsets((427, 640), (384, 640), False, rng) == (21, 0)
    assert trim_offsets((512, 700), (512, 512), False, rng) == (0, 94)
    seen = {trim_offsets((600, 500), (576, 448), True, random.Random(s)) for s in range(50)}
    assert all(0 <= left <= 24 and 0 <= top <= 52 for left, top in seen)
    assert len(seen) > 10
    a = trim_offsets((600, 500), (576, 448), True, random.Random(7))
    assert a == trim_offsets((600, 500), (576, 448), True, random.Random(7))
    with pytest.raises(ValueError):
        trim_offsets((500, 500), (512, 512), False, rng)
