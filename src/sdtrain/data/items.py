"""Plain records shared by the dataset layer: one image entry of the plan, one subset, one dataset."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

Size = tuple[int, int]  # (width, height), as everywhere in the reference toolkit
Box = tuple[int, int, int, int]  # (left, top, right, bottom)


@dataclass
class ImageEntry:
    """One image as training will see it. Sizes are (W, H)."""

    path: Path
    caption: str  # as stored (possibly multi-line), before per-step processing
    is_reg: bool
    num_repeats: int  # after reg balancing; 0 = unused reg image
    original_size: Size  # after EXIF orientation
    bucket: Size = (0, 0)
    resized_size: Size = (0, 0)
    crop_ltrb: Box = (0, 0, 0, 0)  # SDXL-style fit box of the original inside the bucket
    subset_index: int = 0
    has_caption_file: bool = True
    exif_transpose: bool = False  # the file carries an EXIF rotation that loading applies


@dataclass
class InvalidImage:
    """An image that cannot be used, and why."""

    path: Path
    reason: str


@dataclass
class SubsetPlan:
    """A resolved subset: its effective keys (with origins) and its images."""

    index: int
    image_dir: Path | None
    metadata_file: Path | None
    is_reg: bool
    num_repeats: int
    params: dict[str, object]  # effective subset keys after the resolution chain
    origins: dict[str, str]  # key -> where its value came from
    images: list[ImageEntry] = field(default_factory=list)
    missing_captions: int = 0


@dataclass
class DatasetPlan:
    """One dataset of the blueprint, fully resolved."""

    index: int
    kind: str  # "dreambooth" | "finetune"
    params: dict[str, object]  # effective dataset keys (resolution, batch_size, buckets, ...)
    origins: dict[str, str]
    subsets: list[SubsetPlan] = field(default_factory=list)
    invalid: list[InvalidImage] = field(default_factory=list)
