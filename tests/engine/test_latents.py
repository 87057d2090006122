"""Filling the latent store: flips, resume, content addressing (pixels, VAE, dtype), --verify's
missing vs stale, background decoding, batch-independence, uncacheable subsets, NaN guard."""

from __future__ import annotations

import copy
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdtrain.config.loader import load_run_config
from sdtrain.config.run import PLAN_COMMAND
from sdtrain.data.latent_store import LatentStore
from sdtrain.data.plan import plan_for_run
from sdtrain.engine.latents import fill_store, vae_identity
from sdtrain.errors import ConfigError, DataError

SIZES = [(128, 128), (60, 200), (200, 60)]  # three different buckets at resolution 128


def write_images(folder: Path, sizes=SIZES, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, (w, h) in enumerate(sizes):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        (folder / f"img{i}.txt").write_text(f"picture {i}")
        paths.append(path)
    return paths


def write_run(root: Path, subset_extra: str = "flip_aug = true") -> Path:
    run = root / "run.toml"
    run.write_text(
        '[model]\npretrained_model_name_or_path = "builtin:tiny-sd1"\n'
        "[general]\nresolution = 128\nenable_bucket = true\nmin_bucket_reso = 64\n"
        'max_bucket_reso = 192\ncaption_extension = ".txt"\n'
        f'[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "imgs"\n  {subset_extra}\n'
    )
    return run


def plan_of(run: Path):
    return plan_for_run(load_run_config([str(run)], PLAN_COMMAND)).datasets


@pytest.fixture(scope="module")
def base_vae():
    from diffusers import AutoencoderKL

    from sdtrain.models.families import config_dir

    torch.manual_seed(0)
    return AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir("tiny-sd1") / "vae"))


def counting(base):
    """A private copy of `base` that counts the images it encodes (fill_store casts in place)."""
    model = copy.deepcopy(base).eval()
    model.encoded_images = 0
    original = model.encode

    def encode(x, *args, **kwargs):
        model.encoded_images += x.shape[0]
        return original(x, *args, **kwargs)

    model.encode = encode
    return model


@pytest.fixture
def vae(base_vae):
    return counting(base_vae)


@pytest.fixture
def dataset(tmp_path):
    paths = write_images(tmp_path / "imgs")
    return tmp_path, paths, plan_of(write_run(tmp_path))


