"""A procedural toy world of 64 px coloured shapes and patterns with captions, for learning checks.

Everything is deterministic from a seed and needs only numpy and PIL. Three kinds of picture exist:

- shapes: "a red circle on a blue background" (one axis-aligned shape, varied position and size);
- patterns: "a red and blue striped pattern" (stripes, checks or dots in two named colours), so that
  the class word "pattern" means something to a model pre-trained on this world;
- the quickstart subject: "shs pattern", three-colour zigzag bands in pink, cyan and yellow. Pink
  and cyan never occur in the pre-training world, and the zigzag geometry does not either.

Images are drawn at 4x the size and box-filtered down, so edges are anti-aliased the same way on
every platform. `nearest_colour` / `colour_fractions` name pixel colours for pixel tests.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Union

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64  # image side in pixels
_SUPER = 4  # supersampling factor for anti-aliased edges

# Colours of the pre-training world (shape, background and pattern colours).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 75, 215),
    "yellow": (240, 215, 35),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "orange": (245, 135, 20),
    "purple": (130, 50, 175),
}
# Colours only the quickstart subject uses (never seen in pre-training).
SUBJECT_COLOURS: dict[str, tuple[int, int, int]] = {
    "pink": (245, 105, 185),
    "cyan": (40, 205, 215),
}
ALL_COLOURS: dict[str, tuple[int, int, int]] = {**COLOURS, **SUBJECT_COLOURS}

SHAPES: tuple[str, ...] = ("square", "circle", "triangle", "star")
PATTERNS: tuple[str, ...] = ("striped", "checkered", "dotted")

SUBJECT_TOKEN = "shs"
SUBJECT_CLASS = "pattern"
SUBJECT_CAPTION = f"{SUBJECT_TOKEN} {SUBJECT_CLASS}"
SUBJECT_PALETTE: tuple[str, str, str] = ("pink", "cyan", "yellow")
# Seed of the shipped quickstart images (configs/examples/quickstart/images): learning checks that
# train on them must hold out subject images drawn from other seeds.
QUICKSTART_SEED = 2024
QUICKSTART_COUNT = 8

SHAPE_FRACTION = 0.75  # share of shape pictures in `sample_world` (the rest are patterns)
# Shape radius in px: circumradius of triangle and star, radius of circle, half side of square.
RADIUS_RANGE = (11.0, 20.0)


@dataclass(frozen=True)
class ShapeSpec:
    """One shape of `colour` centred at (cx, cy) px, `radius` px, on a plain `background`."""

    shape: str
    colour: str
    background: str
    cx: float
    cy: float
    radius: float


@dataclass(frozen=True)
class PatternSpec:
    """A two-colour pattern filling the image: `kind` in PATTERNS, `period` px, phase in [0, 1)."""

    kind: str
    colour_a: str  # stripes/checks: first colour; dots: the dot colour
    colour_b: str  # stripes/checks: second colour; dots: the ground
    period: float
    phase: float
    vertical: bool = False  # stripes only


@dataclass(frozen=True)
class SubjectSpec:
    """The quickstart subject: horizontal zigzag bands cycling through SUBJECT_PALETTE."""

    band: float  # band thickness in px
    period: float  # zigzag wavelength in px
    amplitude: float  # zigzag height in px
    phase_x: float  # in [0, 1)
    phase_y: float  # in [0, 1)


Spec = Union[ShapeSpec, PatternSpec, SubjectSpec]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(spec: Spec) -> str:
    """The caption of a spec, e.g. "a red circle on a blue background"."""
    if isinstance(spec, ShapeSpec):
        shape = f"{_article(spec.colour)} {spec.colour} {spec.shape}"
        return f"{shape} on {_article(spec.background)} {spec.background} background"
    if isinstance(spec, PatternSpec):
        return f"{_article(spec.colour_a)} {spec.colour_a} and {spec.colour_b} {spec.kind} pattern"
    return SUBJECT_CAPTION


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices (px) of a square, triangle or star; y grows downwards, points face up."""
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        # Equilateral, circumradius r, centroid shifted so the bounding box is centred on (cx, cy).
        dy = r * 0.25
        angles = [-90.0, 30.0, 150.0]
        return [
            (cx + r * np.cos(np.radians(a)), cy + dy + r * np.sin(np.radians(a))) for a in angles
        ]
    if shape == "star":
        points = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.45
            a = np.radians(-90.0 + 36.0 * i)
            points.append((cx + rad * np.cos(a), cy + 0.08 * r + rad * np.sin(a)))
        return points
    raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")


