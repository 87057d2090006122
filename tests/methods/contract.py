"""The method contract: every training method passes the same battery through `sdtrain train`.

A method joins by declaring a `MethodCase` and adding it to `CASES` in test_contract.py:

    MethodCase(
        name="lora",                        # its registry name: `sdtrain train lora`
        tables={"network": {"network_dim": 4}},  # run-config tables/keys on top of RUN below
        trainable=lambda key, tensor: ".lora_" in key,
        reload=lambda files, bundle: ...,   # load the export into a fresh base bundle
    )

`trainable(key, tensor)` gets every state-dict entry of the trained bundle after the method's
`prepare` (keys prefixed "unet.", "text_encoder.", "vae."), and answers True (may change),
False (must stay bit-identical), or a bool tensor of tensor's shape marking the entries that may
change (TI: only its new rows of the token-embedding matrix). At least one declared entry must
change. `reload(files, bundle)` receives the final export's files and a freshly loaded base
bundle, and returns the bundle a user's client would sample with (the method's own loader or a
diffusers client). `captions` fills each image's caption (TI puts its token in it), `prompts`
are the prompts the export comparison encodes, `atol` is the tolerance of that comparison (0 =
bit-identical), `config` can rewrite the whole table dict.

The checks (run on builtin:tiny-sd1, CPU, fp32, 4 steps, batch 1, accumulation 2):
  - every logged loss is finite and no step is skipped;
  - only the declared parameters change, and some do;
  - export -> reload into a fresh bundle -> the UNet prediction for `prompts` equals the trained
    bundle's (inside `method.sampling`), within `atol`;
  - resume is exact: 4 steps straight == 2 steps + state + resume for 2 (trainable state,
    optimizer, scheduler, counters, final export: bit-identical);
  - the 2-process run: `two_process_run` trains the case under torchrun with 2 gloo processes
    (tests/launched.py); every logged loss must be finite.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

Trainable = Callable[[str, torch.Tensor], "bool | torch.Tensor"]

STEPS = 4
IMAGES = 3


@dataclass
class MethodCase:
    """How one method joins the contract battery (see the module docstring)."""

    name: str
    tables: dict[str, dict[str, Any]]
    trainable: Trainable
    reload: Callable[[list[Path], Any], Any]
    captions: Callable[[int], str] = lambda i: f"a photo of a cat, tag{i}"
    prompts: list[str] = field(default_factory=lambda: ["a photo of a cat", "tag1"])
    atol: float = 0.0
    config: Callable[[dict[str, dict[str, Any]]], dict[str, dict[str, Any]]] = lambda t: t


def _torchrun(case: MethodCase, config: Path, out: Path) -> None:
    """Train `case` under `torchrun --nproc_per_node 2` (gloo, CPU) to the end."""
    from launched import run

    run(["train", case.name, str(config)], out.parent / f"torchrun-{case.name}.log")


# The 2-process check: a runner `(case, config_path, output_dir) -> None` that trains `case`
# under `torchrun --nproc_per_node 2` (gloo, CPU) and returns when the output folder is complete.
two_process_run: Callable[[MethodCase, Path, Path], None] | None = _torchrun


def make_dataset(root: Path, case: MethodCase) -> Path:
    """`root/data/1_cat/` with IMAGES random 64 px PNGs and the case's captions."""
    folder = root / "data" / "1_cat"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(IMAGES):
        pixels = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        (folder / f"img{i}.caption").write_text(case.captions(i), encoding="utf-8")
    return root / "data"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))


def write_config(
    case: MethodCase,
    path: Path,
    data: Path,
    out: Path,
    training: dict[str, Any] | None = None,
    **saving: Any,
) -> Path:
    """The case's run config: tiny-sd1, STEPS steps, batch 1, accumulation 2, seed 7;
    `training` adds [training] keys, the keywords [saving] keys."""
    tables: dict[str, dict[str, Any]] = {
        "model": {"pretrained_model_name_or_path": "builtin:tiny-sd1"},
        "dataset": {"train_data_dir": str(data), "resolution": 64},
        "training": {
            "output_dir": str(out),
            "output_name": "t",
            "max_train_steps": STEPS,
            "train_batch_size": 1,
            "gradient_accumulation_steps": 2,
            "max_data_loader_n_workers": 0,
            "seed": 7,
            **(training or {}),
        },
        "optimizer": {"learning_rate": 1e-2},
        "saving": {"save_state_on_train_end": True, **saving},
    }
    for table, values in case.tables.items():
        tables.setdefault(table, {}).update(values)
    tables = case.config(tables)
    lines = []
    for table, values in tables.items():
        lines.append(f"[{table}]")
        lines += [f"{k} = {_toml(v)}" for k, v in values.items() if v is not None]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@dataclass
class Captured:
    """The trainer of an in-process run, with its bundle's state right after setup."""

    trainer: Any = None
    after_setup: dict[str, torch.Tensor] = field(default_factory=dict)


def bundle_state(bundle: Any) -> dict[str, torch.Tensor]:
    """Every state-dict entry of unet, text_encoder and vae (cloned), keys prefixed."""
    return {
        f"{part}.{key}": value.detach().clone()
        for part in ("unet", "text_encoder", "vae")
        for key, value in getattr(bundle, part).state_dict().items()
    }


def train(cli: Callable, monkeypatch: Any, case: MethodCase, config: Path) -> Captured:
    """`sdtrain train <case.name> CONFIG` in-process, capturing the trainer."""
    from sdtrain.engine.loop import Trainer

    captured = Captured()
    real_setup, real_run = Trainer._setup, Trainer.run

    def setup(self: Any) -> None:
        real_setup(self)
        captured.after_setup = bundle_state(self.bundle)

    def run(self: Any) -> Any:
        captured.trainer = self
        return real_run(self)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_setup", setup)
        patch.setattr(Trainer, "run", run)
        result = cli(["train", case.name, str(config)])
    assert result.exit_code == 0, result.output
    return captured