def files(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*.safetensors"))}


def test_every_image_and_its_flip_is_cached_at_its_bucket_then_reused(dataset, vae):
    root, _, datasets = dataset
    store = LatentStore(root / "cache")
    report = fill_store(datasets, vae, store, torch.float32, batch_size=2, workers=2)
    assert (report.total, report.encoded, report.reused) == (6, 6, 0)
    assert vae.encoded_images == 6
    assert len(files(root / "cache")) == 6
    entries = datasets[0].subsets[0].images
    for i, entry in enumerate(entries):
        plain, flipped = report.index[(0, 0, i, False)], report.index[(0, 0, i, True)]
        assert plain != flipped
        w, h = entry.bucket
        assert store.get(plain)["latents"].shape == (4, h // 8, w // 8)
    assert len({e.bucket for e in entries}) == 3
    assert report.seconds > 0 and 0 < report.vae_seconds <= report.seconds
    assert report.images_per_second > 0

    again = fill_store(datasets, vae, LatentStore(root / "cache"), torch.float32, batch_size=2)
    assert (again.encoded, again.reused, vae.encoded_images) == (0, 6, 6)
    assert again.index == report.index


def test_editing_one_images_pixels_reencodes_exactly_that_image(dataset, vae):
    root, paths, datasets = dataset
    first = fill_store(datasets, vae, LatentStore(root / "cache"), torch.float32)
    pixels = np.asarray(Image.open(paths[1])).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(paths[1])
    vae.encoded_images = 0
    second = fill_store(plan_of(root / "run.toml"), vae, LatentStore(root / "cache"), torch.float32)
    assert (second.encoded, second.reused, vae.encoded_images) == (2, 4, 2)  # image + its flip
    changed = {k for k in second.index if second.index[k] != first.index[k]}
    assert changed == {(0, 0, 1, False), (0, 0, 1, True)}


def test_another_vae_or_dtype_invalidates_every_entry(dataset, vae, base_vae):
    root, _, datasets = dataset
    fill_store(datasets, vae, LatentStore(root / "cache"), torch.float32)
    other = counting(base_vae)
    with torch.no_grad():
        next(other.parameters()).flatten()[0] += 0.01
    assert vae_identity(other) != vae_identity(vae)
    report = fill_store(datasets, other, LatentStore(root / "cache"), torch.float32)
    assert (report.encoded, report.reused, other.encoded_images) == (6, 0, 6)
    half = fill_store(datasets, vae, LatentStore(root / "cache"), torch.bfloat16)
    assert (half.encoded, half.reused) == (6, 0)
    assert next(vae.parameters()).dtype == torch.bfloat16  # cast in place, as training does


def test_vae_identity_is_that_of_the_weights_in_the_encoding_dtype(base_vae):
    fp32 = copy.deepcopy(base_vae)
    as_bf16 = vae_identity(fp32, torch.bfloat16)
    assert as_bf16 != vae_identity(fp32)
    torch.nn.Module.to(fp32, dtype=torch.bfloat16)
    assert vae_identity(fp32) == as_bf16 == vae_identity(fp32, torch.bfloat16)


def test_verify_reports_missing_and_stale_and_writes_nothing(dataset, vae):
    root, _, datasets = dataset
    store = LatentStore(root / "cache")
    report = fill_store(datasets, vae, store, torch.float32)
    gone = store.path(report.index[(0, 0, 0, False)])
    gone.unlink()
    broken = store.path(report.index[(0, 0, 2, True)])
    broken.write_bytes(broken.read_bytes()[:100])
    before = files(root / "cache")
    vae.encoded_images = 0
    check = fill_store(datasets, vae, LatentStore(root / "cache"), torch.float32, verify_only=True)
    assert files(root / "cache") == before
    assert vae.encoded_images == 0 and check.encoded == 0
    assert check.reused == 4
    assert check.missing == [f"{datasets[0].subsets[0].images[0].path} [128x128]"]
    assert len(check.stale) == 1 and "img2.png" in check.stale[0] and "flipped" in check.stale[0]

    fixed = fill_store(datasets, vae, LatentStore(root / "cache"), torch.float32)
    assert (fixed.encoded, len(fixed.missing), len(fixed.stale)) == (2, 1, 1)
    clean = fill_store(datasets, vae, LatentStore(root / "cache"), torch.float32, verify_only=True)
    assert (clean.reused, clean.missing, clean.stale) == (6, [], [])


def test_images_are_decoded_off_the_main_thread(dataset, vae, monkeypatch):
    import sdtrain.data.transforms as transforms

    root, _, datasets = dataset
    seen: set[str] = set()
    real = transforms.prepare_pixels

    def recording(*args, **kwargs):
        seen.add(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(transforms, "prepare_pixels", recording)
    fill_store(datasets, vae, LatentStore(root / "cache"), torch.float32, workers=2)
    assert seen and threading.current_thread().name not in seen


def test_a_cached_latent_does_not_depend_on_its_batch(dataset, vae):
    root, _, datasets = dataset
    one = LatentStore(None)
    report = fill_store(datasets, vae, one, torch.float32, batch_size=1, workers=0)
    many = LatentStore(None)
    fill_store(datasets, vae, many, torch.float32, batch_size=4, workers=3)
    for key in report.index.values():
        torch.testing.assert_close(one.get(key)["latents"], many.get(key)["latents"])


@pytest.mark.parametrize("flag", ["random_crop = true", "color_aug = true"])
def test_uncacheable_subsets_are_named(tmp_path, vae, flag):
    write_images(tmp_path / "imgs")
    datasets = plan_of(write_run(tmp_path, flag))
    with pytest.raises(ConfigError) as caught:
        fill_store(datasets, vae, LatentStore(tmp_path / "cache"), torch.float32)
    text = str(caught.value.problems)
    assert "datasets[0].subsets[0]" in text and flag.split()[0] in text
    assert not (tmp_path / "cache").exists()


def test_nan_latents_name_the_image_and_are_not_stored(dataset, vae):
    root, _, datasets = dataset
    with torch.no_grad():
        vae.encoder.conv_in.weight.fill_(float("nan"))
    with pytest.raises(DataError, match="NaN"):
        fill_store(datasets, vae, LatentStore(root / "cache"), torch.float32)
    assert files(root / "cache") == {}


def test_an_interrupted_pass_keeps_what_it_wrote_and_the_next_one_resumes(dataset, vae):
    root, _, datasets = dataset
    real = vae.encode
    calls = 0

    def interrupted(x, *args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt
        return real(x, *args, **kwargs)

    vae.encode = interrupted
    with pytest.raises(KeyboardInterrupt):
        fill_store(datasets, vae, LatentStore(root / "cache"), torch.float32, batch_size=2)
    written = files(root / "cache")
    assert len(written) == 4  # two buckets (image + flip each) done; no partial or temp files
    assert not [p for p in (root / "cache").rglob("*") if p.name.endswith(".tmp")]
    vae.encode = real
    vae.encoded_images = 0
    resumed = fill_store(datasets, vae, LatentStore(root / "cache"), torch.float32, batch_size=2)
    assert (resumed.encoded, resumed.reused, vae.encoded_images) == (2, 4, 2)


def test_vae_identity_keeps_its_format():
    """Existing caches stay valid: blake2b-160 over each state-dict entry's name, dtype and raw
    bytes, in key order (computed here independently of how vae_identity feeds the hash)."""
    import hashlib

    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4))
    torch.manual_seed(0)
    for p in module.parameters():
        torch.nn.init.normal_(p)
    digest = hashlib.blake2b(digest_size=20)
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode() + str(tensor.dtype).encode())
        digest.update(bytes(tensor.contiguous().view(-1).view(torch.uint8).tolist()))
    assert vae_identity(module) == digest.hexdigest()
