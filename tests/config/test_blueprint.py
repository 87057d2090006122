"""Dataset blueprint: schema, kind selection, located errors, resolution chain, legacy folders."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from sdtrain.config.blueprint import ANY_KIND, Support
from sdtrain.config.blueprint_load import dataset_blueprint, read_blueprint_file
from sdtrain.config.chain import resolve_blueprint, run_level, run_level_for, run_origins
from sdtrain.config.legacy import legacy_blueprint, parse_folder_name
from sdtrain.config.loader import load_run_config
from sdtrain.config.run import PLAN_COMMAND
from sdtrain.config.sections import DatasetSection
from sdtrain.errors import ConfigError, DataError
from sdtrain.methods.registry import command_schema

REFERENCE_EXAMPLE = """\
[general]
enable_bucket = true
shuffle_caption = true
caption_extension = ".txt"
keep_tokens = 1

[[datasets]]
resolution = 512
batch_size = 4
  [[datasets.subsets]]
  image_dir = "chara"
  class_tokens = "sks girl"
  num_repeats = 10
  [[datasets.subsets]]
  image_dir = "/data/reg_girl"
  is_reg = true
  class_tokens = "girl"

[[datasets]]
resolution = [768, 768]
  [[datasets.subsets]]
  image_dir = "/data/ft"
  metadata_file = "meta.json"
"""


def write(tmp_path: Path, text: str, name: str = "blueprint.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def golden(error: ConfigError, root: Path) -> list[str]:
    """Problems as one line each: `file:line  key: message (got value) | hint`."""
    lines = []
    for p in error.problems:
        where = p.location().replace(str(root) + "/", "")
        text = f"{where}  {p.key}: {p.message}"
        if p.has_value:
            text += f" (got {p.value!r})"
        if p.hint:
            text += f" | {p.hint}"
        lines.append(text)
    return lines


LORA = command_schema("lora").support
# the reference sanitizer's support flags per script (train_db / fine_tune / TI)
KINDS: dict[str, Support] = {
    "plan": ANY_KIND,
    "dreambooth": Support(True, False, True, "sdtrain train dreambooth"),
    "finetune": Support(False, True, True, "sdtrain train finetune"),
    "ti": Support(True, True, False, "sdtrain train ti"),
}


def problems_of(
    tmp_path: Path, text: str, command: str = "plan", name: str = "bp.toml"
) -> list[str]:
    path = write(tmp_path, text, name)
    with pytest.raises(ConfigError) as info:
        read_blueprint_file(path, KINDS[command])
    return golden(info.value, tmp_path)


def test_reference_example_validates_with_kinds_and_resolved_paths(tmp_path):
    blueprint = read_blueprint_file(write(tmp_path, REFERENCE_EXAMPLE), LORA)
    assert [d.kind for d in blueprint.datasets] == ["dreambooth", "finetune"]
    first = blueprint.datasets[0].subsets[0]
    assert first.values["image_dir"] == str((tmp_path / "chara").resolve())
    assert blueprint.datasets[0].subsets[1].values["image_dir"] == "/data/reg_girl"
    assert blueprint.datasets[1].subsets[0].values["metadata_file"] == str(tmp_path / "meta.json")
    assert str(first.origins["num_repeats"]) == "datasets[0].subsets[0] (blueprint.toml:13)"
    assert str(blueprint.general.origins["keep_tokens"]) == "[general] (blueprint.toml:5)"


def test_json_blueprint_is_equivalent_and_located(tmp_path):
    data = {
        "general": {"enable_bucket": True},
        "datasets": [{"resolution": 512, "subsets": [{"image_dir": "a", "num_repeats": 2}]}],
    }
    blueprint = read_blueprint_file(
        write(tmp_path, json.dumps(data, indent=2), "bp.json"), ANY_KIND
    )
    assert blueprint.datasets[0].subsets[0].values["num_repeats"] == 2
    bad = '{\n  "datasets": [\n    {"resolution": 512,\n     "subsets": [{"image_dir": 3}]}\n  ]\n}'
    assert problems_of(tmp_path, bad, name="bad.json") == [
        "bad.json:4  datasets[0].subsets[0].image_dir: expected a string (in quotes) (got 3)"
    ]


def test_golden_wrong_type_unknown_key_mixed_kinds_missing_image_dir(tmp_path):
    text = """\
[general]
enable_bucket = "true"
shufle_caption = true

