"""Collect the facts of a run that go into model metadata (ss_*, modelspec.*)."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sdtrain.config.run import RunConfig
    from sdtrain.data.plan import Plan
    from sdtrain.methods.adapters.metadata import TrainingFacts
    from sdtrain.models.bundle import ModelBundle


def _dataset_entry(dataset: Any) -> dict[str, Any]:
    params = dataset.params
    subsets = []
    for subset in dataset.subsets:
        p = subset.params
        entry = {
            "img_count": len(subset.images),
            "num_repeats": subset.num_repeats,
            "color_aug": bool(p.get("color_aug")),
            "flip_aug": bool(p.get("flip_aug")),
            "random_crop": bool(p.get("random_crop")),
            "shuffle_caption": bool(p.get("shuffle_caption")),
            "keep_tokens": p.get("keep_tokens"),
            "keep_tokens_separator": p.get("keep_tokens_separator"),
            "secondary_separator": p.get("secondary_separator"),
            "enable_wildcard": bool(p.get("enable_wildcard")),
            "caption_prefix": p.get("caption_prefix"),
            "caption_suffix": p.get("caption_suffix"),
            "resize_interpolation": p.get("resize_interpolation"),
        }
        if dataset.kind == "dreambooth":
            entry.update(
                image_dir=Path(str(subset.image_dir)).name if subset.image_dir else None,
                class_tokens=p.get("class_tokens"),
                is_reg=subset.is_reg,
            )
        else:
            entry.update(
                metadata_file=Path(str(subset.metadata_file)).name if subset.metadata_file else None
            )
        subsets.append(entry)
    tag_frequency = {s.tag_frequency_key: s.tag_frequency for s in dataset.subsets}
    bucket_info = {
        "buckets": {
            i: {"resolution": list(b.resolution), "count": b.samples}
            for i, b in enumerate(dataset.buckets)
        },
        "mean_img_ar_error": _mean_ar(dataset),
    }
    return {
        "is_dreambooth": dataset.kind == "dreambooth",
        "batch_size_per_device": dataset.batch_size,
        "num_train_images": dataset.num_train_images,
        "num_reg_images": dataset.num_reg_images,
        "resolution": list(params.get("resolution") or ()),
        "enable_bucket": bool(params.get("enable_bucket")),
        "min_bucket_reso": params.get("min_bucket_reso"),
        "max_bucket_reso": params.get("max_bucket_reso"),
        "bucket_no_upscale": bool(params.get("bucket_no_upscale")),
        "tag_frequency": tag_frequency,
        "bucket_info": bucket_info,
        "resize_interpolation": params.get("resize_interpolation"),
        "subsets": subsets,
    }


def _mean_ar(dataset: Any) -> float:
    errors = [abs(i.ar_error) for s in dataset.subsets for i in s.images]
    return sum(errors) / len(errors) if errors else 0.0


def collect_facts(
    config: RunConfig,
    plan: Plan,
    bundle: ModelBundle,
    optimizer_text: str,
    resolved_toml: str,
    from_blueprint: bool,
) -> TrainingFacts:
    """TrainingFacts for the metadata writers, from the validated config, plan and model."""
    from sdtrain.methods.adapters.metadata import TrainingFacts
    from sdtrain.models.hashes import file_sha256, legacy_hash

    t, o, m, s = config.training, config.optimizer, config.model, config.saving
    steps = plan.steps
    assert steps is not None
    source = bundle.source
    model_name = source.spec
    if not config.saving.metadata_full_paths and os.path.isabs(str(model_name)):
        model_name = os.path.basename(str(model_name).rstrip("/"))
    model_hash = new_hash = None
    if source.kind == "single_file" and source.path and os.path.isfile(source.path):
        model_name = os.path.basename(source.path)
        new_hash = file_sha256(source.path)
        model_hash = legacy_hash(source.path)
    first = plan.datasets[0] if plan.datasets else None
    resolution = tuple(first.params["resolution"]) if first else None  # type: ignore[index]
    return TrainingFacts(
        family=bundle.family,
        session_id=random.SystemRandom().randint(0, 2**32 - 1),
        training_started_at=time.time(),
        output_name=t.output_name,
        sd_model_name=model_name,
        sd_model_hash=model_hash,
        new_sd_model_hash=new_hash,
        vae_name=os.path.basename(m.vae) if m.vae else None,
        clip_skip=m.clip_skip,
        max_token_length=m.max_token_length,
        learning_rate=o.learning_rate,
        text_encoder_lr=o.text_encoder_lr,
        unet_lr=o.unet_lr,
        optimizer=optimizer_text,
        lr_scheduler=o.lr_scheduler,
        lr_warmup_steps=o.lr_warmup_steps,
        max_grad_norm=t.max_grad_norm,
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        max_train_steps=steps.total_steps,
        num_epochs=steps.num_epochs,
        num_batches_per_epoch=steps.batches_per_epoch,
        mixed_precision=t.mixed_precision,
        full_fp16=t.full_fp16,
        full_bf16=t.full_bf16,
        seed=t.seed,
        cache_latents=t.cache_latents,
        noise_offset=t.noise_offset,
        noise_offset_random_strength=t.noise_offset_random_strength,
        adaptive_noise_scale=t.adaptive_noise_scale,
        multires_noise_iterations=t.multires_noise_iterations,
        multires_noise_discount=t.multires_noise_discount,
        ip_noise_gamma=t.ip_noise_gamma,
        ip_noise_gamma_random_strength=t.ip_noise_gamma_random_strength,
        zero_terminal_snr=t.zero_terminal_snr,
        min_snr_gamma=t.min_snr_gamma,
        debiased_estimation=t.debiased_estimation_loss,
        loss_type=t.loss_type,
        huber_schedule=t.huber_schedule,
        huber_scale=t.huber_scale,
        huber_c=t.huber_c,
        prior_loss_weight=t.prior_loss_weight,
        min_timestep=t.min_timestep,
        max_timestep=t.max_timestep,
        num_train_images=sum(d.num_train_images for d in plan.datasets),
        num_reg_images=sum(d.num_reg_images for d in plan.datasets),
        num_validation_images=sum(d.num_validation_images for d in plan.datasets),
        validation_seed=next((d.validation_seed for d in plan.datasets if d.validation), None),
        validation_split=next(
            (float(d.params["validation_split"]) for d in plan.datasets if d.validation), None
        ),
        caption_dropout_rate=config.dataset.caption_dropout_rate,
        caption_dropout_every_n_epochs=config.dataset.caption_dropout_every_n_epochs,
        caption_tag_dropout_rate=config.dataset.caption_tag_dropout_rate,
        resize_interpolation=config.dataset.resize_interpolation,
        resolution=resolution,  # type: ignore[arg-type]
        total_batch_size=(first.batch_size if first else 1) * t.gradient_accumulation_steps,
        datasets=[_dataset_entry(d) for d in plan.datasets],
        from_blueprint=from_blueprint,
        title=s.metadata_title,
        author=s.metadata_author,
        description=s.metadata_description,
        license=s.metadata_license,
        tags=s.metadata_tags,
        trigger_phrase=s.metadata_trigger_phrase,
        resolved_config=resolved_toml,
    )
