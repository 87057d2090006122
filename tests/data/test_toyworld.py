"""The toy world: deterministic from the seed, and every caption says what the pixels show."""

from __future__ import annotations

import numpy as np
import pytest

from sdtrain.data import toyworld as tw


def _parse_shape_caption(caption: str) -> tuple[str, str, str]:
    """ "a red circle on a blue background" -> ("red", "circle", "blue")."""
    words = caption.split()
    assert words[0] in ("a", "an") and words[3] == "on" and words[-1] == "background", caption
    return words[1], words[2], words[-2]


def _fill_ratio(mask: np.ndarray) -> float:
    ys, xs = np.nonzero(mask)
    return float(mask.sum() / ((np.ptp(xs) + 1) * (np.ptp(ys) + 1)))


# Share of its bounding box each shape's pixels cover. Measured over 1,476 rendered shapes:
# square 0.993-1.0, circle 0.748-0.837, triangle 0.498-0.575, star 0.383-0.465.
SHAPE_FILL = {
    "square": (0.97, 1.0),
    "circle": (0.72, 0.86),
    "triangle": (0.48, 0.6),
    "star": (0.36, 0.48),
}


def test_same_seed_same_world_other_seed_differs():
    first = tw.sample_world(7, 12)
    again = tw.sample_world(7, 12)
    other = tw.sample_world(8, 12)
    assert [c for _, c in first] == [c for _, c in again]
    assert all(a.tobytes() == b.tobytes() for (a, _), (b, _) in zip(first, again, strict=True))
    assert [c for _, c in first] != [c for _, c in other]
    assert all(image.size == (64, 64) and image.mode == "RGB" for image, _ in first)


def test_subject_is_deterministic_and_captioned():
    first = tw.sample_subject(3, 4)
    again = tw.sample_subject(3, 4)
    assert all(a.tobytes() == b.tobytes() for (a, _), (b, _) in zip(first, again, strict=True))
    assert {c for _, c in first} == {"shs pattern"}
    assert first[0][0].tobytes() != first[1][0].tobytes()


def test_shape_captions_match_the_pixels():
    specs = [s for s in tw.sample_specs(11, 120) if isinstance(s, tw.ShapeSpec)]
    assert {s.shape for s in specs} == set(tw.SHAPES)
    for spec in specs:
        colour, shape, background = _parse_shape_caption(tw.caption(spec))
        image = tw.render(spec)
        fractions = tw.colour_fractions(image)
        assert next(iter(fractions)) == background, (tw.caption(spec), fractions)
        names = tuple(tw.ALL_COLOURS)
        labels = tw.nearest_colour(np.asarray(image), names)
        foreground = labels == names.index(colour)
        # the shape's own colour covers at least a (11 px radius) star's worth of pixels
        assert foreground.sum() > 100, tw.caption(spec)
        low, high = SHAPE_FILL[shape]
        assert low <= _fill_ratio(foreground) <= high, (tw.caption(spec), _fill_ratio(foreground))
        # the pixels of neither colour are only anti-aliased edge pixels
        other = ~foreground & (labels != names.index(background))
        assert other.mean() < 0.03, tw.caption(spec)


@pytest.mark.parametrize("kind", tw.PATTERNS)
def test_pattern_captions_match_the_pixels(kind):
    rng = np.random.default_rng(5)
    specs = []
    while len(specs) < 8:
        spec = tw.random_pattern(rng)
        if spec.kind == kind:
            specs.append(spec)
    for spec in specs:
        words = tw.caption(spec).split()
        assert words[-2:] == [kind, "pattern"]
        a, b = words[1], words[3]
        fractions = tw.colour_fractions(tw.render(spec))
        share_a, share_b = fractions.get(a, 0.0), fractions.get(b, 0.0)
        # anti-aliased edges between the two colours may come out nearest to a third colour
        assert set(list(fractions)[:2]) == {a, b}, (tw.caption(spec), fractions)
        assert share_a + share_b > 0.8, (tw.caption(spec), fractions)
        # stripes and checks split evenly; dots (radius 0.3 period) cover ~28% of the image
        expected_a = 0.28 if kind == "dotted" else 0.5
        assert abs(share_a / (share_a + share_b) - expected_a) < 0.12, (tw.caption(spec), fractions)


def test_subject_uses_its_palette_and_the_world_does_not():
    for image, _ in tw.sample_subject(0, 8):
        fractions = tw.colour_fractions(image)
        assert all(0.2 < fractions.get(c, 0.0) < 0.47 for c in tw.SUBJECT_PALETTE), fractions
    specs = tw.sample_specs(0, 200)
    used = {
        getattr(s, f, None) for s in specs for f in ("colour", "background", "colour_a", "colour_b")
    }
    assert used - {None} == set(tw.COLOURS)
    new_colours = [
        sum(tw.colour_fractions(tw.render(s)).get(c, 0.0) for c in tw.SUBJECT_COLOURS)
        for s in specs
    ]
    # only blended edge pixels (e.g. red over white) can come out nearest to pink or cyan
    assert np.mean(new_colours) < 0.01


def test_world_mixes_shapes_and_patterns_with_distinct_colours():
    specs = tw.sample_specs(1, 400)
    shapes = [s for s in specs if isinstance(s, tw.ShapeSpec)]
    assert 0.65 < len(shapes) / len(specs) < 0.85
    assert all(s.colour != s.background for s in shapes)
    assert all(s.colour_a != s.colour_b for s in specs if isinstance(s, tw.PatternSpec))
    assert {s.colour for s in shapes} == set(tw.COLOURS)
    assert all(s.radius + 1 <= s.cx <= 63 - s.radius for s in shapes)


def test_nearest_colour_names_the_palette_exactly():
    names = tuple(tw.ALL_COLOURS)
    pixels = np.array([tw.ALL_COLOURS[n] for n in names], dtype=np.uint8)
    assert list(tw.nearest_colour(pixels)) == list(range(len(names)))


def test_unknown_shape_raises():
    spec = tw.ShapeSpec("hexagon", "red", "blue", 32.0, 32.0, 12.0)
    with pytest.raises(ValueError, match="valid: square"):
        tw.render(spec)


def test_shipped_quickstart_images_are_the_seeded_subject():
    from pathlib import Path

    from PIL import Image

    folder = Path(__file__).resolve().parents[2] / "configs/examples/quickstart/images"
    expected = tw.sample_subject(tw.QUICKSTART_SEED, tw.QUICKSTART_COUNT)
    assert len(list(folder.glob("*.png"))) == len(expected)
    for i, (image, caption) in enumerate(expected):
        with Image.open(folder / f"shs_{i}.png") as shipped:
            assert shipped.convert("RGB").tobytes() == image.tobytes()
        assert (folder / f"shs_{i}.txt").read_text().strip() == caption