def shape_mask(spec: ShapeSpec) -> np.ndarray:
    """Coverage of the shape per pixel, float32 (SIZE, SIZE) in [0, 1] (anti-aliased)."""
    big = Image.new("L", (SIZE * _SUPER, SIZE * _SUPER), 0)
    draw = ImageDraw.Draw(big)
    s = _SUPER
    cx, cy, r = spec.cx * s, spec.cy * s, spec.radius * s
    if spec.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(_shape_polygon(spec.shape, cx, cy, r), fill=255)
    cover = np.asarray(big, dtype=np.float32) / 255.0
    return cover.reshape(SIZE, s, SIZE, s).mean(axis=(1, 3))


def _grid() -> tuple[np.ndarray, np.ndarray]:
    """Supersampled pixel-centre coordinates in output pixels, each (SIZE*_SUPER, SIZE*_SUPER)."""
    n = SIZE * _SUPER
    c = (np.arange(n, dtype=np.float64) + 0.5) / _SUPER
    return np.meshgrid(c, c)  # x, y


def _pattern_index(spec: PatternSpec | SubjectSpec) -> np.ndarray:
    """Colour index per supersampled pixel: int array (SIZE*_SUPER, SIZE*_SUPER)."""
    x, y = _grid()
    if isinstance(spec, SubjectSpec):
        t = (x / spec.period + spec.phase_x) % 1.0
        zig = spec.amplitude * (2.0 * np.abs(2.0 * t - 1.0) - 1.0)
        return (np.floor((y + zig) / spec.band + 3.0 * spec.phase_y) % 3).astype(np.int64)
    p, off = spec.period, spec.phase * spec.period
    if spec.kind == "striped":
        u = x if spec.vertical else y
        return (np.floor((u + off) / (p / 2.0)) % 2).astype(np.int64)
    if spec.kind == "checkered":
        cx = np.floor((x + off) / (p / 2.0))
        cy = np.floor((y + off) / (p / 2.0))
        return ((cx + cy) % 2).astype(np.int64)
    if spec.kind == "dotted":
        # dots of radius 0.3 * period on a square lattice; index 0 = dot (colour_a), 1 = ground
        gx = (x + off) % p - p / 2.0
        gy = (y + off) % p - p / 2.0
        return (gx * gx + gy * gy > (0.3 * p) ** 2).astype(np.int64)
    raise ValueError(f"unknown pattern {spec.kind!r}; valid: {', '.join(PATTERNS)}")


