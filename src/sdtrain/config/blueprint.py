"""Schema of the reference dataset blueprint: [general], [[datasets]], [[datasets.subsets]].

The key families and their levels follow the reference toolkit exactly for SD1/SD2 (S, DO, DBA, DBD,
FTD, D; the ControlNet/mask families are not part of sdtrain). Every key is optional at its level
(unset = None) so the resolution chain can tell "not written" from a value, like the reference's
first-non-None rule. Differences from the reference, on purpose: `0` is accepted where a float is
expected, a dataset with zero subsets is an error (the reference silently classifies it as a
ControlNet dataset), and values are range-checked (`caption_dropout_rate` in [0, 1], positive bucket
sizes, two-element ranges).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, field_validator

from sdtrain.config.base import Section

Interpolation = Literal[
    "lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box"
]
Kind = Literal["dreambooth", "finetune"]


def check_resolution(value: Any) -> Any:
    """`N` or `[W, H]` with positive whole numbers (the reference stores it as (W, H))."""
    if value is None:
        return value
    if isinstance(value, bool) or not isinstance(value, int | list):
        raise ValueError("expected a whole number N or an array [width, height]")
    items = value if isinstance(value, list) else [value]
    if isinstance(value, list) and len(value) != 2:
        raise ValueError("expected a whole number N or an array [width, height] of two numbers")
    if any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in items):
        raise ValueError("resolution sides must be positive whole numbers")
    return value


def check_range(value: Any) -> Any:
    """`[lo, hi]`: exactly two numbers with lo <= hi (face_crop_aug_range)."""
    if value is None:
        return value
    if not isinstance(value, list) or len(value) != 2:
        raise ValueError("expected an array of two numbers [low, high]")
    if any(isinstance(v, bool) or not isinstance(v, int | float) for v in value):
        raise ValueError("expected an array of two numbers [low, high]")
    if value[0] > value[1]:
        raise ValueError("the first number must not be larger than the second")
    return [float(v) for v in value]


class SubsetKeys(Section):
    """Family S + DO: subset keys that may also be written at dataset or [general] level."""

    num_repeats: int | None = Field(
        None, description="times each image is seen per epoch (< 1 skips)"
    )
    shuffle_caption: bool | None = Field(None, description="shuffle separator-split caption tags")
    caption_separator: str | None = Field(None, description='tag separator (default ",")')
    keep_tokens: int | None = Field(None, ge=0, description="leading tags kept in place")
    keep_tokens_separator: str | None = Field(
        None, description="marks the fixed head/tail of a caption"
    )
    secondary_separator: str | None = Field(None, description="grouped-tag separator")
    enable_wildcard: bool | None = Field(
        None, description="{a|b} wildcards and random caption lines"
    )
    caption_prefix: str | None = Field(None, description="text put before every caption")
    caption_suffix: str | None = Field(None, description="text put after every caption")
    color_aug: bool | None = Field(None, description="weak hue/gamma augmentation")
    flip_aug: bool | None = Field(None, description="random horizontal flips")
    face_crop_aug_range: list[float] | None = Field(
        None, description="face-crop scale range [lo, hi]"
    )
    random_crop: bool | None = Field(None, description="random instead of centre crop")
    token_warmup_min: int | None = Field(None, ge=0, description="tag-count warm-up start")
    token_warmup_step: float | None = Field(
        None, ge=0, description="step (or fraction) ending warm-up"
    )
    custom_attributes: dict[str, Any] | None = Field(None, description="free-form attributes")
    resize_interpolation: Interpolation | None = Field(None, description="resize filter")
    # DO: caption dropout (not for Textual Inversion)
    caption_dropout_rate: float | None = Field(
        None, ge=0.0, le=1.0, description="whole-caption dropout"
    )
    caption_dropout_every_n_epochs: int | None = Field(
        None, ge=0, description="drop all every N epochs"
    )
    caption_tag_dropout_rate: float | None = Field(
        None, ge=0.0, le=1.0, description="per-tag dropout"
    )

    @field_validator("face_crop_aug_range", mode="before")
    @classmethod
    def _range(cls, value: Any) -> Any:
        return check_range(value)


class DreamBoothKeys(Section):
    """Family DBA: DreamBooth keys that may be written at subset, dataset or [general] level."""

    caption_extension: str | None = Field(
        None, description="caption file suffix (default .caption)"
    )
    class_tokens: str | None = Field(None, description="caption of images without a caption file")
    cache_info: bool | None = Field(None, description="keep sizes/captions in metadata_cache.json")


class DatasetKeys(Section):
    """Family D: dataset keys (written in [[datasets]] or [general])."""

    resolution: int | list[int] | None = Field(None, description="training resolution: N or [W, H]")
    batch_size: int | None = Field(None, ge=1, description="images per batch")
    enable_bucket: bool | None = Field(None, description="aspect-ratio bucketing")
    min_bucket_reso: int | None = Field(None, ge=1, description="smallest bucket side")
    max_bucket_reso: int | None = Field(None, ge=1, description="largest bucket side")
    bucket_reso_steps: int | None = Field(None, ge=1, description="bucket side granularity")
    bucket_no_upscale: bool | None = Field(None, description="per-image buckets, never enlarging")
    network_multiplier: float | None = Field(None, description="LoRA multiplier for this dataset")
    validation_seed: int | None = Field(None, description="seed of the validation split")
    validation_split: float | None = Field(None, ge=0.0, le=1.0, description="held-out fraction")
    resize_interpolation: Interpolation | None = Field(None, description="resize filter")

    @field_validator("resolution", mode="before")
    @classmethod
    def _resolution(cls, value: Any) -> Any:
        return check_resolution(value)


class DreamBoothSubset(SubsetKeys, DreamBoothKeys):
    """A [[datasets.subsets]] table of a DreamBooth dataset (DBD: image_dir required)."""

    image_dir: str = Field(description="folder of the images (relative to the blueprint file)")
    is_reg: bool | None = Field(None, description="regularization (class) images")
    alpha_mask: bool | None = Field(None, description="use the alpha channel as a loss mask")


class FineTuneSubset(SubsetKeys):
    """A [[datasets.subsets]] table of a fine-tune dataset (FTD: metadata_file required)."""

    metadata_file: str = Field(description="metadata .json/.jsonl (relative to the blueprint file)")
    image_dir: str | None = Field(None, description="folder that relative metadata keys refer to")
    alpha_mask: bool | None = Field(None, description="use the alpha channel as a loss mask")


class DreamBoothDataset(DatasetKeys, SubsetKeys, DreamBoothKeys):
    """A [[datasets]] table whose subsets all lack metadata_file."""

    subsets: list[DreamBoothSubset] = Field(default_factory=list)


class FineTuneDataset(DatasetKeys, SubsetKeys):
    """A [[datasets]] table whose subsets all have metadata_file."""

    subsets: list[FineTuneSubset] = Field(default_factory=list)


class GeneralTable(DatasetKeys, SubsetKeys, DreamBoothKeys):
    """The [general] table: defaults for every dataset and subset."""


SUBSET_MODELS: dict[str, type[Section]] = {
    "dreambooth": DreamBoothSubset,
    "finetune": FineTuneSubset,
}
DATASET_MODELS: dict[str, type[Section]] = {
    "dreambooth": DreamBoothDataset,
    "finetune": FineTuneDataset,
}

SUBSET_ONLY = frozenset({"image_dir", "is_reg", "alpha_mask", "metadata_file"})
DREAMBOOTH_ONLY = frozenset(DreamBoothKeys.model_fields) | {"is_reg"}
DROPOUT_KEYS = frozenset(
    {"caption_dropout_rate", "caption_dropout_every_n_epochs", "caption_tag_dropout_rate"}
)
DATASET_KEYS = tuple(DatasetKeys.model_fields)


@dataclass(frozen=True)
class Support:
    """Which dataset kinds a command can train (the reference sanitizer's support flags)."""

    dreambooth: bool = True
    finetune: bool = True
    dropout: bool = True
    title: str = "sdtrain dataset plan"


# Commands name their Support in sdtrain.methods.registry (reference: train_network / train_db /
# fine_tune / TI) and config.run.PLAN_COMMAND; this one accepts every kind.
ANY_KIND = Support(True, True, True, "sdtrain dataset plan")

# Built-in defaults: the end of the resolution chain (reference dataclass defaults, with the
# tuple-default bug of caption_separator / keep_tokens_separator fixed to the values users get).
SUBSET_DEFAULTS: dict[str, Any] = {
    "num_repeats": 1,
    "shuffle_caption": False,
    "caption_separator": ",",
    "keep_tokens": 0,
    "keep_tokens_separator": "",
    "secondary_separator": None,
    "enable_wildcard": False,
    "caption_prefix": None,
    "caption_suffix": None,
    "color_aug": False,
    "flip_aug": False,
    "face_crop_aug_range": None,
    "random_crop": False,
    "token_warmup_min": 1,
    "token_warmup_step": 0,
    "custom_attributes": {},
    "resize_interpolation": None,
    "caption_dropout_rate": 0.0,
    "caption_dropout_every_n_epochs": 0,
    "caption_tag_dropout_rate": 0.0,
    "caption_extension": ".caption",
    "class_tokens": None,
    "cache_info": False,
    "image_dir": None,
    "metadata_file": None,
    "is_reg": False,
    "alpha_mask": False,
}
DATASET_DEFAULTS: dict[str, Any] = {
    "resolution": None,
    "batch_size": 1,
    "enable_bucket": False,
    "min_bucket_reso": 256,
    "max_bucket_reso": 1024,
    "bucket_reso_steps": 64,
    "bucket_no_upscale": False,
    "network_multiplier": 1.0,
    "validation_seed": None,
    "validation_split": 0.0,
    "resize_interpolation": None,
}
