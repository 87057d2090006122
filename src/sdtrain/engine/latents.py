"""Fill the content-addressed latent store: the VAE work that `cache_latents` and
`sdtrain latents cache` share. Entries already present (and valid) are never re-encoded."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdtrain.data.dataset import transform_spec
from sdtrain.data.items import DatasetPlan, ImageEntry
from sdtrain.data.latent_store import LatentRecipe, LatentStore, file_digest, latent_key
from sdtrain.engine.background import BackgroundWriter, ordered_map
from sdtrain.errors import ConfigError, DataError, Problem

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

LatentIndex = dict[tuple[int, int, int, bool], str]


def vae_identity(vae: torch.nn.Module, dtype: torch.dtype | None = None) -> str:
    """A hash of the VAE's weights: a different VAE never shares cache entries.

    With `dtype`, floating tensors are hashed as cast to it (what `module.to(dtype)` would hold),
    so the identity is that of the weights that actually encode, wherever the VAE was loaded.
    """
    import torch

    digest = hashlib.blake2b(digest_size=20)
    for name, tensor in sorted(vae.state_dict().items()):
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        flat = tensor.detach().to("cpu").contiguous().view(-1)
        digest.update(flat.view(torch.uint8).numpy())  # the buffer itself: no 335 MB copy
    return digest.hexdigest()


def uncacheable_subsets(datasets: list[DatasetPlan]) -> list[str]:
    """Subsets whose augmentation changes pixels every step (random_crop, color_aug)."""
    found = []
    for plan in datasets:
        for subset in plan.subsets:
            flags = [k for k in ("random_crop", "color_aug") if subset.params.get(k)]
            face = subset.params.get("face_crop_aug_range")
            if face and not plan.params.get("enable_bucket") and face[0] != face[1]:
                flags.append("face_crop_aug_range")
            if flags:
                where = subset.image_dir or subset.metadata_file
                found.append(
                    f"datasets[{plan.index}].subsets[{subset.index}] ({where}): {', '.join(flags)}"
                )
    return found


def default_workers() -> int:
    """Decode threads when the caller does not say: one per CPU, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


@dataclass
class CacheReport:
    """What a cache pass found and did. Entry labels read "path [WxH, flipped]"."""

    index: LatentIndex = field(default_factory=dict)
    total: int = 0  # distinct latents the datasets need
    encoded: int = 0
    reused: int = 0
    missing: list[str] = field(default_factory=list)  # no entry yet
    stale: list[str] = field(default_factory=list)  # present but unreadable/truncated/mis-shaped
    seconds: float = 0.0  # wall time of the encode pass (decode, VAE, writes)
    vae_seconds: float = 0.0  # inside the VAE, host<->device copies included

    @property
    def images_per_second(self) -> float:
        """Encoded latents per second of the encode pass (0 when nothing was encoded)."""
        return self.encoded / self.seconds if self.seconds > 0 else 0.0

    @property
    def outside_vae_share(self) -> float:
        """Share of the encode pass not spent in the VAE (waiting on decodes, writes, overhead)."""
        return max(0.0, 1.0 - self.vae_seconds / self.seconds) if self.seconds > 0 else 0.0


def _digest(path: Path) -> str:
    try:
        return file_digest(path)
    except OSError as exc:
        raise DataError(
            f"cannot read {path}: {exc}", hint="fix or remove the file, then run again"
        ) from exc


