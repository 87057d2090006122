"""Run-config loading: strict types, located problems, flags and precedence."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdtrain.config.loader import load_run_config
from sdtrain.config.run import PLAN_COMMAND
from sdtrain.errors import ConfigError
from sdtrain.methods.registry import command_schema

LORA = command_schema("lora")


def write(tmp_path: Path, text: str, name: str = "run.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(args: list[str], command: str = "lora") -> list:
    with pytest.raises(ConfigError) as info:
        load_run_config(args, LORA if command == "lora" else command_schema(command))
    return info.value.problems


def test_every_problem_reported_at_once_with_lines(tmp_path):
    path = write(
        tmp_path,
        """
[model]
clip_skip = "2"

[training]
max_train_step = 10
mixed_precision = "fp32"

[optimizer]
learning_rate = "3e-4"
""",
    )
    problems = {p.key: p for p in problems_of([str(path)])}
    assert set(problems) == {
        "model.clip_skip",
        "training.max_train_step",
        "training.mixed_precision",
        "optimizer.learning_rate",
    }
    assert problems["model.clip_skip"].line == 3
    assert problems["model.clip_skip"].value == "2"
    assert "whole number" in problems["model.clip_skip"].message
    assert problems["training.max_train_step"].line == 6
    assert problems["training.max_train_step"].hint == "did you mean `max_train_steps`?"
    assert "'no', 'fp16' or 'bf16'" in problems["training.mixed_precision"].message
    assert problems["optimizer.learning_rate"].line == 10
    assert all(p.file == str(path) for p in problems.values())


def test_int_accepted_for_float_but_bool_strings_rejected(tmp_path):
    path = write(
        tmp_path, '[optimizer]\nlearning_rate = 0\n[training]\ngradient_checkpointing = "true"\n'
    )
    problems = problems_of([str(path)])
    assert [p.key for p in problems] == ["training.gradient_checkpointing"]
    assert problems[0].line == 4


def test_key_in_wrong_table_and_foreign_method_table(tmp_path):
    path = write(tmp_path, "learning_rate = 1.0\n[dreambooth]\nx = 1\n[optimiser]\n")
    problems = {p.key: p for p in problems_of([str(path)])}
    assert "move it under [optimizer]" in problems["learning_rate"].hint
    assert "sdtrain train dreambooth" in problems["dreambooth"].message
    assert problems["dreambooth"].line == 2
    assert problems["optimiser"].hint == "did you mean [optimizer]?"


def test_flags_override_file_and_record_origin(tmp_path):
    path = write(tmp_path, "[optimizer]\nlearning_rate = 1e-4\n[training]\nseed = 3\n")
    loaded = load_run_config(
        [
            str(path),
            "--learning-rate=5e-4",
            "--gradient_checkpointing",
            "--no-flip_aug",
            "--resolution",
            "512,768",
        ],
        LORA,
    )
    cfg = loaded.config
    assert cfg.optimizer.learning_rate == 5e-4
    assert cfg.training.gradient_checkpointing is True
    assert cfg.dataset.flip_aug is False
    assert cfg.dataset.resolution == [512, 768]
    assert cfg.training.seed == 3
    assert loaded.origin("optimizer", "learning_rate") == "<command line>"
    assert loaded.origin("training", "seed") == "run.toml:4"
    assert loaded.origin("training", "max_train_steps") == "default"


def test_config_path_may_follow_flags_and_list_flags(tmp_path):
    path = write(tmp_path, "")
    loaded = load_run_config(
        ["--optimizer_args", "weight_decay=0.1", "betas=0.9,0.99", str(path)],
        LORA,
    )
    assert loaded.config.optimizer.optimizer_args == ["weight_decay=0.1", "betas=0.9,0.99"]
    assert loaded.source is not None and loaded.source.path == path


def test_unknown_and_bad_flags(tmp_path):
    problems = problems_of(["--lerning_rate", "1", "--max_train_steps", "many", "--seed"])
    by_key = {p.key: p for p in problems}
    assert by_key["lerning_rate"].hint == "did you mean --learning_rate?"
    assert by_key["training.max_train_steps"].value == "many"
    assert "needs a value" in by_key["training.seed"].message


def test_relative_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    sub = tmp_path / "cfg"
    sub.mkdir()
    path = write(
        sub, '[dataset]\ndataset_config = "data/ds.toml"\n[training]\noutput_dir = "out"\n'
    )
    monkeypatch.chdir(tmp_path)
    cfg = load_run_config([str(path), "--logging_dir", "logs"], LORA).config
    assert cfg.dataset.dataset_config == str((sub / "data/ds.toml").resolve())
    assert cfg.training.output_dir == str((sub / "out").resolve())
    assert cfg.logging.logging_dir == str(tmp_path / "logs")


def test_toml_syntax_error_has_line_and_column(tmp_path):
    path = write(tmp_path, "[training]\nseed = = 3\n")
    problems = problems_of([str(path)])
    assert problems[0].line == 2 and problems[0].column is not None
    assert "syntax" in problems[0].message


def test_cross_field_rules(tmp_path):
    path = write(tmp_path, "[training]\nadaptive_noise_scale = 0.1\nfull_fp16 = true\n")
    problems = problems_of([str(path)])
    assert problems[0].key == "training"
    assert "adaptive_noise_scale needs noise_offset" in problems[0].message


def test_inline_blueprint_and_dataset_config_exclusive(tmp_path):
    path = write(
        tmp_path, '[dataset]\ndataset_config = "x.toml"\n[general]\nshuffle_caption = true\n'
    )
    problems = problems_of([str(path)])
    assert "either inline" in problems[0].message


def test_plan_accepts_any_method_table(tmp_path):
    path = write(tmp_path, "[network]\nnetwork_dim = 8\n[general]\nresolution = 512\n")
    loaded = load_run_config([str(path)], PLAN_COMMAND)
    assert loaded.config.general == {"resolution": 512}


def test_resume_path_resolves_against_the_file_but_auto_stays(tmp_path):
    path = write(tmp_path, '[saving]\nresume = "out/x-state"\n')
    assert load_run_config([str(path)], LORA).config.saving.resume == str(
        (tmp_path / "out/x-state").resolve()
    )
    auto = write(tmp_path, '[saving]\nresume = "auto"\n', "auto.toml")
    assert load_run_config([str(auto)], LORA).config.saving.resume == "auto"
    assert load_run_config(["--resume", "auto"], LORA).config.saving.resume == "auto"