[[datasets]]
resolution = 512
  [[datasets.subsets]]
  image_dir = "a"
  [[datasets.subsets]]
  metadata_file = "m.json"

[[datasets]]
resolution = 512
  [[datasets.subsets]]
  num_repeats = 3
"""
    assert problems_of(tmp_path, text) == [
        "bp.toml:2  general.enable_bucket: expected true or false (without quotes) (got 'true')",
        "bp.toml:3  general.shufle_caption: unknown key `shufle_caption` (got True)"
        " | did you mean `shuffle_caption`?",
        "bp.toml:5  datasets[0]: DreamBooth subsets (no metadata_file: subsets[0]) and fine-tune"
        " subsets (with metadata_file: subsets[1]) cannot be mixed in one dataset"
        " | put them into two separate [[datasets]] tables",
        "bp.toml:14  datasets[1].subsets[0].image_dir: this key is required"
        ' | add image_dir = "<folder with the images>" to this subset',
    ]


def test_golden_zero_subsets_no_datasets_and_placement_hints(tmp_path):
    text = """\
[[datasets]]
resolution = 512

[[datasets]]
image_dir = "x"
  [[datasets.subsets]]
  metadata_file = "m.json"
  class_tokens = "girl"
  prior_loss_weight = 1.0
"""
    assert problems_of(tmp_path, text) == [
        "bp.toml:1  datasets[0]: this dataset has no subsets | add a [[datasets.subsets]] table"
        ' with image_dir = "..." (or metadata_file = "..." for fine-tuning)',
        "bp.toml:5  datasets[1].image_dir: unknown key `image_dir` (got 'x')"
        " | `image_dir` can only be written in a [[datasets.subsets]] table",
        "bp.toml:8  datasets[1].subsets[0].class_tokens: unknown key `class_tokens` (got 'girl')"
        " | `class_tokens` only applies to DreamBooth subsets (subsets without metadata_file);"
        " fine-tune captions come from the metadata file",
        "bp.toml:9  datasets[1].subsets[0].prior_loss_weight: unknown key `prior_loss_weight`"
        " (got 1.0) | `prior_loss_weight` is a run option: set it in the run config's"
        " [training] table",
    ]
    assert problems_of(tmp_path, "[general]\nresolution = 512\n") == [
        "bp.toml  datasets: the blueprint has no [[datasets]] table | add [[datasets]] with at"
        " least one [[datasets.subsets]] (image_dir = ...)"
    ]


def test_strict_types_but_zero_accepted_for_floats(tmp_path):
    ok = """\
[[datasets]]
resolution = [512, 768]
validation_split = 0
  [[datasets.subsets]]
  image_dir = "a"
  caption_dropout_rate = 0
  token_warmup_step = 1
  face_crop_aug_range = [2, 4.0]
"""
    blueprint = read_blueprint_file(write(tmp_path, ok), ANY_KIND)
    values = blueprint.datasets[0].subsets[0].values
    assert values["caption_dropout_rate"] == 0 and values["face_crop_aug_range"] == [2.0, 4.0]
    bad = """\
[[datasets]]
resolution = [512]
  [[datasets.subsets]]
  image_dir = "a"
  num_repeats = "3"
  caption_dropout_rate = 1.5
  face_crop_aug_range = [4.0, 2.0]
