"""Plain records of the dataset layer: one image entry of the plan, one subset, one dataset."""

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
    ar_error: float = 0.0  # bucket aspect - image aspect (reference mean_img_ar_error input)


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
    label: str = ""  # "datasets[0].subsets[1]"
    tag_frequency_key: str = ""  # image folder name (DreamBooth) or metadata file name
    tag_frequency: dict[str, int] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        """Samples per epoch from this subset (images x repeats, after reg balancing)."""
        return sum(image.num_repeats for image in self.images)


@dataclass
class BucketStat:
    """One bucket of a dataset: its resolution, samples per epoch (with repeats), batches."""

    resolution: Size
    samples: int
    batches: int


@dataclass
class DatasetPlan:
    """One dataset of the blueprint, fully resolved."""

    index: int
    kind: str  # "dreambooth" | "finetune"
    params: dict[str, object]  # effective dataset keys (resolution, batch_size, buckets, ...)
    origins: dict[str, str]
    subsets: list[SubsetPlan] = field(default_factory=list)
    invalid: list[InvalidImage] = field(default_factory=list)
    bucket_resolutions: list[Size] = field(default_factory=list)  # predefined; [] = no_upscale
    buckets: list[BucketStat] = field(default_factory=list)  # used buckets, sorted
    skipped: list[str] = field(default_factory=list)  # why subsets were left out
    warnings: list[str] = field(default_factory=list)
    num_reg_images_requested: int = 0  # reg samples before balancing (reference "num reg images")
    # held-out images (validation_split): one SubsetPlan per training subset they came from
    validation: list[SubsetPlan] = field(default_factory=list)
    validation_seed: int | None = None  # the seed the split was drawn with

    @property
    def num_validation_images(self) -> int:
        """Images held out for the validation loss (they never train)."""
        return sum(len(s.images) for s in self.validation)

    @property
    def batch_size(self) -> int:
        return int(self.params["batch_size"])  # type: ignore[call-overload]

    @property
    def num_train_images(self) -> int:
        """Training samples per epoch (images x repeats)."""
        return sum(s.num_samples for s in self.subsets if not s.is_reg)

    @property
    def num_reg_images(self) -> int:
        """Regularization samples per epoch, after balancing."""
        return sum(s.num_samples for s in self.subsets if s.is_reg)

    @property
    def batches(self) -> int:
        """Batches per epoch of this dataset: sum over buckets of ceil(samples / batch_size)."""
        return sum(b.batches for b in self.buckets)
