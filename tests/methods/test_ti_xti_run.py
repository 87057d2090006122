"""`sdtrain train ti --xti` end to end (tiny SD1): the contract checks with per-site conditioning.

The battery's export check encodes prompts without layer states, so XTI gets its own: the
trained bundle and a fresh one with the exported file loaded as `generate` loads it must give the
same UNet prediction under the per-site conditioning, bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import contract
import pytest
import torch
from contract import MethodCase


def _reload_xti(files: list[Path], bundle: Any) -> Any:
    from sdtrain.models.embeddings import add_xti_embedding, read_xti

    (path,) = files
    add_xti_embedding(bundle, "zqtok", read_xti(path))
    return bundle


XTI = MethodCase(
    name="ti",
    tables={
        "textual_inversion": {
            "token_string": "zqtok",
            "init_word": "cat",
            "num_vectors_per_token": 2,
            "xti": True,
        }
    },
    trainable=lambda key, tensor: key.endswith("token_embedding.rows"),
    reload=_reload_xti,
    captions=lambda i: f"a photo of zqtok, tag{i}",
    prompts=["a photo of zqtok zqtok1", "zqtok zqtok1 tag1"],
)


def xti_predictions(bundle: Any, prompts: list[str]) -> torch.Tensor:
    """UNet predictions under per-site conditioning at fixed noisy latents and timesteps."""
    from sdtrain.methods.base import Conditioning
    from sdtrain.models.text import tokenize

    rows = bundle.embeddings.xti
    g = torch.Generator().manual_seed(3)
    noisy = torch.randn(len(prompts), 4, 8, 8, generator=g)
    t = torch.linspace(50, 950, len(prompts)).long()
    with torch.no_grad():
        ids = tokenize(bundle.tokenizer, prompts, None)
        states = rows.encode(bundle.text_encoder, ids, None, bundle.tokenizer.eos_token_id)
        cond = Conditioning(states[rows.mid], layer_states=states)
        return bundle.family.predict(bundle.unet, noisy, t, cond).float()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from typer.testing import CliRunner

    from sdtrain.cli.main import _register_groups, app

    _register_groups()
    runner = CliRunner()
    root = tmp_path_factory.mktemp("xti")
    out = root / "out"
    config = contract.write_config(XTI, root / "run.toml", contract.make_dataset(root, XTI), out)
    with pytest.MonkeyPatch.context() as monkeypatch:
        captured = contract.train(
            lambda args: runner.invoke(app, args, catch_exceptions=False), monkeypatch, XTI, config
        )
    return captured, out


def test_xti_trains_only_its_rows(trained) -> None:
    captured, out = trained
    contract.check_finite_loss(out)
    contract.check_only_declared_change(XTI, captured)


def test_xti_file_reloads_to_the_same_predictions(trained) -> None:
    from safetensors import safe_open

    from sdtrain.config.sections import ModelSection
    from sdtrain.models.load import load_bundle
    from sdtrain.models.training_kernels import use_training_kernels

    captured, out = trained
    (path,) = contract.final_files(captured)
    with safe_open(str(path), "pt") as handle:
        assert sorted(handle.keys()) == ["IN01", "MID", "OUT02", "OUT03"]
        assert handle.get_tensor("MID").shape == (2, 32)
        assert handle.metadata()["modelspec.architecture"].endswith("/textual-inversion")
    trainer = captured.trainer
    want = xti_predictions(trainer.bundle, XTI.prompts)
    fresh = load_bundle(ModelSection(pretrained_model_name_or_path="builtin:tiny-sd1"))
    use_training_kernels(fresh)  # the training's convolution and Linear kernels
    got = xti_predictions(_reload_xti([path], fresh), XTI.prompts)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    sites = xti_predictions(trainer.bundle, ["zqtok zqtok1"])
    from sdtrain.methods.base import Conditioning
    from sdtrain.methods.conditioning import TextConditioning

    with torch.no_grad():
        hidden = TextConditioning().encode(trainer.bundle, ["zqtok zqtok1"], grad=False)
        plain = trainer.bundle.family.predict(
            trainer.bundle.unet,
            torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3)),
            torch.tensor([50]),
            Conditioning(hidden),
        )
    assert not torch.equal(sites, plain), "the sites' own rows make no difference"


def test_xti_resume_is_exact(cli, monkeypatch, tmp_path) -> None:
    contract.check_exact_resume(cli, monkeypatch, XTI, tmp_path)
