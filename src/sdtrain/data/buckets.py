"""Aspect-ratio buckets: the bucket list, which bucket an image goes to, and its crop geometry.

Pure python (no numpy) so `dataset plan` stays instant. Every size is (width, height), as in
the reference toolkit (kohya-ss sd-scripts); the numbers reproduce its results exactly, except
where a docstring says "sdtrain differs".
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from sdtrain.data.items import Box, Size


@dataclass(frozen=True)
class BucketChoice:
    """Where one image goes: its bucket, the size it is resized to before cropping, and the
    aspect-ratio error `bucket_w / bucket_h - image_w / image_h` (its absolute mean over the images,
    without repeats, is the reference's `mean_img_ar_error`)."""

    bucket: Size
    resized: Size
    ar_error: float


def make_bucket_resolutions(
    max_reso: Size, min_size: int = 256, max_size: int = 1024, step: int = 64
) -> list[Size]:
    """All predefined buckets for a dataset resolution `max_reso` = (W, H), sorted ascending.

    Same algorithm as the reference's `make_bucket_resolutions`: the square bucket of area
    <= W*H, then for every width `w` from `min_size` to `max_size` in `step`s the tallest height
    (multiple of `step`, <= `max_size`) whose area stays <= W*H, plus the transposed bucket.
    512x512 with 256/1024/64 gives 17 buckets from (256, 832) to (1024, 256).
    """
    if step < 1 or min_size < 1 or max_size < min_size:
        raise ValueError(f"invalid bucket limits: min {min_size}, max {max_size}, step {step}")
    area = max_reso[0] * max_reso[1]
    side = int(math.sqrt(area) / step) * step
    resos = {(side, side)}
    for width in range(min_size, max_size + 1, step):
        height = min(max_size, int((area // width) / step) * step)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
    return sorted(resos)


def normalize_bucket_limits(
    resolution: Size, min_bucket_reso: int, max_bucket_reso: int, step: int
) -> tuple[int, int, list[str]]:
    """Bucket limits as the reference uses them: min floored and max ceiled to a multiple of `step`.

    Returns `(min, max, warnings)`; each adjustment adds a warning sentence. Raises ValueError
    when the resolution does not fit between the limits (the reference asserts the same).
    """
    if step < 1:
        raise ValueError(f"bucket_reso_steps must be at least 1, got {step}")
    warnings: list[str] = []
    if min_bucket_reso % step:
        adjusted = min_bucket_reso - min_bucket_reso % step
        warnings.append(
            f"min_bucket_reso {min_bucket_reso} is not a multiple of bucket_reso_steps {step}; "
            f"using {adjusted}"
        )
        min_bucket_reso = adjusted
    if max_bucket_reso % step:
        adjusted = max_bucket_reso + step - max_bucket_reso % step
        warnings.append(
            f"max_bucket_reso {max_bucket_reso} is not a multiple of bucket_reso_steps {step}; "
            f"using {adjusted}"
        )
        max_bucket_reso = adjusted
    if min(resolution) < min_bucket_reso:
        raise ValueError(
            f"min_bucket_reso ({min_bucket_reso}) is larger than the resolution's smaller side "
            f"({min(resolution)}); lower min_bucket_reso or raise the resolution"
        )
    if max(resolution) > max_bucket_reso:
        raise ValueError(
            f"max_bucket_reso ({max_bucket_reso}) is smaller than the resolution's larger side "
            f"({max(resolution)}); raise max_bucket_reso or lower the resolution"
        )
    return min_bucket_reso, max_bucket_reso, warnings


def _cover_resize(size: Size, bucket: Size) -> Size:
    """Scale `size` (keeping its aspect) to cover `bucket`; one side then equals the bucket."""
    width, height = size
    if width / height > bucket[0] / bucket[1]:  # relatively wider: match heights
        scale = bucket[1] / height
    else:
        scale = bucket[0] / width
    return int(width * scale + 0.5), int(height * scale + 0.5)


def _nearest_bucket(size: Size, buckets: list[Size]) -> Size:
    """The bucket of the image's exact size, else the closest aspect ratio (first wins ties)."""
    if size in buckets:
        return size
    aspect = size[0] / size[1]
    best = buckets[0]
    best_error = abs(best[0] / best[1] - aspect)
    for bucket in buckets[1:]:
        error = abs(bucket[0] / bucket[1] - aspect)
        if error < best_error:
            best, best_error = bucket, error
    return best


def _round_to_step(value: float, step: int) -> int:
    rounded = int(value + 0.5)
    return rounded - rounded % step


def _no_upscale_resize(size: Size, max_area: int, step: int) -> Size:
    """The reference's `bucket_no_upscale` resize: shrink to area <= max_area, never enlarge."""
    width, height = size
    if width * height <= max_area:
        return size
    aspect = width / height
    target_w = math.sqrt(max_area * aspect)
    target_h = max_area / target_w
    # candidate 1 rounds the width to a step, candidate 2 the height; keep the smaller aspect error
    w1 = _round_to_step(target_w, step)
    h1 = _round_to_step(w1 / aspect, step)
    h2 = _round_to_step(target_h, step)
    w2 = _round_to_step(h2 * aspect, step)
    # sdtrain differs: a zero side (extreme aspect ratios) counts as an infinite error instead of
    # raising ZeroDivisionError
    error1 = abs(w1 / h1 - aspect) if h1 else math.inf
    error2 = abs(w2 / h2 - aspect) if h2 else math.inf
    if error1 < error2:
        return w1, int(w1 / aspect + 0.5)
    return int(h2 * aspect + 0.5), h2


def assign_bucket(
    size: Size, buckets: list[Size] | None, max_area: int, step: int, no_upscale: bool
) -> BucketChoice:
    """Choose the bucket and resize target of an image of `size` (after EXIF orientation).

    * `no_upscale=False` (reference §4.2): `buckets` is the predefined list. An image whose size
      is a bucket uses it; otherwise the bucket with the closest aspect ratio (first in list
      order on ties). The image is then cover-scaled (`int(x + 0.5)` rounding) so one side equals
      the bucket and the other is at least as large; small images are enlarged.
    * `no_upscale=True` (reference §4.3): `buckets` is not used; images larger than `max_area`
      shrink to about that area, smaller ones keep their size, and the bucket is the resized
      size floored to multiples of `step` (so the image is cropped, never padded).

    sdtrain differs: the reference gives an image narrower (or shorter) than `step` a 0-sized
    bucket in no_upscale mode, which fails later during training. Here that raises ValueError
    naming the size, so the dataset plan can report the image as unusable before training.
    """
    width, height = size
    if width < 1 or height < 1:
        raise ValueError(f"image size {width}x{height} is empty")
    if not no_upscale:
        if not buckets:
            raise ValueError("assign_bucket needs the predefined bucket list unless no_upscale")
        bucket = _nearest_bucket(size, buckets)
        resized = _cover_resize(size, bucket)
    else:
        resized = _no_upscale_resize(size, max_area, step)
        bucket = (resized[0] - resized[0] % step, resized[1] - resized[1] % step)
        if bucket[0] < step or bucket[1] < step:
            raise ValueError(
                f"image size {width}x{height} (resized {resized[0]}x{resized[1]}) is smaller than "
                f"one bucket step ({step} px) on a side, so it fits no bucket without enlarging"
            )
    ar_error = bucket[0] / bucket[1] - width / height
    return BucketChoice(bucket=bucket, resized=resized, ar_error=ar_error)


def assign_fixed(size: Size, resolution: Size) -> BucketChoice:
    """Non-bucketed mode: the single bucket `resolution`, the image cover-scaled to it.

    sdtrain differs from the reference (§4.5, §13.12): there, only the latent-cache path resizes
    and centre-crops; on-the-fly loading demands images of exactly `resolution` (or larger with
    `random_crop`, cropped without resizing). sdtrain resizes + crops in both paths, so results
    do not depend on whether latents are cached; `random_crop` picks a random window of the
    resized image, and `face_crop_aug_range` (transforms.face_crop) still replaces the resize
    when the file name carries face coordinates.
    """
    return assign_bucket(size, [resolution], resolution[0] * resolution[1], 1, no_upscale=False)


def crop_ltrb(original: Size, bucket: Size) -> Box:
    """SDXL-style crop box: where an aspect-preserving fit of `original` sits, centred, in `bucket`.

    Computed from the original size only (random-crop offsets are ignored), like the reference.
    sdtrain returns integers: left/top are the reference's floored values, right/bottom add the
    fitted size rounded to the nearest pixel (the reference keeps fractional right/bottom).
    """
    bucket_w, bucket_h = bucket
    image_aspect = original[0] / original[1]
    if bucket_w / bucket_h > image_aspect:  # bucket wider: the fit matches heights
        fit_w, fit_h = bucket_h * image_aspect, float(bucket_h)
    else:
        fit_w, fit_h = float(bucket_w), bucket_w / image_aspect
    left = int((bucket_w - fit_w) // 2)
    top = int((bucket_h - fit_h) // 2)
    return left, top, left + int(fit_w + 0.5), top + int(fit_h + 0.5)


def trim_offsets(
    resized: Size, bucket: Size, random_crop: bool, rng: random.Random
) -> tuple[int, int]:
    """(left, top) of the bucket-sized window cut from the resized image.

    Centre (`excess // 2`) or, with `random_crop`, `rng.randint(0, excess)`; the width is drawn
    before the height, as in the reference. Raises ValueError if the resized image is smaller than
    the bucket (it never is for sizes from assign_bucket/assign_fixed).
    """
    offsets = []
    for have, want in zip(resized, bucket, strict=True):
        if have < want:
            raise ValueError(f"resized size {resized} is smaller than its bucket {bucket}")
        excess = have - want
        offsets.append(rng.randint(0, excess) if random_crop and excess else excess // 2)
    return offsets[0], offsets[1]
