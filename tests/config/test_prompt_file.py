"""Sample-prompt files: inline options, comments, TOML/JSON lists, located errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdtrain.config.prompt_file import PromptDefaults, PromptSpec, read_prompt_file
from sdtrain.errors import ConfigError


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_txt_every_option_comments_and_blank_lines(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "p.txt",
        "\n".join(
            [
                "# a comment",
                "   # an indented comment",
                "",
                "a cat, (sitting:1.2) --n blurry, low quality --w 640 --h 384 --d 42 --l 5.5"
                " --s 12 --ss euler_a",
                "a dog",
                "a bird --W 100 --H 70 --SS K_LMS",
            ]
        ),
    )
    cat, dog, bird = read_prompt_file(path)
    assert cat == PromptSpec(
        prompt="a cat, (sitting:1.2)",
        negative_prompt="blurry, low quality",
        width=640,
        height=384,
        seed=42,
        scale=5.5,
        steps=12,
        sampler="euler_a",
        index=0,
        source=f"{path}:4",
    )
    assert dog == PromptSpec(prompt="a dog", index=1, source=f"{path}:5")
    # sizes floor to multiples of 8 with a minimum of 64; flags and names are case-insensitive
    assert (bird.width, bird.height, bird.sampler, bird.index) == (96, 64, "k_lms", 2)


def test_defaults_apply_where_the_prompt_is_silent(tmp_path: Path) -> None:
    path = write(tmp_path, "p.txt", "a cat --w 256\n")
    defaults = PromptDefaults(
        negative_prompt="ugly",
        width=768,
        height=520,
        steps=20,
        scale=3.0,
        seed=7,
        sampler="dpmsolver++",
    )
    (spec,) = read_prompt_file(path, defaults)
    assert spec == PromptSpec(
        prompt="a cat",
        negative_prompt="ugly",
        width=256,
        height=520,
        steps=20,
        scale=3.0,
        seed=7,
        sampler="dpmsolver++",
        index=0,
        source=f"{path}:1",
    )


def test_prompt_piece_is_not_parsed_as_option(tmp_path: Path) -> None:
    # reference quirk: "w 100 ..." as the prompt itself set the width; not here
    (spec,) = read_prompt_file(write(tmp_path, "p.txt", "w 100 wolves --h 128\n"))
    assert (spec.prompt, spec.width, spec.height) == ("w 100 wolves", 512, 128)


def test_steps_are_clamped_like_the_reference(tmp_path: Path) -> None:
    a, b = read_prompt_file(write(tmp_path, "p.txt", "a --s 0\nb --s 5000\n"))
    assert (a.steps, b.steps) == (1, 1000)


def test_other_architecture_options_are_ignored(tmp_path: Path) -> None:
    (spec,) = read_prompt_file(write(tmp_path, "p.txt", "a cat --g 3.5 --fs 3 --l 4\n"))
    assert spec.scale == 4.0


def test_malformed_lines_report_every_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "p.txt",
        "\n".join(
            [
                "ok prompt",
                "bad width --w abc",
                "# fine",
                "no value --d",
                "unknown --x 3",
                "bad sampler --ss dpm++_2m_karras",
                "control --cn img.png",
                "bad scale --l high",
                "ok again --w 64",
            ]
        ),
    )
    with pytest.raises(ConfigError) as info:
        read_prompt_file(path)
    problems = info.value.problems
    assert [p.line for p in problems] == [2, 4, 5, 6, 7, 8]
    assert all(p.file == str(path) for p in problems)
    text = [p.message for p in problems]
    assert "--w needs a whole number" in text[0]
    assert "--d needs a value" in text[1]
    assert "unknown option '--x'" in text[2]
    assert "unknown sampler 'dpm++_2m_karras'" in text[3] and "euler_a" in text[3]
    assert "ControlNet" in text[4]
    assert "--l needs a number" in text[5]
    assert info.value.hint


def test_toml_shared_keys_merge_under_subsets(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "p.toml",
        """
[prompt]
negative_prompt = "lowres"
width = 320
sample_steps = 10
scale = 6

[[prompt.subset]]
prompt = "a cat"
seed = 1