"""
    assert problems_of(tmp_path, bad) == [
        "bp.toml:2  datasets[0].resolution: expected a whole number N or an array [width, height]"
        " of two numbers (got [512])",
        "bp.toml:5  datasets[0].subsets[0].num_repeats: expected a whole number (without quotes)"
        " (got '3')",
        "bp.toml:6  datasets[0].subsets[0].caption_dropout_rate: must be less than or equal to 1"
        " (got 1.5)",
        "bp.toml:7  datasets[0].subsets[0].face_crop_aug_range: the first number must not be"
        " larger than the second (got [4.0, 2.0])",
    ]


def test_command_support_limits_kinds_and_dropout(tmp_path):
    db = (
        "[general]\ncaption_dropout_rate = 0.1\n[[datasets]]\n  [[datasets.subsets]]\n"
        '  image_dir = "a"\n'
    )
    assert problems_of(tmp_path, db, "ti") == [
        "bp.toml:2  general.caption_dropout_rate: `caption_dropout_rate` is not supported by"
        " `sdtrain train ti` (got 0.1) | remove it (caption dropout does not apply to this method)"
    ]
    ft = '[[datasets]]\n  [[datasets.subsets]]\n  metadata_file = "m.json"\n'
    from sdtrain.config.methods import train_command_exists

    # the hint names `sdtrain train finetune` only once that command exists
    finetune = ", or `sdtrain train finetune`" if train_command_exists("finetune") else ""
    assert problems_of(tmp_path, ft, "dreambooth") == [
        "bp.toml:3  datasets[0].subsets[0].metadata_file: `sdtrain train dreambooth` cannot train"
        " fine-tune subsets (with metadata_file) (got 'm.json') | use image_dir with caption"
        " files" + finetune
    ]
    general_db = '[general]\nclass_tokens = "x"\n' + ft
    assert problems_of(tmp_path, general_db, "finetune")[0].startswith(
        "bp.toml:2  general.class_tokens: `class_tokens` is a DreamBooth key"
    )


def test_unknown_top_level_table(tmp_path):
    assert problems_of(
        tmp_path, '[genral]\n[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "a"\n'
    ) == ["bp.toml:1  genral: unknown table `genral` | did you mean [general]?"]


def test_resolution_chain_values_and_origins(tmp_path):
    run = write(
        tmp_path,
        """\
[dataset]
resolution = 640
caption_extension = "txt"
keep_tokens = 2
dataset_repeats = 5

[training]
train_batch_size = 3

[general]
shuffle_caption = true
flip_aug = false

[[datasets]]
batch_size = 2
flip_aug = true
  [[datasets.subsets]]
  image_dir = "a"
  flip_aug = false
  [[datasets.subsets]]
  image_dir = "b"
  num_repeats = 7

[[datasets]]
  [[datasets.subsets]]
  image_dir = "c"
