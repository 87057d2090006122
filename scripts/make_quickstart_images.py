"""Write the quickstart subject images (configs/examples/quickstart/images) from the toy world.

    python scripts/make_quickstart_images.py [--out configs/examples/quickstart/images]

Eight 64 px images of the "shs pattern" subject (sdtrain.data.toyworld, QUICKSTART_SEED), each
with a `.txt` caption file: the image-folder layout the quickstart config trains a LoRA on.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from sdtrain.atomic import write_bytes, write_text
from sdtrain.data.toyworld import QUICKSTART_COUNT, QUICKSTART_SEED, sample_subject

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "configs/examples/quickstart/images"


def write_images(out: Path) -> list[Path]:
    """Write shs_<i>.png + shs_<i>.txt into `out`; returns the image paths."""
    paths = []
    for i, (image, caption) in enumerate(sample_subject(QUICKSTART_SEED, QUICKSTART_COUNT)):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=True)
        path = out / f"shs_{i}.png"
        write_bytes(path, buffer.getvalue())
        write_text(path.with_suffix(".txt"), caption + "\n")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    write_images(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
