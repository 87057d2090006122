"""Pixels for training: load (EXIF-upright), resize, crop, face crop, flip, colour, mask, tensor.

Follows the reference's `trim_and_resize_if_required` / `crop_target` / augmentations (§4.4,
§4.5, §4.8) with PIL instead of OpenCV. All randomness comes from the `random.Random` passed in,
drawn in the reference's order (the caller's flip decision, crop offsets, colour augmentation),
so a sample's pixels are a pure function of its seed. Only `to_tensor` imports torch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from PIL import Image, ImageOps

from sdtrain.data.buckets import crop_ltrb, trim_offsets
from sdtrain.data.items import Box, Size
from sdtrain.errors import ConfigError, DataError, Problem

if TYPE_CHECKING:
    import torch

# Interpolation names accepted by the reference (`resize_interpolation`) -> PIL filters. The
# reference uses OpenCV except for lanczos/box; PIL's filters are the nearest equivalents:
# "area" (OpenCV INTER_AREA, pixel-area averaging) is PIL's BOX filter, "linear"/"cubic" are
# OpenCV spellings of bilinear/bicubic. Unlike OpenCV, PIL's bilinear/bicubic widen their support
# when shrinking (antialiased), which only makes downscaling cleaner.
INTERPOLATIONS: dict[str, Image.Resampling] = {
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "linear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "cubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,
    "box": Image.Resampling.BOX,
}

_HUE_SHIFT_LIMIT = 8  # reference units: OpenCV hue, 180 per turn (so +-16 degrees)
_BAD_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


@dataclass(frozen=True)
class TransformSpec:
    """How one sample's pixels are made. Sizes are (W, H).

    `face_crop_range` = the subset's `face_crop_aug_range` (lo, hi); like the reference, the plan
    sets it only for non-bucketed datasets, and it acts only on files named `name_cx_cy_w_h`.
    `flip` = mirror this sample: the caller decides it (flip_aug: `rng.random() < 0.5`, drawn
    first, as in the reference) so that latent caches can hold both versions deterministically.
    `color_aug` = the weak hue/gamma jitter.
    """

    bucket: Size
    resized: Size
    interpolation: str | None = None
    random_crop: bool = False
    flip: bool = False
    color_aug: bool = False
    alpha_mask: bool = False
    face_crop_range: tuple[float, float] | None = None


class PreparedPixels(NamedTuple):
    """One sample ready for the batch.

    pixels: (3, H, W) float32 in [-1, 1]; mask: (H, W) float32 in [0, 1] or None;
    crop_ltrb: the reference's crop box, not mirrored (the batch carries the flip separately).
    """

    pixels: torch.Tensor
    mask: np.ndarray | None
    crop_ltrb: Box


def _to_8bit_gray(image: Image.Image) -> Image.Image:
    # 16-bit greyscale PNGs open as "I;16"/"I"; convert("RGB") would clip them to white
    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16") or values.max(initial=0) > 255:
        values = values / 257.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")


def load_image(path: Path, with_alpha: bool) -> Image.Image:
    """Open an image upright (EXIF orientation applied) as RGB, or RGBA when `with_alpha`.

    sdtrain decision: images train the way viewers show them, so the EXIF rotation is applied
    (the reference ignores it) and bucket sizes must use the post-EXIF size. Transparent pixels
    keep their stored RGB (no compositing), as in the reference. Unreadable files raise DataError.
    """
    try:
        with Image.open(path) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
            if image.mode in ("I", "F") or image.mode.startswith("I;16"):
                image = _to_8bit_gray(image)
            elif image.mode == "P" and "transparency" in image.info:
                image = image.convert("RGBA")  # PIL warns on palette -> RGB with transparency
            image = image.convert("RGBA" if with_alpha else "RGB")
    except _BAD_IMAGE_ERRORS as exc:
        raise DataError(
            f"cannot read image {path}: {exc}",
            "the file is missing, corrupt or not an image: re-export or remove it, then check "
            "the dataset again (skip_invalid_images = true trains without such files)",
        ) from exc
    return image


def _filter(name: str) -> Image.Resampling:
    try:
        return INTERPOLATIONS[name]
    except KeyError:
        valid = ", ".join(INTERPOLATIONS)
        raise ConfigError(
            [Problem("resize_interpolation", f"unknown interpolation {name!r}; valid: {valid}")]
        ) from None


def resize(image: Image.Image, size: Size, interpolation: str | None) -> Image.Image:
    """Resize to `size` (W, H); `interpolation` None = area if no side grows, else lanczos.

    RGB and alpha are resized separately: PIL premultiplies RGBA while resizing, which would
    blacken the stored colour of transparent pixels (the reference, via OpenCV, keeps it).
    """
    if image.size == tuple(size):
        return image
    if interpolation is None:
        shrinking = size[0] <= image.width and size[1] <= image.height
        interpolation = "area" if shrinking else "lanczos"
    resample = _filter(interpolation)
    if image.mode == "RGBA":
        rgb = image.convert("RGB").resize(size, resample)
        alpha = image.getchannel("A").resize(size, resample)
        return Image.merge("RGBA", (*rgb.split(), alpha))
    return image.resize(size, resample)


def resize_and_crop(
    image: Image.Image,
    resized: Size,
    bucket: Size,
    interpolation: str | None,
    crop_offsets: tuple[int, int],
) -> Image.Image:
    """Resize to `resized`, then cut the `bucket`-sized window at `crop_offsets` = (left, top)."""
    image = resize(image, resized, interpolation)
    left, top = crop_offsets
    if left < 0 or top < 0 or left + bucket[0] > image.width or top + bucket[1] > image.height:
        raise ValueError(f"crop {crop_offsets} + {bucket} does not fit an image of {image.size}")
    if image.size != tuple(bucket):
        image = image.crop((left, top, left + bucket[0], top + bucket[1]))
    return image


def face_from_name(path: Path) -> tuple[int, int, int, int] | None:
    """Face centre and size (cx, cy, w, h) from a stem like `name_cx_cy_w_h`, else None.

    sdtrain differs: non-numeric or zero parts mean "no face" instead of a crash.
    """
    parts = Path(path).stem.split("_")
    if len(parts) < 5:
        return None
    try:
        cx, cy, fw, fh = (int(p) for p in parts[-4:])
    except ValueError:
        return None
    return (cx, cy, fw, fh) if cx > 0 and fw > 0 and fh > 0 else None


def face_crop(
    image: Image.Image,
    target: Size,
    face: tuple[int, int, int, int],
    crop_range: tuple[float, float],
    random_crop: bool,
    rng: random.Random,
) -> Image.Image:
    """The reference's face-centred crop (§4.5) to `target` = (W, H).

    The image is scaled so the face's larger side spans about `min(W, H) / hi` to
    `min(W, H) / lo` pixels (never above the original size), then cut around the face, with a
    little jitter (or the wide jitter of `random_crop`). sdtrain differs: an image smaller than
    the target is enlarged to cover it instead of failing an assertion.
    """
    width, height = image.size
    if (width, height) == tuple(target):
        return image
    face_x, face_y, face_w, face_h = face
    face_size = max(face_w, face_h)
    size = min(target)
    lo, hi = crop_range
    cover = max(target[1] / height, target[0] / width)
    min_scale = max(cover, min(1.0, size / (face_size * hi)))
    max_scale = max(min_scale, min(1.0, size / (face_size * lo)))
    scale = min_scale if min_scale >= max_scale else rng.uniform(min_scale, max_scale)
    new_size = (int(width * scale + 0.5), int(height * scale + 0.5))
    image = resize(image, new_size, "area" if scale <= 1 else "lanczos")
    face_pos = (int(face_y * scale + 0.5), int(face_x * scale + 0.5))

    start = []  # (top, left): the reference handles the height axis first
    for want, length, pos in zip((target[1], target[0]), new_size[::-1], face_pos, strict=True):
        p = pos - want // 2
        if random_crop:
            spread = max(length - pos, pos)
            p += rng.randint(0, spread) + rng.randint(0, spread) - spread
        elif lo != hi and face_size > size // 10 and face_size >= 40:
            p += rng.randint(-face_size // 20, +face_size // 20)
        start.append(max(0, min(p, length - want)))
    top, left = start
    return image.crop((left, top, left + target[0], top + target[1]))


def flip(image: Image.Image) -> Image.Image:
    """Mirror left-right (alpha included)."""
    return ImageOps.mirror(image)


def color_aug(image: Image.Image, rng: random.Random) -> Image.Image:
    """The reference's weak colour jitter on the RGB channels (alpha untouched).

    With probability 0.33: half the time a hue shift uniform in +-8 OpenCV hue units (+-16
    degrees), else a gamma uniform in [0.95, 1.05]. sdtrain differs (§13.13): the hue is shifted
    in a real RGB->HSV conversion (the reference converted RGB data with OpenCV's BGR flag, which
    mixes up red and blue), and the gamma acts on values normalised to [0, 1] (the reference
    raised 0-255 values to the power and clipped, which mostly saturated them).
    """
    if rng.random() > 0.33:
        return image
    alpha = image.getchannel("A") if image.mode == "RGBA" else None
    rgb = image.convert("RGB")
    if rng.random() > 0.5:
        shift = rng.uniform(-_HUE_SHIFT_LIMIT, _HUE_SHIFT_LIMIT) * 256 / 180  # PIL: 256 per turn
        hsv = np.asarray(rgb.convert("HSV")).copy()
        hsv[..., 0] = np.mod(np.rint(hsv[..., 0] + shift), 256).astype(np.uint8)
        rgb = Image.fromarray(hsv, "HSV").convert("RGB")
    else:
        gamma = rng.uniform(0.95, 1.05)
        values = np.asarray(rgb, dtype=np.float64) / 255.0
        rgb = Image.fromarray(np.clip(np.rint(255.0 * values**gamma), 0, 255).astype(np.uint8))
    if alpha is not None:
        rgb.putalpha(alpha)
    return rgb


def alpha_mask(image: Image.Image) -> np.ndarray:
    """Loss mask (H, W) float32 in [0, 1]: alpha / 255, or ones for images without alpha."""
    if "A" in image.getbands():
        return np.asarray(image.getchannel("A"), dtype=np.float32) / 255.0
    return np.ones((image.height, image.width), dtype=np.float32)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [-1, 1] from the RGB channels (ToTensor + Normalize(0.5, 0.5))."""
    import torch

    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
    return tensor.to(torch.float32).div(255).sub(0.5).div(0.5)