""",
        "run.toml",
    )
    loaded = load_run_config([str(run), "--keep_tokens", "4", "--color_aug"], PLAN_COMMAND)
    blueprint = dataset_blueprint(
        loaded.config.dataset,
        loaded.config.general,
        loaded.config.datasets,
        loaded.source,
        ANY_KIND,
        run_origins(loaded),
    )
    first, second = resolve_blueprint(blueprint, run_level_for(loaded))
    a, b = first.subsets
    assert (a.values["flip_aug"], str(a.origins["flip_aug"])) == (
        False,
        "datasets[0].subsets[0] (run.toml:19)",
    )
    assert (b.values["flip_aug"], str(b.origins["flip_aug"])) == (True, "datasets[0] (run.toml:16)")
    assert (a.values["shuffle_caption"], str(a.origins["shuffle_caption"])) == (
        True,
        "[general] (run.toml:11)",
    )
    assert (a.values["keep_tokens"], str(a.origins["keep_tokens"])) == (4, "<command line>")
    assert (a.values["color_aug"], str(a.origins["color_aug"])) == (True, "<command line>")
    assert a.values["caption_extension"] == ".txt"  # the reference adds the dot
    assert str(a.origins["caption_extension"]) == "run config (run.toml:3)"
    assert (a.values["num_repeats"], str(a.origins["num_repeats"])) == (
        5,
        "run config (run.toml:5)",
    )  # dataset_repeats is num_repeats' run-level alias
    assert b.values["num_repeats"] == 7
    assert (a.values["random_crop"], str(a.origins["random_crop"])) == (False, "default")
    assert a.values["caption_separator"] == ","  # reference tuple-default bug not reproduced
    assert (first.values["batch_size"], second.values["batch_size"]) == (2, 3)
    assert str(second.origins["batch_size"]) == "run config (run.toml:8)"
    assert second.values["resolution"] == (640, 640)
    assert str(second.origins["min_bucket_reso"]) == "default"


def test_run_level_without_loader_and_missing_resolution():
    level = run_level(DatasetSection(flip_aug=True), batch_size=None)
    assert level.values == {"flip_aug": True}
    blueprint = dataset_blueprint(
        DatasetSection(), None, [{"subsets": [{"image_dir": "/x"}]}], None, ANY_KIND
    )
    with pytest.raises(ConfigError) as info:
        resolve_blueprint(blueprint, level)
    assert [p.key for p in info.value.problems] == ["datasets[0].resolution"]
    assert "--resolution 512" in info.value.problems[0].hint


def test_bucket_steps_must_be_multiple_of_64(tmp_path):
    path = write(
        tmp_path,
        "[general]\nenable_bucket = true\nbucket_reso_steps = 32\n"
        'resolution = 512\n[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "a"\n',
    )
    blueprint = read_blueprint_file(path, ANY_KIND)
    with pytest.raises(ConfigError) as info:
        resolve_blueprint(blueprint, run_level(DatasetSection()))
    assert golden(info.value, tmp_path) == [
        "blueprint.toml:3  datasets[0].bucket_reso_steps: must be a multiple of 64 for SD1/SD2"
        " models (got 32) | use 64 (the default) or 128"
    ]


def test_blueprint_with_legacy_keys_is_an_error(tmp_path):
    run = write(
        tmp_path, '[dataset]\ntrain_data_dir = "imgs"\ndataset_config = "bp.toml"\n', "run.toml"
    )
    loaded = load_run_config([str(run)], PLAN_COMMAND)
    with pytest.raises(ConfigError) as info:
        dataset_blueprint(loaded.config.dataset, None, None, loaded.source, ANY_KIND)
    assert golden(info.value, tmp_path) == [
        "run.toml:2  dataset.train_data_dir: not used together with dataset_config | describe"
        " every folder in the blueprint, or drop the blueprint and use the legacy folder keys"
    ]


def test_dataset_config_file_is_read_relative_to_run_config(tmp_path):
    (tmp_path / "cfg").mkdir()
    write(tmp_path / "cfg", '[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "imgs"\n')
    run = write(tmp_path, '[dataset]\ndataset_config = "cfg/blueprint.toml"\n', "run.toml")
    loaded = load_run_config([str(run)], PLAN_COMMAND)
    blueprint = dataset_blueprint(loaded.config.dataset, None, None, loaded.source, ANY_KIND)
    assert blueprint.datasets[0].subsets[0].values["image_dir"] == str(tmp_path / "cfg" / "imgs")


def test_parse_folder_name():
    assert parse_folder_name("20_sls frog") == (20, "sls frog")
    assert parse_folder_name("3_a_b") == (3, "a_b")
    assert parse_folder_name("5") == (5, None)
    assert parse_folder_name("images") is None


@pytest.fixture
def logs(caplog):
    """caplog that also sees the `sdtrain` logger after the CLI set propagate = False."""
    logger = logging.getLogger("sdtrain")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.WARNING)
    yield caplog
    logger.removeHandler(caplog.handler)


def test_legacy_folders(tmp_path, logs):
    train, reg = tmp_path / "train", tmp_path / "reg"
    for folder in (train / "20_sls frog", train / "2_b_c", train / "notes", reg / "1_frog"):
        folder.mkdir(parents=True)
    section = DatasetSection(train_data_dir=str(train), reg_data_dir=str(reg))
    blueprint = legacy_blueprint(section, LORA)
    assert "ignoring folder notes" in logs.text
    subsets = blueprint.datasets[0].subsets
    assert [
        (s.values["num_repeats"], s.values.get("class_tokens"), s.values["is_reg"]) for s in subsets
    ] == [(20, "sls frog", False), (2, "b_c", False), (1, "frog", True)]
    assert str(subsets[0].origins["num_repeats"]).startswith("folder name (20_sls frog)")
    resolved = resolve_blueprint(blueprint, run_level(DatasetSection(resolution=512)))
    assert resolved[0].subsets[2].values["is_reg"] is True


def test_legacy_no_data_and_in_json(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    with pytest.raises(DataError, match="No data found") as info:
        legacy_blueprint(DatasetSection(train_data_dir=str(tmp_path)), LORA)
    assert "holds 1 images directly" in info.value.message and "10_sks dog" in info.value.hint
    with pytest.raises(ConfigError, match="configuration problem"):
        legacy_blueprint(DatasetSection(), LORA)
    blueprint = legacy_blueprint(DatasetSection(in_json="/m.json", train_data_dir="/imgs"), LORA)
    subset = blueprint.datasets[0].subsets[0]
    assert blueprint.datasets[0].kind == "finetune"
    assert subset.values == {"metadata_file": "/m.json", "image_dir": "/imgs"}
    with pytest.raises(ConfigError):
        legacy_blueprint(DatasetSection(in_json="/m.json", reg_data_dir="/r"), LORA)
    with pytest.raises(ConfigError):
        legacy_blueprint(DatasetSection(in_json="/m.json"), KINDS["dreambooth"])
