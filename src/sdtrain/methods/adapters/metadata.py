"""LoRA-file metadata: the reference's ss_* keys and sshs_* hashes (§7.6) around the modelspec.*
keys of the one modelspec builder (sdtrain.models.modelspec)."""

from __future__ import annotations

import datetime
import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sdtrain.models.modelspec import as_kind, base_modelspec, modelspec_metadata

if TYPE_CHECKING:
    import torch

    from sdtrain.config.methods import NetworkSection
    from sdtrain.methods.adapters.spec import LoraSpec
    from sdtrain.models.family import ModelFamily

CONFIG_KEY = "sdtrain_config"  # our resolved run config (TOML text)
# what `no_metadata` keeps of the ss_* keys (the reference's SS_METADATA_MINIMUM_KEYS)
MINIMUM_KEYS = (
    "ss_v2",
    "ss_base_model_version",
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
)


@dataclass
class TrainingFacts:
    """Facts of one run that end up in ss_* / modelspec.* metadata; the engine fills them.

    `datasets` holds one dict per dataset in the shape of the reference's `ss_datasets` entries:
    is_dreambooth, batch_size_per_device, num_train_images (with repeats), num_reg_images,
    resolution [w, h], enable_bucket, min_bucket_reso, max_bucket_reso, bucket_no_upscale,
    tag_frequency {dir: {tag: count}}, bucket_info {"buckets": {i: {"resolution": [w, h],
    "count": n}}, "mean_img_ar_error": x}, resize_interpolation, and "subsets": [{img_count,
    num_repeats, color_aug, flip_aug, random_crop, shuffle_caption, keep_tokens,
    keep_tokens_separator, secondary_separator, enable_wildcard, caption_prefix, caption_suffix,
    resize_interpolation, image_dir (basename) + class_tokens + is_reg, or metadata_file
    (basename)}]. `from_blueprint` False writes the reference's legacy (folder-mode) keys instead.
    """

    family: ModelFamily
    session_id: int
    training_started_at: float
    output_name: str | None = None
    # model
    sd_model_name: str | None = None
    sd_model_hash: str | None = None  # A1111 legacy 8-hex
    new_sd_model_hash: str | None = None  # sha256 of the file
    vae_name: str | None = None
    vae_hash: str | None = None
    new_vae_hash: str | None = None
    clip_skip: int | None = None
    max_token_length: int | None = None
    # optimisation
    learning_rate: float | None = None
    text_encoder_lr: float | None = None
    unet_lr: float | None = None
    optimizer: str | None = None  # "torch.optim.adamw.AdamW(weight_decay=0.01)"
    lr_scheduler: str | None = None
    lr_warmup_steps: int | float | None = None
    max_grad_norm: float | None = None
    gradient_checkpointing: bool = False
    gradient_accumulation_steps: int = 1
    max_train_steps: int | None = None
    num_epochs: int | None = None
    num_batches_per_epoch: int | None = None
    mixed_precision: str = "no"
    full_fp16: bool = False
    full_bf16: bool = False
    seed: int | None = None
    cache_latents: bool = False
    # noise / loss
    noise_offset: float | None = None
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float | None = None
    ip_noise_gamma: float | None = None
    ip_noise_gamma_random_strength: bool = False
    zero_terminal_snr: bool = False
    min_snr_gamma: float | None = None
    debiased_estimation: bool = False
    loss_type: str = "l2"
    huber_schedule: str | None = None
    huber_scale: float | None = None
    huber_c: float | None = None
    prior_loss_weight: float = 1.0
    min_timestep: int | None = None
    max_timestep: int | None = None
    # data
    num_train_images: int = 0
    num_reg_images: int = 0
    num_validation_images: int = 0
    validation_seed: int | None = None
    validation_split: float | None = None
    caption_dropout_rate: float | None = None
    caption_dropout_every_n_epochs: int | None = None
    caption_tag_dropout_rate: float | None = None
    face_crop_aug_range: tuple[float, float] | None = None
    resize_interpolation: str | None = None
    resolution: tuple[int, int] | None = None  # (w, h) of the run (modelspec.resolution)
    total_batch_size: int | None = None  # batch x processes x accumulation
    datasets: list[dict[str, Any]] = field(default_factory=list)
    from_blueprint: bool = True
    # modelspec (from [saving] metadata_*)
    title: str | None = None
    author: str | None = None
    description: str | None = None
    license: str | None = None
    tags: str | None = None
    trigger_phrase: str | None = None
    resolved_config: str | None = None  # TOML text of every effective value


