"""`sdtrain train dreambooth` / `train finetune` end to end on the tiny random model.

What is trained (and what is not), every save format read back by diffusers with tensors equal to
the live weights, the source file's extra keys, the text-encoder stop, exact resume, class-image
generation and the bad-input refusals (exit 2 with key and line).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from full_runs import DB, FT, _tiny_config
from safetensors.torch import load_file, save_file


def _changed(box: dict, part: str) -> int:
    module = getattr(box["bundle"], part)
    return sum(
        not torch.equal(p.detach(), box["before"][f"{part}.{name}"])
        for name, p in module.named_parameters()
    )


def _assert_equal_to_live(pipe, bundle) -> None:
    for part in ("unet", "vae", "text_encoder"):
        theirs = getattr(pipe, part).state_dict()
        ours = getattr(bundle, part).state_dict()
        for key, value in ours.items():
            if key.endswith("position_ids"):
                continue
            assert torch.equal(theirs[key].float(), value.float()), (part, key)


def test_dreambooth_trains_unet_and_text_encoder(run_dir, cli, captured):
    result = cli(["train", "dreambooth", str(run_dir / "db.toml")])
    assert result.exit_code == 0, result.output
    out = run_dir / "out"
    # builtin source (a diffusers model): the reference default is a diffusers folder
    assert (out / "db" / "model_index.json").is_file()
    assert (out / "db-step00000002" / "unet").is_dir()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert {"lr/unet", "lr/text_encoder"} <= set(records[0])
    assert records[0]["lr/text_encoder"] == pytest.approx(1e-4)
    unet_total = sum(1 for _ in captured["bundle"].unet.parameters())
    assert _changed(captured, "unet") > 0.9 * unet_total
    assert _changed(captured, "text_encoder") > 0
    assert _changed(captured, "vae") == 0

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(out / "db"), local_files_only=True)
    _assert_equal_to_live(pipe, captured["bundle"])


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors", "diffusers", "diffusers_safetensors"])
def test_every_format_reads_back_in_diffusers(run_dir, cli, captured, fmt):
    from diffusers import StableDiffusionPipeline

    args = ["train", "finetune", str(run_dir / "ft.toml"), "--save_model_as", fmt]
    result = cli([*args, "--train_text_encoder", "--save_precision", "float"])
    assert result.exit_code == 0, result.output
    out = run_dir / "out"
    bundle = captured["bundle"]
    assert _changed(captured, "text_encoder") > 0
    if fmt in ("ckpt", "safetensors"):
        path = out / f"ft.{fmt}"
        pipe = StableDiffusionPipeline.from_single_file(
            str(path),
            config=_tiny_config(),
            local_files_only=True,
            tokenizer=bundle.tokenizer,
            safety_checker=None,
            requires_safety_checker=False,
        )
        if fmt == "ckpt":
            loaded = torch.load(path, weights_only=True)  # tensors and ints only
            assert set(loaded) == {"state_dict", "epoch", "global_step"}
            assert loaded["global_step"] == 3
    else:
        folder = out / "ft"
        weights = "diffusion_pytorch_model." + ("safetensors" if "safe" in fmt else "bin")
        assert (folder / "unet" / weights).is_file()
        pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    _assert_equal_to_live(pipe, bundle)


def test_finetune_without_cache_and_frozen_text_encoder(run_dir, cli, captured):
    result = cli(["train", "finetune", str(run_dir / "ft.toml")])
    assert result.exit_code == 0, result.output
    assert _changed(captured, "unet") > 0
    assert _changed(captured, "text_encoder") == 0
    records = (run_dir / "out" / "metrics.jsonl").read_text().splitlines()
    assert len(records) == 3 and "lr/text_encoder" not in json.loads(records[0])


def test_finetune_with_cached_latents(run_dir, cli, captured):
    result = cli(["train", "finetune", str(run_dir / "ft.toml"), "--cache_latents"])
    assert result.exit_code == 0, result.output
    assert _changed(captured, "unet") > 0


def test_single_file_source_keeps_its_extra_keys(run_dir, cli, tiny_source):
    result = cli(
        [
            "train",
            "dreambooth",
            str(run_dir / "db.toml"),
            "--pretrained_model_name_or_path",
            str(tiny_source),
            "--use_safetensors",
            "--save_precision",
            "bf16",
        ]
    )
    assert result.exit_code == 0, result.output
    written = load_file(run_dir / "out" / "db.safetensors")  # single-file source + use_safetensors
    assert torch.equal(written["model_ema.decay"], torch.tensor(0.9999))
    assert written["model_ema.decay"].dtype == torch.float32  # extras keep their dtype
    unet_key = "model.diffusion_model.out.2.weight"
    assert written[unet_key].dtype == torch.bfloat16
    source = load_file(tiny_source)
    assert not torch.equal(written[unet_key].float(), source[unet_key].bfloat16().float())


@pytest.fixture
def tiny_source(tmp_path: Path) -> Path:
    from sdtrain.models.builtin import load_builtin
    from sdtrain.models.save import save_single_file

    path = save_single_file(load_builtin("builtin:tiny-sd1"), tmp_path / "src.safetensors")
    state = load_file(path)
    state["model_ema.decay"] = torch.tensor(0.9999)
    save_file(state, str(path))
    return path


def _last_weights(out: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(out / name)


def test_resume_is_exact_with_text_encoder_stop_and_ema(run_dir, cli):
    extra = [
        "--save_model_as",
        "safetensors",
        "--stop_text_encoder_training",
        "3",
        "--ema_decay",
        "0.5",
        "--save_state",
    ]
    straight = cli(["train", "dreambooth", str(run_dir / "db.toml"), *extra])
    assert straight.exit_code == 0, straight.output
    out = run_dir / "out"
    full = _last_weights(out, "db.safetensors")
    full_ema = _last_weights(out, "db-ema.safetensors")
    step2 = _last_weights(out, "db-step00000002.safetensors")
    state = out / "db-step00000002-state"
    assert state.is_dir()
    # the text encoder stops after step 3: steps 3 and 4 differ only by one TE update
    te = [k for k in full if k.startswith("cond_stage_model.")]
    assert any(not torch.equal(full[k], step2[k]) for k in te)
    resumed_dir = run_dir / "resumed"
    resumed = cli(
        [
            "train",
            "dreambooth",
            str(run_dir / "db.toml"),
            *extra,
            "--output_dir",
            str(resumed_dir),
            "--resume",
            str(state),
        ]
    )
    assert resumed.exit_code == 0, resumed.output
    again = _last_weights(resumed_dir, "db.safetensors")
    again_ema = _last_weights(resumed_dir, "db-ema.safetensors")
    assert all(torch.equal(full[k], again[k]) for k in full)
    assert all(torch.equal(full_ema[k], again_ema[k]) for k in full_ema)
    assert any(not torch.equal(full[k], full_ema[k]) for k in full)


def test_text_encoder_frozen_from_step_n(run_dir, cli):
    args = ["train", "dreambooth", str(run_dir / "db.toml"), "--save_model_as", "safetensors"]
    result = cli([*args, "--stop_text_encoder_training", "2"])
    assert result.exit_code == 0, result.output
    out = run_dir / "out"
    step2, final = load_file(out / "db-step00000002.safetensors"), load_file(out / "db.safetensors")
    te = [k for k in final if k.startswith("cond_stage_model.")]
    unet = [k for k in final if k.startswith("model.diffusion_model.")]
    assert all(torch.equal(step2[k], final[k]) for k in te)  # frozen after step 2
    assert any(not torch.equal(step2[k], final[k]) for k in unet)


def test_generate_uses_the_saved_model(run_dir, cli):
    args = ["train", "dreambooth", str(run_dir / "db.toml"), "--save_model_as", "safetensors"]
    assert cli(args).exit_code == 0
    model = run_dir / "out" / "db.safetensors"
    gen = ["generate", "--model", str(model), "--prompt", "shs pattern", "--steps", "2"]
    result = cli([*gen, "--width", "64", "--height", "64", "--seed", "1", "--out", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert list(run_dir.glob("*.png"))


def _exit_2(run_dir: Path, command: str, text: str, key: str, expect_line: str | None) -> None:
    bad = run_dir / "bad.toml"
    bad.write_text(text)
    env = {**os.environ, "SDTRAIN_NO_REEXEC": "1", "COLUMNS": "400"}
    proc = subprocess.run(
        [sys.executable, "-m", "sdtrain", "train", command, str(bad), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=run_dir,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert key in proc.stderr, proc.stderr
    if expect_line is not None:
        line = text.splitlines().index(expect_line) + 1
        assert f"bad.toml:{line}" in proc.stderr, proc.stderr


def test_finetune_dataset_is_refused_by_dreambooth(run_dir):
    subset = '[[datasets.subsets]]\nmetadata_file = "imgs/meta.json"\nimage_dir = "imgs"\n'
    text = DB.split("[[datasets]]")[0] + "[[datasets]]\n" + subset
    _exit_2(run_dir, "dreambooth", text, "metadata_file", 'metadata_file = "imgs/meta.json"')


def test_dreambooth_dataset_is_refused_by_finetune(run_dir):
    text = FT.split("[[datasets]]")[0] + '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "imgs"\n'
    _exit_2(run_dir, "finetune", text, "metadata_file", None)


def test_stop_text_encoder_training_past_the_end(run_dir):
    text = DB.replace("[dreambooth]\n", "[dreambooth]\nstop_text_encoder_training = 99\n")
    _exit_2(
        run_dir,
        "dreambooth",
        text,
        "dreambooth.stop_text_encoder_training",
        "stop_text_encoder_training = 99",
    )


def test_num_class_images_needs_class_prompt(run_dir):
    keys = 'class_data_dir = "reg"\nnum_class_images = 4\n'
    text = DB.replace("[dreambooth]\n", "[dreambooth]\n" + keys)
    _exit_2(run_dir, "dreambooth", text, "dreambooth.num_class_images", "num_class_images = 4")


def test_unknown_save_format(run_dir):
    text = DB.replace("[dreambooth]\n", '[dreambooth]\nsave_model_as = "pt"\n')
    _exit_2(run_dir, "dreambooth", text, "dreambooth.save_model_as", 'save_model_as = "pt"')


def test_no_token_padding_is_refused_by_name(run_dir):
    text = DB.replace("[dreambooth]\n", "[dreambooth]\nno_token_padding = true\n")
    _exit_2(run_dir, "dreambooth", text, "dreambooth.no_token_padding", "no_token_padding = true")


def test_lora_learning_rates_are_refused(run_dir):
    text = DB.replace("learning_rate = 1e-3\n", "learning_rate = 1e-3\ntext_encoder_lr = 1e-4\n")
    _exit_2(run_dir, "dreambooth", text, "optimizer.text_encoder_lr", "text_encoder_lr = 1e-4")


def test_fused_backward_needs_a_per_weight_optimizer(run_dir):
    text = DB.replace(
        "[optimizer]\n", '[optimizer]\nfused_backward_pass = true\noptimizer_type = "Prodigy"\n'
    )
    key = "optimizer.fused_backward_pass"
    _exit_2(run_dir, "dreambooth", text, key, "fused_backward_pass = true")


def test_adamw_fused_backward_trains_bit_identically_to_its_plain_step(run_dir, cli, captured):
    """AdamW updated weight by weight during backward gives the weights of its normal step (no
    clipping: the fused pass clips per weight, the normal step by the global norm)."""
    args = ["train", "dreambooth", str(run_dir / "db.toml"), "--max_grad_norm", "0"]
    finals = {}
    for fused in (False, True):
        out = run_dir / f"out-{fused}"
        flags = ["--output_dir", str(out), *(["--fused_backward_pass"] if fused else [])]
        result = cli([*args, *flags])
        assert result.exit_code == 0, result.output
        assert _changed(captured, "unet") > 0 and _changed(captured, "text_encoder") > 0
        bundle = captured["bundle"]
        finals[fused] = {
            f"{part}.{name}": p.detach().clone()
            for part in ("unet", "text_encoder")
            for name, p in getattr(bundle, part).named_parameters()
        }
    assert finals[False].keys() == finals[True].keys()
    assert all(torch.equal(finals[False][k], finals[True][k]) for k in finals[False])


def test_full_bf16_with_adamw_is_refused(run_dir):
    text = DB.replace("seed = 3\n", 'seed = 3\nmixed_precision = "bf16"\nfull_bf16 = true\n')
    _exit_2(run_dir, "dreambooth", text, "training.full_bf16", "full_bf16 = true")


def test_adafactor_fused_backward_trains_end_to_end(run_dir, cli, captured):
    args = ["train", "dreambooth", str(run_dir / "db.toml"), "--optimizer_type", "Adafactor"]
    result = cli([*args, "--fused_backward_pass", "--gradient_checkpointing"])
    assert result.exit_code == 0, result.output
    assert _changed(captured, "unet") > 0 and _changed(captured, "text_encoder") > 0
    records = (run_dir / "out" / "metrics.jsonl").read_text().splitlines()
    assert len(records) == 4 and all("nonfinite" not in line for line in records)


def test_a_compiled_dreambooth_run_is_the_eager_one_bit_for_bit(run_dir, cli):
    """torch_compile (aot_eager) with the full U-Net and text encoder trained, gradient
    checkpointing, EMA and the text encoder frozen from step 3 on (its graphs recompile)."""
    extra = ["--save_model_as", "safetensors", "--gradient_checkpointing"]
    extra += ["--stop_text_encoder_training", "3", "--ema_decay", "0.5"]
    finals = {}
    for compiled in (False, True):
        out = run_dir / f"out-{compiled}"
        flags = ["--torch_compile", "--dynamo_backend", "aot_eager"] if compiled else []
        result = cli(
            ["train", "dreambooth", str(run_dir / "db.toml"), *extra, "--output_dir", str(out)]
            + flags
        )
        assert result.exit_code == 0, result.output
        assert ("torch.compile: aot_eager, 2 module(s)" in " ".join(result.output.split())) is (
            compiled
        )
        finals[compiled] = (
            _last_weights(out, "db.safetensors"),
            _last_weights(out, "db-ema.safetensors"),
        )
    for eager, compiled in zip(finals[False], finals[True], strict=True):
        assert eager.keys() == compiled.keys()
        assert all(torch.equal(eager[k], compiled[k]) for k in eager)
