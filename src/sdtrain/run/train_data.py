"""The training dataset of a run: its latents cached by the VAE when asked, then the VAE freed."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sdtrain.run.train import Prepared

logger = logging.getLogger(__name__)


def training_data(
    prepared: Prepared, vae: Any, precision_vae: Any, processes: Any
) -> tuple[Any, dict[tuple[int, int, int, bool], str] | None]:
    """(TrainDataset over the plan, held-out index). With `cache_latents` the latents are cached
    (memory/disk) by `vae`, and so are the held-out validation images' (read without
    augmentation, so always cacheable): the index maps their (dataset, subset, image, flip), as
    engine/validation.py's `validation_plans` numbers them, to keys of the dataset's `store`, so
    that validation never needs the VAE that caching lets go. None without cached latents or a
    split."""
    from sdtrain.data.dataset import TrainDataset
    from sdtrain.engine.validation import validation_plans

    cfg = prepared.loaded.config
    t = cfg.training
    steps = prepared.plan.steps
    assert steps is not None
    store = index = held_out = None
    if t.cache_latents:
        import contextlib

        from sdtrain.data.latent_store import LatentStore, default_cache_dir
        from sdtrain.engine.latents import fill_store

        folder = (
            (Path(t.latent_cache_dir) if t.latent_cache_dir else default_cache_dir())
            if t.cache_latents_to_disk
            else None
        )
        store = LatentStore(folder)
        # a disk cache is written by the main process; the others then read it back
        order = processes.main_first() if folder is not None else contextlib.nullcontext()
        plans = validation_plans(prepared.plan.datasets)
        with order:
            report = fill_store(
                prepared.plan.datasets,
                vae,
                store,
                precision_vae,
                batch_size=t.vae_batch_size,
            )
            held = (
                fill_store(plans, vae, store, precision_vae, batch_size=t.vae_batch_size)
                if plans
                else None
            )
        logger.info("latents: %d encoded, %d reused from the cache", report.encoded, report.reused)
        index = report.index
        if held is not None:
            logger.info(
                "latents of the held-out images: %d encoded, %d reused", held.encoded, held.reused
            )
            held_out = held.index
    workers = 0 if t.cache_latents else min(t.max_data_loader_n_workers, os.cpu_count() or 1)
    asked = any(
        prepared.loaded.origin("training", key) != "default"
        for key in ("max_data_loader_n_workers", "persistent_data_loader_workers")
    )
    if (
        t.cache_latents
        and asked
        and (t.max_data_loader_n_workers or t.persistent_data_loader_workers)
    ):
        logger.info(
            "cache_latents: batches come from the latent cache in the main process, so "
            "max_data_loader_n_workers (%d) / persistent_data_loader_workers are not used",
            t.max_data_loader_n_workers,
        )
    data = TrainDataset(
        prepared.plan.datasets,
        prepared.seed,
        steps.total_steps,
        store,
        index,
        workers=workers,
        persistent_workers=t.persistent_data_loader_workers,
        num_processes=processes.count,
        process_index=processes.index,
    )
    data.steps = steps
    return data, held_out


def all_latents_cached(data: Any) -> bool:
    """True when every sample (and its flipped twin under flip_aug) has a cached latent."""
    for index, (plan, samples) in enumerate(zip(data.datasets, data.samples, strict=True)):
        for ref in samples:
            subset = plan.subsets[ref.subset]
            for flip in (False, True) if subset.params.get("flip_aug") else (False,):
                if (index, ref.subset, ref.image, flip) not in data.latent_keys:
                    return False
    return True


def free_vae(vae: Any, data: Any, needed: bool, main: bool, folder: Path) -> None:
    """Free the VAE's memory once every latent is cached: release it when nothing needs it again
    (no samples, an export without it, or a process that neither saves nor samples), else park
    it on disk until a save or a sampling event (models/park.py)."""
    if not all_latents_cached(data):
        return
    from sdtrain.models.release import release_weights

    if not needed:
        release_weights(vae, "the VAE", "every latent is cached and no samples are drawn")
    elif not main:
        release_weights(vae, "the VAE", "only the main process saves and samples")
    else:
        from sdtrain.models.park import park_weights

        park_weights(vae, folder, "the VAE")