def _downsample(index: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Supersampled colour indices + (K, 3) palette -> uint8 (SIZE, SIZE, 3) box-filtered image."""
    rgb = palette[index].reshape(SIZE, _SUPER, SIZE, _SUPER, 3).mean(axis=(1, 3))
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def render(spec: Spec, colours: Mapping[str, tuple[int, int, int]] | None = None) -> Image.Image:
    """Draw a spec as a SIZE x SIZE RGB PIL image.

    `colours` maps colour names to RGB (default ALL_COLOURS); another table draws the same scene in
    other colours (the toy VAE trains on recoloured scenes so that it is not tied to the palette).
    """
    table = ALL_COLOURS if colours is None else colours
    if isinstance(spec, ShapeSpec):
        cover = shape_mask(spec)[..., None]
        fg = np.array(table[spec.colour], dtype=np.float32)
        bg = np.array(table[spec.background], dtype=np.float32)
        rgb = np.clip(np.rint(cover * fg + (1.0 - cover) * bg), 0, 255).astype(np.uint8)
        return Image.fromarray(rgb, "RGB")
    if isinstance(spec, PatternSpec):
        palette = np.array([table[spec.colour_a], table[spec.colour_b]], np.float64)
    else:
        palette = np.array([table[c] for c in SUBJECT_PALETTE], np.float64)
    return Image.fromarray(_downsample(_pattern_index(spec), palette), "RGB")


def random_shape(rng: np.random.Generator) -> ShapeSpec:
    """A uniformly drawn shape spec (shape, colour != background, position, size)."""
    names = list(COLOURS)
    colour, background = rng.choice(len(names), size=2, replace=False)
    radius = float(rng.uniform(*RADIUS_RANGE))
    lo, hi = radius + 2.0, SIZE - radius - 2.0
    return ShapeSpec(
        shape=SHAPES[int(rng.integers(len(SHAPES)))],
        colour=names[colour],
        background=names[background],
        cx=float(rng.uniform(lo, hi)),
        cy=float(rng.uniform(lo, hi)),
        radius=radius,
    )


def random_pattern(rng: np.random.Generator) -> PatternSpec:
    """A uniformly drawn two-colour pattern spec."""
    names = list(COLOURS)
    a, b = rng.choice(len(names), size=2, replace=False)
    kind = PATTERNS[int(rng.integers(len(PATTERNS)))]
    # periods keep every band / cell / dot at least ~5 px wide: the VAE sees the image at 1/8 scale
    low, high = {"striped": (16.0, 24.0), "checkered": (20.0, 28.0), "dotted": (16.0, 22.0)}[kind]
    period = float(rng.uniform(low, high))
    return PatternSpec(
        kind=kind,
        colour_a=names[a],
        colour_b=names[b],
        period=period,
        phase=float(rng.uniform()),
        vertical=bool(rng.integers(2)) if kind == "striped" else False,
    )


def random_subject(rng: np.random.Generator) -> SubjectSpec:
    """A drawn instance of the quickstart subject (same identity, varied band size and phase)."""
    return SubjectSpec(
        band=float(rng.uniform(13.0, 16.0)),
        period=float(rng.uniform(32.0, 40.0)),
        amplitude=float(rng.uniform(6.0, 9.0)),
        phase_x=float(rng.uniform()),
        phase_y=float(rng.uniform()),
    )


def sample_specs(seed: int, n: int, shape_fraction: float = SHAPE_FRACTION) -> list[Spec]:
    """n pre-training world specs (shapes and patterns), deterministic from `seed`."""
    rng = np.random.default_rng(seed)
    return [
        random_shape(rng) if rng.uniform() < shape_fraction else random_pattern(rng)
        for _ in range(n)
    ]


def sample_world(seed: int, n: int) -> list[tuple[Image.Image, str]]:
    """n (image, caption) pairs of the pre-training world, deterministic from `seed`."""
    return [(render(s), caption(s)) for s in sample_specs(seed, n)]


def sample_subject(seed: int, n: int) -> list[tuple[Image.Image, str]]:
    """n (image, "shs pattern") pairs of the quickstart subject, deterministic from `seed`."""
    rng = np.random.default_rng(seed)
    specs = [random_subject(rng) for _ in range(n)]
    return [(render(s), caption(s)) for s in specs]


def nearest_colour(pixels: np.ndarray, names: tuple[str, ...] | None = None) -> np.ndarray:
    """Index into `names` (default: all colours) of the nearest named colour per pixel.

    pixels: (..., 3) uint8 or float RGB in 0-255. Returns int array of shape (...).
    """
    names = tuple(ALL_COLOURS) if names is None else names
    table = np.array([ALL_COLOURS[n] for n in names], dtype=np.float32)
    flat = np.asarray(pixels, dtype=np.float32)[..., None, :]
    return np.argmin(((flat - table) ** 2).sum(axis=-1), axis=-1)


def colour_fractions(
    image: Image.Image | np.ndarray, mask: np.ndarray | None = None
) -> dict[str, float]:
    """Share of (masked) pixels nearest to each named colour, largest first.

    image: PIL image or (H, W, 3) RGB array; mask: optional bool (H, W) selecting the pixels.
    """
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    pixels = pixels.reshape(-1, 3) if mask is None else pixels[np.asarray(mask, dtype=bool)]
    names = tuple(ALL_COLOURS)
    if len(pixels) == 0:
        return {}
    counts = np.bincount(nearest_colour(pixels, names), minlength=len(names)) / len(pixels)
    order = np.argsort(-counts, kind="stable")
    return {names[i]: float(counts[i]) for i in order if counts[i] > 0}
