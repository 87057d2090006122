"""`sdtrain caption` / `sdtrain metadata` command surface: help, light imports, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from sdtrain.errors import DataError, MissingExtraError, ModelLoadError

HEAVY = ("torch", "transformers", "onnxruntime", "numpy")


@pytest.mark.parametrize(
    "command", [["caption", "wd14"], ["caption", "blip"], ["metadata", "merge"]]
)
def test_help_is_light(command):
    code = (
        "import sys, json\n"
        f"sys.argv=['sdtrain', *{command!r}, '--help']\n"
        "from sdtrain.cli.main import run\n"
        "try:\n    run()\nexcept SystemExit:\n    pass\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]), file=sys.stderr)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert json.loads(result.stderr.strip().splitlines()[-1]) == []
    assert "--caption_extension" in result.stdout or "--full_path" in result.stdout


def test_reference_spellings_are_accepted(cli, tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(DataError, match="not found"):
        cli(
            [
                "caption",
                "wd14",
                str(tmp_path / "nothing"),
                "--repo_id",
                str(tmp_path / "m"),
                "--caption_extention",
                ".txt",
                "--general-threshold",
                "0.5",
                "--max_data_loader_n_workers",
                "1",
            ]
        )


def test_wd14_without_onnxruntime_names_the_extra(cli, tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.onnx").write_bytes(b"")
    (model / "selected_tags.csv").write_text("tag_id,name,category\n", encoding="utf-8")
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingExtraError) as info:
        cli(["caption", "wd14", str(tmp_path), "--model", str(model)])
    assert info.value.extra == "wd14"


def test_wd14_model_folder_without_files(cli, tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="lacks model.onnx and selected_tags.csv"):
        cli(["caption", "wd14", str(tmp_path), "--model", str(tmp_path / "empty")])


def test_bad_tag_replacement_is_a_config_error_with_exit_code_2(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sdtrain",
            "caption",
            "wd14",
            str(tmp_path),
            "--model",
            str(tmp_path),
            "--tag_replacement",
            "a,b,c",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "tag_replacement" in result.stderr


def test_cli_defaults_match_the_tools():
    import typer.main

    from sdtrain.cli.caption import app
    from sdtrain.tools.caption.blip import DEFAULT_MODEL, DEFAULT_PROMPT
    from sdtrain.tools.caption.wd14 import DEFAULT_REPO, Wd14Options

    commands = typer.main.get_command(app).commands
    blip = {p.name: p.default for p in commands["blip"].params}
    wd14 = {p.name: p.default for p in commands["wd14"].params}
    assert (blip["model"], blip["prompt"]) == (DEFAULT_MODEL, DEFAULT_PROMPT)
    assert wd14["model"] == DEFAULT_REPO
    assert wd14["thresh"] == Wd14Options().thresh
    assert wd14["caption_separator"] == Wd14Options().caption_separator
