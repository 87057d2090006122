"""validation_split end to end: a deterministic hold-out that never trains and shows in the plan,
a fixed-input validation loss at the chosen cadence in metrics.jsonl, best.json naming the files
of the best evaluation, and training itself unchanged by the evaluations."""

from __future__ import annotations

import json

import pytest
from train_runs import make_dataset, metrics, write_config

from sdtrain.data.validation_split import held_out_count


def _plan(cli, config):
    result = cli(["dataset", "plan", str(config), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_held_out_count_never_overlaps_or_empties():
    assert [held_out_count(n, 0.5) for n in (0, 1, 2, 3, 4)] == [0, 0, 1, 2, 2]
    assert held_out_count(10, 0.01) == 1  # a positive split holds out at least one
    assert held_out_count(10, 1.0) == 9  # and never all
    assert held_out_count(10, 0.0) == 0


def test_split_is_deterministic_disjoint_and_shown(cli, tmp_path, run_data):
    config = write_config(
        tmp_path / "run.toml",
        run_data,
        tmp_path / "out",
        dataset={"validation_split": 0.4, "validation_seed": 3},
    )
    doc = _plan(cli, config)
    (dataset,) = doc["datasets"]
    held = {i["path"] for i in dataset["validation_images"]}
    trained = {i["path"] for i in dataset["images"]}
    assert len(held) == 2 and len(trained) == 3 and not held & trained
    assert dataset["validation_split"] == 0.4 and dataset["validation_seed"] == 3
    assert {i["path"] for i in _plan(cli, config)["datasets"][0]["validation_images"]} == held
    other = write_config(
        tmp_path / "other.toml",
        run_data,
        tmp_path / "out",
        dataset={"validation_split": 0.4, "validation_seed": 4},
    )
    assert {i["path"] for i in _plan(cli, other)["datasets"][0]["validation_images"]} != held
    text = " ".join(cli(["dataset", "plan", str(config)]).output.split())
    assert (
        "validation: 2 image(s) held out (validation_split 0.4, seed 3); they never train" in text
    )


def test_validation_keys_without_a_split_are_refused(cli, tmp_path, run_data):
    from sdtrain.errors import ConfigError

    config = write_config(
        tmp_path / "run.toml", run_data, tmp_path / "out", training={"validate_every_n_steps": 2}
    )
    with pytest.raises(ConfigError) as info:
        cli(["train", "lora", str(config), "--dry-run"])
    assert info.value.problems[0].key == "training.validate_every_n_steps"


def test_validation_loss_cadence_best_file_and_unchanged_training(cli, tmp_path):
    data = make_dataset(tmp_path, images=6)

    def run(name: str, every: int):
        out = tmp_path / name
        config = write_config(
            tmp_path / f"{name}.toml",
            data,
            out,
            training={"max_train_steps": 6, "validate_every_n_steps": every},
            dataset={"validation_split": 0.34},
            saving={"save_every_n_steps": 2, "save_state": False, "save_state_on_train_end": False},
        )
        result = cli(["train", "lora", str(config)])
        assert result.exit_code == 0, result.output
        return out

    two, three = run("two", 2), run("three", 3)
    records = metrics(two)
    validations = [r for r in records if "loss/validation" in r]
    assert [r["step"] for r in validations] == [2, 4, 6]
    assert all(r["validation_at"] == "step" for r in validations)
    best = json.loads((two / "best.json").read_text())
    chosen = min(validations, key=lambda r: r["loss/validation"])
    assert best["step"] == chosen["step"] and best["value"] == chosen["loss/validation"]
    final = chosen["step"] == 6  # no step file at the last step: the final file holds it
    name = "t.safetensors" if final else f"t-step{chosen['step']:08d}.safetensors"
    assert best["model"] == name
    assert (two / best["model"]).is_file()
    # evaluating at other steps does not change training (no gradients, RNG restored)
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    assert losses == [(r["step"], r["loss"]) for r in metrics(three) if "loss" in r]
    # the same weights give the same validation loss (fixed timesteps and noise)
    at_six = [r["loss/validation"] for r in metrics(three) if "loss/validation" in r][-1]
    assert at_six == validations[-1]["loss/validation"]


def test_cached_latents_cover_the_held_out_images(cli, tmp_path, monkeypatch):
    """With cache_latents the held-out images are cached too, so the VAE can be released after
    caching and every evaluation still runs (it used to call the released VAE)."""
    import math

    import sdtrain.models.release as release

    released = []
    real = release.release_weights
    monkeypatch.setattr(
        release, "release_weights", lambda m, what, why: released.append(what) or real(m, what, why)
    )
    data = make_dataset(tmp_path, images=6)
    out = tmp_path / "out"
    config = write_config(
        tmp_path / "run.toml",
        data,
        out,
        training={"max_train_steps": 4, "validate_every_n_steps": 2, "cache_latents": True},
        dataset={"validation_split": 0.34, "shuffle_caption": False, "caption_dropout_rate": 0.0},
        saving={"save_state": False, "save_state_on_train_end": False},
    )
    result = cli(["train", "lora", str(config)])
    assert result.exit_code == 0, result.output
    assert released == ["the VAE"]
    values = [r["loss/validation"] for r in metrics(out) if "loss/validation" in r]
    assert len(values) == 2 and all(math.isfinite(v) for v in values)
