"""Fixtures for model-layer tests: tiny bundles and the files/folders written from them."""

from __future__ import annotations

import pytest

from sdtrain.config.sections import ModelSection


def load(spec: str, **kwargs):
    from sdtrain.models.load import load_bundle

    return load_bundle(ModelSection(pretrained_model_name_or_path=spec, **kwargs))


@pytest.fixture(scope="session")
def tiny_sd1():
    """builtin:tiny-sd1 (read-only: do not modify in tests)."""
    return load("builtin:tiny-sd1")


@pytest.fixture(scope="session")
def tiny_sd2():
    """builtin:tiny-sd2 (read-only: do not modify in tests)."""
    return load("builtin:tiny-sd2")


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory, tiny_sd1, tiny_sd2):
    """{family: {"diffusers": folder, "safetensors": file, "ckpt": file}} from tiny models."""
    from sdtrain.models.save import save_diffusers, save_single_file

    root = tmp_path_factory.mktemp("tiny-files")
    files = {}
    for name, bundle in (("sd1", tiny_sd1), ("sd2", tiny_sd2)):
        folder = save_diffusers(bundle, root / f"tiny-{name}")
        from_folder = load(str(folder))
        files[name] = {
            "diffusers": folder,
            "safetensors": save_single_file(from_folder, root / f"tiny-{name}.safetensors"),
            "ckpt": save_single_file(from_folder, root / f"tiny-{name}.ckpt"),
        }
    return files


def assert_same_weights(left, right) -> None:
    """Equal key sets and bit-identical tensors for unet, vae and text_encoder."""
    import torch

    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(left, name).state_dict(), getattr(right, name).state_dict()
        assert set(a) == set(b), (name, sorted(set(a) ^ set(b))[:5])
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}.{key} differs"


@pytest.fixture
def load_spec():
    """load_spec(spec, **model_section_keys) -> ModelBundle."""
    return load


@pytest.fixture
def same_weights():
    """same_weights(a, b): assert two bundles hold identical weights."""
    return assert_same_weights