def prepare_pixels(path: Path, spec: TransformSpec, rng: random.Random) -> PreparedPixels:
    """Load one training image and turn it into pixels exactly as `spec` says.

    Order (and order of random draws) as in the reference: load, face crop or resize + crop
    (centre, or random offsets), colour jitter, mirror when `spec.flip`, alpha mask, tensor.
    `crop_ltrb` is computed from the loaded (upright) size; a face crop fills the whole bucket,
    so its box is (0, 0, W, H) (the reference stored zeros).
    """
    image = load_image(path, with_alpha=spec.alpha_mask)
    face = face_from_name(path) if spec.face_crop_range is not None else None
    if face is not None and spec.face_crop_range is not None:
        image = face_crop(image, spec.bucket, face, spec.face_crop_range, spec.random_crop, rng)
        box: Box = (0, 0, spec.bucket[0], spec.bucket[1])
    else:
        box = crop_ltrb(image.size, spec.bucket)
        offsets = trim_offsets(spec.resized, spec.bucket, spec.random_crop, rng)
        image = resize_and_crop(image, spec.resized, spec.bucket, spec.interpolation, offsets)
    if spec.color_aug:
        image = color_aug(image, rng)
    if spec.flip:
        image = flip(image)
    mask = alpha_mask(image) if spec.alpha_mask else None
    return PreparedPixels(to_tensor(image), mask, box)
