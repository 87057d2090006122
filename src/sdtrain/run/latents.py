"""`sdtrain latents cache`: plan the data, load the VAE, fill the content-addressed latent store.

The store is the one training reads with cache_latents_to_disk = true (same key: image bytes,
resize/crop/flip, bucket, VAE weights, dtype), so a later `train` run does no VAE work for these
images. [bug fixed] The reference's prepare_buckets_latents.py writes nothing (its save call is
commented out, §11.5); this command writes every entry, atomically.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sdtrain.config.loader import LoadedConfig
from sdtrain.errors import DataError

if TYPE_CHECKING:
    import torch

    from sdtrain.config.sections import ModelSection
    from sdtrain.engine.latents import CacheReport

logger = logging.getLogger(__name__)


@dataclass
class LatentsOutcome:
    """What `latents cache` did: the folder, the pass report, where and in which dtype."""

    folder: Path
    report: CacheReport
    device: str
    dtype: str  # "float32" | "bfloat16" | "float16"
    verify_only: bool
    training_reads_it: bool  # the config already trains from this disk cache


def cache_folder(latent_cache_dir: str | None) -> Path:
    """[training] latent_cache_dir, or the default cache folder."""
    from sdtrain.data.latent_store import default_cache_dir

    return Path(latent_cache_dir) if latent_cache_dir else default_cache_dir()


def load_vae(section: ModelSection, device: torch.device) -> torch.nn.Module:
    """Only the VAE of [model] on `device` (float32, eval mode; the cache pass casts it).

    The bundle is loaded on the CPU and everything but the VAE is dropped, so UNet and text
    encoder never take GPU memory. [model] vae and attention are honoured as in training.
    """
    import torch

    from sdtrain.models.attention import apply_attention
    from sdtrain.models.load import load_bundle

    bundle = load_bundle(section.model_copy(update={"attention": "sdpa"}), device="cpu")
    vae = bundle.vae
    del bundle
    torch.nn.Module.to(vae, device)
    apply_attention([vae], section.attention, device)
    vae.requires_grad_(False)
    return vae


def cache_latents(loaded: LoadedConfig, verify_only: bool = False) -> LatentsOutcome:
    """Pre-encode every latent the run's datasets need (each image, and its flipped twin with
    flip_aug) at the plan's bucket and crop, into the disk store; or, with `verify_only`, only
    report missing and stale entries. Uses the GPU when there is one; the VAE dtype follows
    [training] mixed_precision and [model] no_half_vae exactly as training does."""
    from sdtrain.import_gc import quiet_gc

    with quiet_gc():  # import_gc.py
        import torch

    from sdtrain.data.latent_store import LatentStore
    from sdtrain.data.plan import plan_for_run
    from sdtrain.engine.latents import fill_store, require_cacheable
    from sdtrain.engine.precision import precision_for

    cfg = loaded.config
    t = cfg.training
    from sdtrain.methods.registry import plan_support

    plan = plan_for_run(loaded, support=plan_support(loaded.config))
    if plan.steps is None:
        raise DataError(
            "No data found: the datasets contain no usable images",
            hint="check image_dir / train_data_dir and num_repeats; "
            "`sdtrain dataset plan` shows what was found",
        )
    require_cacheable(plan.datasets)
    with quiet_gc():  # the model stack's imports in one block, after the plan's checks
        from sdtrain.models.load import import_model_stack

        import_model_stack()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = precision_for(t, cfg.model.no_half_vae, device.type)
    folder = cache_folder(t.latent_cache_dir)
    vae = load_vae(cfg.model, device)  # --verify needs it too: the VAE weights are in the key
    workers = min(t.max_data_loader_n_workers, os.cpu_count() or 1)
    store = LatentStore(folder, keep_in_memory=False)
    report = fill_store(
        plan.datasets,
        vae,
        store,
        precision.vae,
        batch_size=t.vae_batch_size,
        verify_only=verify_only,
        workers=workers,
    )
    return LatentsOutcome(
        folder=folder,
        report=report,
        device=device.type,
        dtype=str(precision.vae).removeprefix("torch."),
        verify_only=verify_only,
        training_reads_it=t.cache_latents_to_disk,
    )