def check_finite_loss(out: Path) -> None:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all("nonfinite" not in r and math.isfinite(r["loss"]) for r in records), records


def check_only_declared_change(case: MethodCase, captured: Captured) -> None:
    after = bundle_state(captured.trainer.bundle)
    before = captured.after_setup
    assert set(after) == set(before)
    changed_declared = False
    for key, old in before.items():
        new = after[key]
        allowed = case.trainable(key, old)
        if allowed is True:
            changed_declared |= not torch.equal(old, new)
            continue
        if allowed is False:
            assert torch.equal(old, new), f"{key} changed but is not declared trainable"
            continue
        mask = torch.as_tensor(allowed, dtype=torch.bool)
        assert torch.equal(old[~mask], new[~mask]), f"{key}: undeclared entries changed"
        changed_declared |= not torch.equal(old[mask], new[mask])
    assert changed_declared, "no declared trainable parameter changed"


def predictions(bundle: Any, prompts: list[str]) -> torch.Tensor:
    """UNet predictions for `prompts` at fixed noisy latents and timesteps (no grad)."""
    from sdtrain.methods.base import Conditioning
    from sdtrain.methods.conditioning import TextConditioning

    size = int(bundle.unet.config.sample_size)
    g = torch.Generator().manual_seed(3)
    noisy = torch.randn(len(prompts), bundle.unet.config.in_channels, size, size, generator=g)
    t = torch.linspace(50, 950, len(prompts)).long()
    with torch.no_grad():
        hidden = TextConditioning().encode(bundle, prompts, grad=False)
        return bundle.family.predict(bundle.unet, noisy, t, Conditioning(hidden)).float()


def final_files(captured: Captured) -> list[Path]:
    """The files of the final export (the trainer's outputs with the final stem 't')."""
    return [p for p in captured.trainer.outputs if p.name.split(".")[0] == "t"]


def check_export_reload(case: MethodCase, captured: Captured) -> None:
    from sdtrain.config.sections import ModelSection
    from sdtrain.models.load import load_bundle
    from sdtrain.models.training_kernels import use_training_kernels

    trainer = captured.trainer
    with trainer.method.sampling(trainer.bundle):
        want = predictions(trainer.bundle, case.prompts)
    fresh = load_bundle(ModelSection(pretrained_model_name_or_path="builtin:tiny-sd1"))
    # the training's convolution and Linear kernels (models/conv_path.py, linear_path.py), so
    # that only the weights differ
    use_training_kernels(fresh)
    base = predictions(fresh, case.prompts)
    files = final_files(captured)
    assert files, "the final export wrote no file"
    reloaded = case.reload(files, fresh)
    if reloaded is not fresh:  # a new bundle (a full model's file); never the adapters' layers
        use_training_kernels(reloaded)
    got = predictions(reloaded, case.prompts)
    assert not torch.equal(want, base), "training left the outputs unchanged"
    torch.testing.assert_close(got, want, atol=case.atol, rtol=0)


def check_exact_resume(cli: Callable, monkeypatch: Any, case: MethodCase, root: Path) -> None:
    """STEPS straight (state at STEPS/2) == STEPS/2 + resume, bit for bit."""
    data = make_dataset(root, case)
    half = STEPS // 2
    straight = root / "straight"
    config = write_config(
        case, root / "a.toml", data, straight, save_every_n_steps=half, save_state=True
    )
    first = train(cli, monkeypatch, case, config)
    state = straight / f"t-step{half:08d}-state"
    resumed = root / "resumed"
    config = write_config(case, root / "b.toml", data, resumed, resume=str(state))
    second = train(cli, monkeypatch, case, config)
    a, b = first.trainer.method.trainable_state(), second.trainer.method.trainable_state()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("trainable.safetensors", "train_state.json"):
        assert (straight / "t-state" / name).read_bytes() == (
            resumed / "t-state" / name
        ).read_bytes(), name
    from sdtrain.engine.state import load_state

    x, y = load_state(straight / "t-state"), load_state(resumed / "t-state")
    assert_same(x.optimizer, y.optimizer, "optimizer")
    assert_same(x.scheduler, y.scheduler, "scheduler")
    for path in final_files(first):
        assert_same(_tensors(path), _tensors(resumed / path.name), path.name)


def check_compiled_is_eager(
    cli: Callable, monkeypatch: Any, case: MethodCase, eager: Captured, root: Path
) -> None:
    """The case's run with torch_compile (aot_eager: torch's kernels through the traced
    graphs) trains and writes what the eager run `eager` did, bit for bit."""
    data = make_dataset(root, case)
    out = root / "compiled"
    compiled = {"torch_compile": True, "dynamo_backend": "aot_eager"}
    config = write_config(case, root / "c.toml", data, out, training=compiled)
    again = train(cli, monkeypatch, case, config)
    assert again.trainer.compiled is not None
    a, b = eager.trainer.method.trainable_state(), again.trainer.method.trainable_state()
    assert_same(a, b, "trainable")
    for path in final_files(eager):
        assert_same(_tensors(path), _tensors(out / path.name), path.name)


def _tensors(path: Path) -> Any:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Exact equality of nested dicts/lists of tensors and plain values (tensors bit-equal)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"tensors differ at {where}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"keys differ at {where}"
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"lengths differ at {where}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"