def _s(value: Any) -> str:
    """The reference's str(value): None -> "None", True -> "True", (512, 512) -> "(512, 512)"."""
    return str(value)


def _dataset_keys(facts: TrainingFacts) -> dict[str, str]:
    """ss_datasets / ss_tag_frequency / ss_dataset_dirs, or the legacy folder-mode keys."""
    datasets = facts.datasets
    if not datasets:
        return {}
    if facts.from_blueprint:
        tag_frequency: dict[str, Any] = {}
        dirs: dict[str, Any] = {}
        for dataset in datasets:
            for subset in dataset.get("subsets", []):
                if subset.get("is_reg"):
                    continue
                name = subset.get("image_dir") or subset.get("metadata_file") or "?"
                key, n = name, 2
                while key in dirs:
                    key, n = f"{name} ({n})", n + 1
                dirs[key] = {
                    "n_repeats": subset.get("num_repeats"),
                    "img_count": subset.get("img_count"),
                }
            for folder, freq in dataset.get("tag_frequency", {}).items():
                tag_frequency.setdefault(folder, freq)  # a folder used twice counts once
        return {
            "ss_datasets": json.dumps(datasets),
            "ss_tag_frequency": json.dumps(tag_frequency),
            "ss_dataset_dirs": json.dumps(dirs),
        }
    dataset = datasets[0]
    subsets = dataset.get("subsets", [])
    first = subsets[0] if subsets else {}
    dirs, reg_dirs = {}, {}
    for subset in subsets:
        name = subset.get("image_dir") or subset.get("metadata_file") or "?"
        info = {"n_repeats": subset.get("num_repeats"), "img_count": subset.get("img_count")}
        (reg_dirs if subset.get("is_reg") else dirs)[name] = info
    resolution = dataset.get("resolution")
    return {
        "ss_batch_size_per_device": _s(dataset.get("batch_size_per_device")),
        "ss_total_batch_size": _s(facts.total_batch_size),
        "ss_resolution": _s(tuple(resolution) if resolution else facts.resolution),
        "ss_color_aug": _s(bool(first.get("color_aug"))),
        "ss_flip_aug": _s(bool(first.get("flip_aug"))),
        "ss_random_crop": _s(bool(first.get("random_crop"))),
        "ss_shuffle_caption": _s(bool(first.get("shuffle_caption"))),
        "ss_enable_bucket": _s(bool(dataset.get("enable_bucket"))),
        "ss_bucket_no_upscale": _s(bool(dataset.get("bucket_no_upscale"))),
        "ss_min_bucket_reso": _s(dataset.get("min_bucket_reso")),
        "ss_max_bucket_reso": _s(dataset.get("max_bucket_reso")),
        "ss_keep_tokens": _s(first.get("keep_tokens")),
        "ss_dataset_dirs": json.dumps(dirs),
        "ss_reg_dataset_dirs": json.dumps(reg_dirs),
        "ss_tag_frequency": json.dumps(dataset.get("tag_frequency", {})),
        "ss_bucket_info": json.dumps(dataset.get("bucket_info")),
    }


_PLAIN_KEYS = (
    "output_name",
    "sd_model_name",
    "sd_model_hash",
    "new_sd_model_hash",
    "vae_name",
    "vae_hash",
    "new_vae_hash",
    "clip_skip",
    "max_token_length",
    "learning_rate",
    "text_encoder_lr",
    "unet_lr",
    "optimizer",
    "lr_scheduler",
    "lr_warmup_steps",
    "max_grad_norm",
    "gradient_checkpointing",
    "gradient_accumulation_steps",
    "max_train_steps",
    "num_epochs",
    "num_batches_per_epoch",
    "mixed_precision",
    "full_fp16",
    "full_bf16",
    "seed",
    "cache_latents",
    "noise_offset",
    "noise_offset_random_strength",
    "adaptive_noise_scale",
    "multires_noise_iterations",
    "multires_noise_discount",
    "ip_noise_gamma",
    "ip_noise_gamma_random_strength",
    "zero_terminal_snr",
    "min_snr_gamma",
    "loss_type",
    "huber_schedule",
    "huber_scale",
    "huber_c",
    "prior_loss_weight",
    "num_train_images",
    "num_reg_images",
    "num_validation_images",
    "validation_seed",
    "validation_split",
    "caption_dropout_rate",
    "caption_dropout_every_n_epochs",
    "caption_tag_dropout_rate",
    "face_crop_aug_range",
    "resize_interpolation",
)