def plan_keys(
    datasets: list[DatasetPlan],
    vae_id: str,
    dtype: str,
    workers: int = 1,
    on_file: Callable[[], None] | None = None,
) -> dict[tuple, tuple]:
    """(dataset, subset, image, flip) -> (key, entry, spec) for every latent the run needs.

    Image files are hashed on `workers` threads; `on_file` is called once per file hashed.
    """
    paths: dict[Path, None] = {}
    for plan in datasets:
        for subset in plan.subsets:
            paths.update((e.path, None) for e in subset.images if e.num_repeats > 0)
    digests: dict[Path, str] = {}
    with closing(ordered_map(_digest, list(paths), workers, 4 * max(1, workers))) as hashed:
        for path, digest in zip(paths, hashed, strict=True):
            digests[path] = digest
            if on_file is not None:
                on_file()
    jobs: dict[tuple, tuple] = {}
    for d_index, plan in enumerate(datasets):
        bucketed = bool(plan.params.get("enable_bucket"))
        for s_index, subset in enumerate(plan.subsets):
            flips = (False, True) if subset.params.get("flip_aug") else (False,)
            for i_index, entry in enumerate(subset.images):
                if entry.num_repeats <= 0:
                    continue
                for flip in flips:
                    spec = transform_spec(subset, entry, flip, bucketed)
                    left = (entry.resized_size[0] - entry.bucket[0]) // 2
                    top = (entry.resized_size[1] - entry.bucket[1]) // 2
                    recipe = LatentRecipe(
                        bucket=entry.bucket,
                        resized=entry.resized_size,
                        crop_offsets=(left, top),
                        interpolation=str(spec.interpolation),
                        flip=flip,
                        alpha_mask=bool(spec.alpha_mask),
                        exif_transpose=True,
                        face_crop=spec.face_crop_range is not None,
                    )
                    key = latent_key(digests[entry.path], recipe, vae_id, dtype)
                    jobs[(d_index, s_index, i_index, flip)] = (key, entry, spec)
    return jobs


def _label(entry: ImageEntry, spec: Any) -> str:
    flipped = ", flipped" if spec.flip else ""
    return f"{entry.path} [{entry.bucket[0]}x{entry.bucket[1]}{flipped}]"


def require_cacheable(datasets: list[DatasetPlan]) -> None:
    """Raise ConfigError naming every subset whose augmentations cannot be cached."""
    bad = uncacheable_subsets(datasets)
    if bad:
        raise ConfigError(
            [Problem(key="cache_latents", message=f"cannot cache latents: {b}") for b in bad],
            hint="these augmentations change the pixels every step: turn them off for these "
            "subsets, or train without cache_latents (the VAE then encodes every step)",
        )


def _survey(
    datasets: list[DatasetPlan],
    vae: torch.nn.Module,
    store: LatentStore,
    dtype: torch.dtype,
    workers: int,
    bar: Any,
    verify_only: bool,
) -> tuple[CacheReport, list[tuple]]:
    """Key every latent, check the store; returns the report so far and what to encode."""
    vae_id = vae_identity(vae, dtype)
    files = {e.path for p in datasets for s in p.subsets for e in s.images if e.num_repeats > 0}
    task = bar.add_task("hashing images", total=len(files), info="")
    jobs = plan_keys(datasets, vae_id, str(dtype), workers, lambda: bar.advance(task))
    report = CacheReport(index={k: v[0] for k, v in jobs.items()})
    todo: list[tuple] = []
    seen: set[str] = set()
    for key, entry, spec in jobs.values():
        if key in seen:
            continue
        seen.add(key)
        h, w = entry.bucket[1] // 8, entry.bucket[0] // 8
        mask_hw = (entry.bucket[1], entry.bucket[0]) if spec.alpha_mask else None
        state, why = store.status(key, (h, w), mask_hw)
        if state == "ok":
            report.reused += 1
            continue
        if state == "missing":
            report.missing.append(_label(entry, spec))
        else:
            report.stale.append(f"{_label(entry, spec)}: {why}")
        if not verify_only:
            store.discard(key)
            todo.append((key, entry, spec))
    report.total = len(seen)
    todo.sort(key=lambda job: job[1].bucket)  # stable: plan order within a bucket
    return report, todo


def fill_store(
    datasets: list[DatasetPlan],
    vae: torch.nn.Module,
    store: LatentStore,
    dtype: torch.dtype,
    batch_size: int = 1,
    verify_only: bool = False,
    seed: int = 0,
    workers: int | None = None,
) -> CacheReport:
    """Encode every needed latent not yet (validly) in `store`, bucket by bucket.

    Images are decoded on `workers` threads (default: `default_workers()`) ahead of the VAE,
    which runs on its own device in `dtype` (the VAE is cast to it in place, as training does);
    files are written by background threads. verify_only: only report missing/stale entries.
    Raises ConfigError naming the subsets whose augmentations cannot be cached.
    """
    from sdtrain.log import progress

    require_cacheable(datasets)
    workers = default_workers() if workers is None else workers
    with progress() as bar:
        report, todo = _survey(datasets, vae, store, dtype, workers, bar, verify_only)
        if todo:
            _encode_all(todo, vae, store, dtype, max(1, batch_size), seed, workers, bar, report)
    return report


