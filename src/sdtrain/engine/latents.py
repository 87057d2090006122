"""Fill the content-addressed latent store: the VAE work that `cache_latents` and
`sdtrain latents cache` share. Entries already present (and valid) are never re-encoded."""

from __future__ import annotations

import hashlib
import logging
import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sdtrain.data.dataset import transform_spec
from sdtrain.data.items import DatasetPlan
from sdtrain.data.latent_store import LatentRecipe, LatentStore, file_digest, latent_key
from sdtrain.errors import ConfigError, DataError, Problem

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

LatentIndex = dict[tuple[int, int, int, bool], str]


def vae_identity(vae: torch.nn.Module) -> str:
    """A hash of the VAE's weights (and dtype): a different VAE never shares cache entries."""
    import torch

    digest = hashlib.blake2b(digest_size=20)
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        flat = tensor.detach().to("cpu").contiguous().view(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes())
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


@dataclass
class CacheReport:
    """What a cache pass did."""

    index: LatentIndex = field(default_factory=dict)
    encoded: int = 0
    reused: int = 0
    missing: list[str] = field(default_factory=list)  # with verify_only


def plan_keys(datasets: list[DatasetPlan], vae_id: str, dtype: str) -> dict[tuple, tuple]:
    """(dataset, subset, image, flip) -> (key, path, spec) for every latent the run needs."""
    jobs: dict[tuple, tuple] = {}
    digests: dict[str, str] = {}
    for d_index, plan in enumerate(datasets):
        bucketed = bool(plan.params.get("enable_bucket"))
        for s_index, subset in enumerate(plan.subsets):
            flips = (False, True) if subset.params.get("flip_aug") else (False,)
            for i_index, entry in enumerate(subset.images):
                if entry.num_repeats <= 0:
                    continue
                path = str(entry.path)
                if path not in digests:
                    try:
                        digests[path] = file_digest(entry.path)
                    except OSError as exc:
                        raise DataError(
                            f"cannot read {path}: {exc}",
                            hint="fix or remove the file, then run again",
                        ) from exc
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
                    key = latent_key(digests[path], recipe, vae_id, dtype)
                    jobs[(d_index, s_index, i_index, flip)] = (key, entry, spec)
    return jobs


def fill_store(
    datasets: list[DatasetPlan],
    vae: torch.nn.Module,
    store: LatentStore,
    dtype: torch.dtype,
    batch_size: int = 1,
    verify_only: bool = False,
    seed: int = 0,
) -> CacheReport:
    """Encode every needed latent not yet in `store` (grouped by bucket, batch_size at a time)."""
    import torch

    from sdtrain.data.transforms import prepare_pixels
    from sdtrain.log import progress

    bad = uncacheable_subsets(datasets)
    if bad:
        raise ConfigError(
            [Problem(key="cache_latents", message=f"cannot cache latents: {b}") for b in bad],
            hint="turn off random_crop/color_aug for these subsets, or do not cache latents",
        )
    vae_id = vae_identity(vae)
    jobs = plan_keys(datasets, vae_id, str(dtype))
    report = CacheReport(index={k: v[0] for k, v in jobs.items()})
    todo: dict[tuple[int, int], list[tuple]] = defaultdict(list)
    seen: set[str] = set()
    for key, entry, spec in jobs.values():
        if key in seen:
            continue
        seen.add(key)
        h, w = entry.bucket[1] // 8, entry.bucket[0] // 8
        if store.check(key, (h, w)):
            report.reused += 1
            continue
        if verify_only:
            report.missing.append(f"{entry.path} (flip={spec.flip})")
            continue
        store.discard(key)
        todo[entry.bucket].append((key, entry, spec))
    total = sum(len(v) for v in todo.values())
    if not total:
        return report
    device = next(vae.parameters()).device
    with progress() as bar, torch.no_grad():
        task = bar.add_task("caching latents", total=total, info="")
        for bucket in sorted(todo):
            items = todo[bucket]
            for start in range(0, len(items), batch_size):
                chunk = items[start : start + batch_size]
                pixels, masks = [], []
                for _key, entry, spec in chunk:
                    tensor, mask, _ = prepare_pixels(entry.path, spec, random.Random(seed))
                    pixels.append(tensor)
                    masks.append(mask)
                batch = torch.stack(pixels).to(device, dtype=dtype)
                dist = vae.encode(batch).latent_dist
                # one noise draw per entry, keyed by its content address: the cached sample
                # does not depend on which images happened to share a VAE batch
                eps = torch.stack(
                    [
                        torch.randn(
                            dist.mean.shape[1:],
                            generator=torch.Generator().manual_seed(int(key[:14], 16)),
                        )
                        for key, _, _ in chunk
                    ]
                ).to(device)
                latents = (dist.mean.float() + dist.std.float() * eps).float()
                for (key, entry, _), latent, mask in zip(chunk, latents, masks, strict=True):
                    if not torch.isfinite(latent).all():
                        raise DataError(
                            f"the VAE produced NaN/inf latents for {entry.path}",
                            hint="check the image, or keep the VAE in fp32 (no_half_vae = true)",
                        )
                    store.put(key, latent, None if mask is None else torch.as_tensor(mask))
                report.encoded += len(chunk)
                bar.update(task, advance=len(chunk))
    return report