def training_metadata(
    facts: TrainingFacts, steps: int, epoch: int, now: float | None = None
) -> dict[str, str]:
    """ss_* keys of the run, modelspec.* keys of the base architecture and `sdtrain_config`.

    The engine puts this into SavePoint.metadata; methods add their own keys (lora_metadata).
    `now` (epoch seconds, default time.time()) is ss_training_finished_at and modelspec.date.
    """
    import time

    now = time.time() if now is None else now
    md: dict[str, str] = {
        "ss_session_id": _s(facts.session_id),
        "ss_training_started_at": _s(facts.training_started_at),
        "ss_training_finished_at": _s(now),
        "ss_steps": _s(steps),
        "ss_epoch": _s(epoch),
        "ss_v2": _s(facts.family.name == "sd2"),
        "ss_base_model_version": facts.family.base_model_version,
        "ss_debiased_estimation": _s(facts.debiased_estimation),
    }
    md.update({f"ss_{key}": _s(getattr(facts, key)) for key in _PLAIN_KEYS})
    md.update(_dataset_keys(facts))
    md.update(modelspec(facts, now))
    if facts.resolved_config is not None:
        md[CONFIG_KEY] = facts.resolved_config
    return md


def _date(now: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(int(now))


def modelspec(facts: TrainingFacts, now: float) -> dict[str, str]:
    """modelspec.* (sai_model_spec 1.0.1) for the base architecture; None values are left out."""
    timesteps = None
    if facts.min_timestep is not None or facts.max_timestep is not None:
        timesteps = (facts.min_timestep or 0, facts.max_timestep or 1000)
    return modelspec_metadata(
        facts.family,
        title=facts.title or facts.output_name,
        resolution=facts.resolution,
        clip_skip=facts.clip_skip,
        timestep_range=timesteps,
        date=_date(now),
        extra={
            "author": facts.author,
            "description": facts.description,
            "license": facts.license,
            "tags": facts.tags,
            "trigger_phrase": facts.trigger_phrase,
        },
        default_title=False,
    )


def lora_metadata(
    base: dict[str, str],
    network: NetworkSection,
    spec: LoraSpec,
    family: ModelFamily | None = None,
    now: float | None = None,
) -> dict[str, str]:
    """The complete metadata of a LoRA file (before hashes): base + ss_network_* + modelspec.

    `base` is what the engine put into SavePoint.metadata (training_metadata); keys it lacks
    are filled from `family` (ss_v2, ss_base_model_version, modelspec basics). With
    network.no_metadata only MINIMUM_KEYS, modelspec.* and the hashes remain (no dataset facts,
    no config).
    """
    import time

    now = time.time() if now is None else now
    md: dict[str, str] = {}
    if family is not None:
        md.update(base_modelspec(family, now))
        md["ss_v2"] = _s(family.name == "sd2")
        md["ss_base_model_version"] = family.base_model_version
    md.update(base)
    if spec.module_ranks:
        dims = {d for d, _ in spec.module_ranks.values()}
        alphas = {a for _, a in spec.module_ranks.values()}
        dim = _s(dims.pop()) if len(dims) == 1 else "Dynamic"
        alpha = _s(alphas.pop()) if len(alphas) == 1 else "Dynamic"
    else:
        dim, alpha = _s(spec.dim), _s(network.network_alpha)
    md.update(
        {
            "ss_network_module": network.network_module,
            "ss_network_dim": dim,
            "ss_network_alpha": alpha,
            "ss_network_dropout": _s(network.network_dropout),
            "ss_training_comment": _s(network.training_comment),
            "ss_scale_weight_norms": _s(network.scale_weight_norms),
        }
    )
    if spec.args:
        md["ss_network_args"] = json.dumps(spec.args)
    md = as_kind(md, "lora", "LoRA", now)
    if network.no_metadata:
        md = {k: v for k, v in md.items() if k in MINIMUM_KEYS or k.startswith("modelspec.")}
    return md


def with_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """metadata + sshs_model_hash / sshs_legacy_hash (sd-webui-additional-networks conventions).

    Both hash an in-memory safetensors serialisation holding only the ss_* metadata:
    model hash = sha256 of its tensor-data section; legacy = sha256 of 64 KiB at offset 1 MiB,
    first 8 hex digits.
    """
    from safetensors.torch import save

    blob = save(
        {k: v.contiguous() for k, v in tensors.items()},
        {k: v for k, v in metadata.items() if k.startswith("ss_")},
    )
    header = int.from_bytes(blob[:8], "little")
    out = dict(metadata)
    out["sshs_model_hash"] = hashlib.sha256(blob[8 + header :]).hexdigest()
    out["sshs_legacy_hash"] = hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    return out