def _encode_all(
    todo: list[tuple],
    vae: torch.nn.Module,
    store: LatentStore,
    dtype: torch.dtype,
    batch_size: int,
    seed: int,
    workers: int,
    bar: Any,
    report: CacheReport,
) -> None:
    import torch

    from sdtrain.data.transforms import prepare_pixels

    device = next(vae.parameters()).device
    if next(vae.parameters()).dtype != dtype:
        torch.nn.Module.to(vae, dtype=dtype)

    def decode(job: tuple) -> tuple[Any, Any]:
        _key, entry, spec = job
        try:
            tensor, mask, _ = prepare_pixels(entry.path, spec, random.Random(seed))
        except (OSError, ValueError) as exc:
            raise DataError(
                f"cannot load {entry.path}: {exc}", hint="fix or remove the image, then run again"
            ) from exc
        return tensor, None if mask is None else torch.as_tensor(mask)

    task = bar.add_task("caching latents", total=len(todo), info="")
    started = time.perf_counter()
    chunk: list[tuple] = []
    decoded: list[tuple[Any, Any]] = []

    def flush(writer: BackgroundWriter) -> None:
        begin = time.perf_counter()
        latents = _encode_batch(vae, [p for p, _ in decoded], [j[0] for j in chunk], device, dtype)
        report.vae_seconds += time.perf_counter() - begin
        finite = torch.isfinite(latents).flatten(1).all(dim=1)
        for (key, entry, _spec), latent, (_, mask), ok in zip(
            chunk, latents, decoded, finite.tolist(), strict=True
        ):
            if not ok:
                raise DataError(
                    f"the VAE produced NaN/inf latents for {entry.path}",
                    hint="check the image, or keep the VAE in fp32 (no_half_vae = true)",
                )
            writer.submit(store.put, key, latent.clone(), mask)
        report.encoded += len(chunk)
        rate = report.encoded / max(time.perf_counter() - started, 1e-9)
        bar.update(task, advance=len(chunk), info=f"{rate:.1f} img/s")
        chunk.clear()
        decoded.clear()

    window = 2 * batch_size + workers
    with (
        BackgroundWriter(workers=2, limit=4 * batch_size) as writer,
        closing(ordered_map(decode, todo, workers, window)) as stream,
        torch.no_grad(),
    ):
        for job, item in zip(todo, stream, strict=True):
            if chunk and (chunk[0][1].bucket != job[1].bucket or len(chunk) == batch_size):
                flush(writer)
            chunk.append(job)
            decoded.append(item)
        if chunk:
            flush(writer)
    report.seconds = time.perf_counter() - started


def _encode_batch(
    vae: torch.nn.Module,
    pixels: list[torch.Tensor],
    keys: list[str],
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """(B, 3, H, W) pixels in [-1, 1] -> (B, C, H/8, W/8) float32 posterior samples on the CPU.

    One noise draw per entry, seeded by its content address: a cached sample does not depend on
    which images happened to share a VAE batch (the reference caches a sample, not the mean).
    """
    import torch

    from sdtrain.models.host_copy import to_device
    from sdtrain.models.vae_encode import encode_posterior

    # channels-last on the CPU (models/vae_encode.py)
    dist = encode_posterior(vae, to_device(torch.stack(pixels), device, dtype))
    eps = torch.stack(
        [
            torch.randn(
                dist.mean.shape[1:], generator=torch.Generator().manual_seed(int(key[:14], 16))
            )
            for key in keys
        ]
    )
    eps = to_device(eps, device)
    return (dist.mean.float() + dist.std.float() * eps).cpu()