[[prompt.subset]]
prompt = "a dog"
width = 128
height = 192
sample_sampler = "heun"
negative_prompt = "blurry"
""",
    )
    cat, dog = read_prompt_file(path)
    assert cat == PromptSpec(
        prompt="a cat",
        negative_prompt="lowres",
        width=320,
        height=512,
        steps=10,
        scale=6.0,
        seed=1,
        index=0,
        source=f"{path}:8",
    )
    assert dog == PromptSpec(
        prompt="a dog",
        negative_prompt="blurry",
        width=128,
        height=192,
        steps=10,
        scale=6.0,
        sampler="heun",
        index=1,
        source=f"{path}:12",
    )


def test_toml_errors_carry_the_subset_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "p.toml",
        """[prompt]
width = 256

[[prompt.subset]]
prompt = "fine"

[[prompt.subset]]
prompt = "bad"
seed = "abc"

[[prompt.subset]]
promt = "typo"
""",
    )
    with pytest.raises(ConfigError) as info:
        read_prompt_file(path)
    assert [(p.line, p.file) for p in info.value.problems] == [(7, str(path)), (11, str(path))]
    assert "seed must be a int" in info.value.problems[0].message
    assert "unknown key 'promt'" in info.value.problems[1].message


def test_toml_without_subsets_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="configuration problem"):
        read_prompt_file(write(tmp_path, "p.toml", 'prompt = "a cat"\n'))


def test_json_list_of_dicts_and_strings(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "p.json",
        json.dumps(
            [
                {
                    "prompt": "a cat",
                    "negative_prompt": "bad",
                    "width": 256,
                    "height": 128,
                    "scale": 4,
                    "sample_steps": 8,
                    "seed": 3,
                    "sample_sampler": "pndm",
                },
                "a dog --d 9 --ss ddpm",
            ]
        ),
    )
    cat, dog = read_prompt_file(path)
    assert cat == PromptSpec(
        prompt="a cat",
        negative_prompt="bad",
        width=256,
        height=128,
        scale=4.0,
        steps=8,
        seed=3,
        sampler="pndm",
        index=0,
        source=f"{path}: entry 1",
    )
    assert (dog.prompt, dog.seed, dog.sampler, dog.index) == ("a dog", 9, "ddpm", 1)


def test_json_errors(tmp_path: Path) -> None:
    path = write(tmp_path, "p.json", json.dumps([{"prompt": "x", "width": "wide"}, 3, {"seed": 1}]))
    with pytest.raises(ConfigError) as info:
        read_prompt_file(path)
    messages = [p.message for p in info.value.problems]
    assert messages[0].startswith("entry 1: width must be a int")
    assert messages[1].startswith("entry 2: a prompt must be a string")
    assert messages[2] == "entry 3: missing 'prompt'"
    with pytest.raises(ConfigError) as info:
        read_prompt_file(write(tmp_path, "q.json", '[{"prompt": "x",}]'))
    assert info.value.problems[0].line == 1
    with pytest.raises(ConfigError):
        read_prompt_file(write(tmp_path, "r.json", '{"prompt": "x"}'))


def test_missing_empty_and_unsupported_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="problem") as info:
        read_prompt_file(tmp_path / "nope.txt")
    assert "not found" in info.value.problems[0].message
    with pytest.raises(ConfigError) as info:
        read_prompt_file(write(tmp_path, "e.txt", "# only a comment\n\n"))
    assert "no prompts" in info.value.problems[0].message
    with pytest.raises(ConfigError) as info:
        read_prompt_file(write(tmp_path, "p.yaml", "a cat\n"))
    assert "unsupported" in info.value.problems[0].message


def test_prompt_file_module_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, sdtrain.config.prompt_file; "
        "sys.exit(1 if {'torch', 'diffusers', 'transformers'} & set(sys.modules) else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_pndm_needs_four_steps(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        read_prompt_file(write(tmp_path, "p.txt", "ok --ss pndm --s 4\nbad --ss pndm --s 3\n"))
    (problem,) = info.value.problems
    assert problem.line == 2 and "at least 4 steps" in problem.message


def test_prompt_from_text_and_bad_defaults() -> None:
    from sdtrain.config.prompt_file import prompt_from_text

    spec = prompt_from_text(" a cat --d 4 --w 128 ", PromptDefaults(scale=2.0))
    assert spec == PromptSpec(prompt="a cat", seed=4, width=128, scale=2.0, source="--prompt")
    with pytest.raises(ConfigError) as info:
        prompt_from_text("a cat --q 1")
    assert info.value.problems[0].file == "--prompt"
    with pytest.raises(ConfigError) as info:
        prompt_from_text("a cat", PromptDefaults(sampler="karras"))
    assert info.value.problems[0].key == "sample_sampler"
