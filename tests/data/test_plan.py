"""The dataset plan through the real config path: reference vectors (§14), reg balance, epoch
length, EXIF, invalid images, skipped subsets, fine-tune metadata, legacy folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from sdtrain.config.loader import load_run_config
from sdtrain.config.run import PLAN_COMMAND
from sdtrain.data.plan import Plan, plan_for_run
from sdtrain.errors import ConfigError, DataError

BUCKETS_512 = [
    (256, 832),
    (256, 896),
    (256, 960),
    (256, 1024),
    (320, 704),
    (320, 768),
    (384, 640),
    (448, 576),
    (512, 512),
    (576, 448),
    (640, 384),
    (704, 320),
    (768, 320),
    (832, 256),
    (896, 256),
    (960, 256),
    (1024, 256),
]
BUCKETS_768_HALF = [
    (256, 1024),
    (320, 1024),
    (384, 1024),
    (448, 1024),
    (512, 1024),
    (576, 960),
    (576, 1024),
    (640, 896),
    (704, 832),
    (768, 768),
]


def image(path: Path, size: tuple[int, int], orientation: int | None = None) -> Path:
    """A real, small-on-disk image file (solid JPEG, or PNG for .png names)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif.tobytes()
    Image.new("RGB", size, (90, 120, 150)).save(path, **kwargs)
    return path


def plan_of(tmp_path: Path, text: str, *flags: str) -> Plan:
    run = tmp_path / "run.toml"
    run.write_text(text, encoding="utf-8")
    return plan_for_run(load_run_config([str(run), *flags], PLAN_COMMAND))


def images_by_name(plan: Plan, dataset: int = 0) -> dict[str, object]:
    return {i.path.name: i for s in plan.datasets[dataset].subsets for i in s.images}


@pytest.mark.parametrize(
    "resolution,expected",
    [
        (512, BUCKETS_512),
        (768, sorted(set(BUCKETS_768_HALF) | {(h, w) for w, h in BUCKETS_768_HALF})),
    ],
)
def test_predefined_buckets(tmp_path, resolution, expected):
    image(tmp_path / "a" / "x.jpg", (64, 64))
    plan = plan_of(
        tmp_path,
        f"[dataset]\nresolution = {resolution}\nenable_bucket = true\n"
        '[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "a"\n',
    )
    assert plan.datasets[0].bucket_resolutions == expected
    assert len(expected) == (17 if resolution == 512 else 19)


def test_bucket_choices_reference_vectors(tmp_path):
    for name, size in {
        "a.jpg": (1024, 768),
        "b.jpg": (300, 200),
        "c.jpg": (2000, 3000),
        "d.jpg": (1920, 1080),
        "e.jpg": (512, 512),
    }.items():
        image(tmp_path / "imgs" / name, size)
    plan = plan_of(
        tmp_path,
        "[general]\nresolution = 512\nenable_bucket = true\n"
        '[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "imgs"\n',
    )
    got = {n: (i.bucket, i.resized_size) for n, i in images_by_name(plan).items()}
    assert got == {
        "a.jpg": ((576, 448), (597, 448)),
        "b.jpg": ((640, 384), (640, 427)),
        "c.jpg": ((384, 640), (427, 640)),
        "d.jpg": ((640, 384), (683, 384)),
        "e.jpg": ((512, 512), (512, 512)),
    }
    crops = {n: i.crop_ltrb for n, i in images_by_name(plan).items()}
    assert crops["e.jpg"] == (0, 0, 512, 512)
    assert {(b.resolution, b.samples, b.batches) for b in plan.datasets[0].buckets} == {
        ((384, 640), 1, 1),
        ((512, 512), 1, 1),
        ((576, 448), 1, 1),
        ((640, 384), 2, 2),
    }


def test_bucket_no_upscale_vectors(tmp_path):
    image(tmp_path / "imgs" / "a.jpg", (1024, 768))
    image(tmp_path / "imgs" / "b.jpg", (300, 200))
    image(tmp_path / "imgs" / "c.jpg", (2000, 3000))
    plan = plan_of(
        tmp_path,
        "[general]\nresolution = 512\nenable_bucket = true\n"
        "bucket_no_upscale = true\n"
        '[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "imgs"\n',
    )
    got = {n: (i.bucket, i.resized_size) for n, i in images_by_name(plan).items()}
    assert got == {
        "a.jpg": ((512, 384), (512, 384)),
        "b.jpg": ((256, 192), (300, 200)),
        "c.jpg": ((384, 576), (384, 576)),
    }
    assert plan.datasets[0].bucket_resolutions == []
    assert plan.to_json()["datasets"][0]["bucket_resolutions"] == []


def _dreambooth(tmp_path: Path, n_train: int, n_reg: int, extra: str = "") -> str:
    for i in range(n_train):
        image(tmp_path / "train" / f"t{i:02d}.png", (64, 64))
    for i in range(n_reg):
        image(tmp_path / "reg" / f"r{i:03d}.png", (64, 64))
    return (
        f"[dataset]\nresolution = 64\n{extra}\n[[datasets]]\n  [[datasets.subsets]]\n"
        '  image_dir = "train"\n  num_repeats = 10\n  class_tokens = "sks dog"\n'
        '  [[datasets.subsets]]\n  image_dir = "reg"\n  is_reg = true\n'
        '  class_tokens = "dog"\n'
    )


def test_reg_balance_fewer_reg_samples(tmp_path):
    plan = plan_of(tmp_path, _dreambooth(tmp_path, 10, 30))
    reg = plan.datasets[0].subsets[1].images
    assert [i.num_repeats for i in reg] == [4] * 10 + [3] * 20
    dataset = plan.datasets[0]
    assert (dataset.num_train_images, dataset.num_reg_images) == (100, 100)
    assert dataset.num_reg_images_requested == 30


def test_reg_balance_more_reg_samples_uses_a_prefix(tmp_path):
    plan = plan_of(tmp_path, _dreambooth(tmp_path, 10, 300))
    reg = plan.datasets[0].subsets[1].images
    assert [i.num_repeats for i in reg] == [1] * 100 + [0] * 200
    assert any("200 of 300 regularization images are not used" in w for w in plan.warnings)
    doc = plan.to_json()["datasets"][0]
    assert doc["num_reg_images"] == 100
    unused = [i for i in doc["images"] if i["is_reg"] and i["num_repeats"] == 0]
    assert len(unused) == 200 and unused[0]["path"].endswith("r100.png")


def test_epoch_length_and_step_totals(tmp_path):
    text = _dreambooth(tmp_path, 10, 100, "[training]\ntrain_batch_size = 4")
    plan = plan_of(tmp_path, text)
    assert plan.batches_per_epoch == 50  # (100 train + 100 reg) / 4, one bucket
    assert plan.steps.steps_per_epoch == 50
    plan = plan_of(tmp_path, text, "--gradient_accumulation_steps", "3", "--max_train_steps", "100")
    assert (plan.steps.steps_per_epoch, plan.steps.num_epochs, plan.steps.total_steps) == (
        17,
        6,
        100,
    )
    plan = plan_of(
        tmp_path,
        text,
        "--gradient_accumulation_steps",
        "3",
        "--max_train_steps",
        "100",
        "--max_train_epochs",
        "2",
    )
    assert (plan.steps.num_epochs, plan.steps.total_steps) == (2, 34)  # epochs win


def test_epoch_length_sums_ceil_per_bucket_and_dataset(tmp_path):
    for i in range(5):
        image(tmp_path / "a" / f"w{i}.jpg", (1024, 768))
    for i in range(3):
        image(tmp_path / "a" / f"t{i}.jpg", (768, 1024))
    plan = plan_of(
        tmp_path,
        "[general]\nresolution = 512\nenable_bucket = true\nbatch_size = 2\n"
        '[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "a"\n'
        '[[datasets]]\nbatch_size = 4\n  [[datasets.subsets]]\n  image_dir = "a"\n'
        "  num_repeats = 3\n",
    )
    first, second = plan.datasets
    assert first.batches == 3 + 2  # ceil(5/2) + ceil(3/2)
    assert second.batches == 4 + 3  # ceil(15/4) + ceil(9/4)
    assert plan.batches_per_epoch == 12


def test_exif_rotated_photo_trains_upright(tmp_path):
    image(tmp_path / "a" / "phone.jpg", (1024, 768), orientation=6)
    plan = plan_of(
        tmp_path,
        "[general]\nresolution = 512\nenable_bucket = true\n"
        '[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "a"\n',
    )
    entry = images_by_name(plan)["phone.jpg"]
    assert (entry.original_size, entry.bucket, entry.resized_size) == (
        (768, 1024),
        (448, 576),
        (448, 597),
    )
    assert entry.exif_transpose is True


def test_invalid_images_are_listed_and_gate_training(tmp_path):
    image(tmp_path / "a" / "good.png", (64, 64))
    (tmp_path / "a" / "empty.png").write_bytes(b"")
    data = image(tmp_path / "x.png", (64, 64)).read_bytes()
    (tmp_path / "a" / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "a" / "nocap.png").write_bytes(data)
    (tmp_path / "a" / "nocap.caption").write_text("")  # empty caption file
    text = '[dataset]\nresolution = 64\n[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "a"\n'
    plan = plan_of(tmp_path, text)
    reasons = {b.path.name: b.reason for b in plan.invalid_images()}
    assert reasons["empty.png"] == "empty file (0 bytes)"
    assert reasons["cut.png"].startswith("truncated PNG")
    # an empty caption file trains with an empty caption, as in the reference (one warning)
    assert "nocap.png" not in reasons
    assert list(images_by_name(plan)) == ["good.png", "nocap.png"]
    assert images_by_name(plan)["nocap.png"].caption == ""
    assert [w for w in plan.warnings if "1 caption file(s) are empty" in w]
    with pytest.raises(DataError) as info:
        plan.require_valid()
    assert "2 image(s) cannot be used" in info.value.message and "empty.png" in info.value.message
    assert "skip_invalid_images = true" in info.value.hint
    plan_of(tmp_path, text, "--skip_invalid_images").require_valid()


def test_skipped_subsets_and_no_data(tmp_path):
    image(tmp_path / "a" / "x.png", (64, 64))
    (tmp_path / "empty").mkdir()
    plan = plan_of(
        tmp_path,
        "[dataset]\nresolution = 64\n[[datasets]]\n"
        '  [[datasets.subsets]]\n  image_dir = "a"\n  num_repeats = 0\n'
        '  [[datasets.subsets]]\n  image_dir = "missing"\n'
        '  [[datasets.subsets]]\n  image_dir = "empty"\n',
    )
    assert plan.datasets[0].skipped == [
        "datasets[0].subsets[0]: num_repeats = 0 (< 1)",
        f"datasets[0].subsets[1]: image_dir {tmp_path / 'missing'} does not exist",
        f"datasets[0].subsets[2]: no images (.png .jpg .jpeg .webp .bmp) in {tmp_path / 'empty'}",
    ]
    assert plan.steps is None and plan.batches_per_epoch == 0
    with pytest.raises(DataError, match="No data found"):
        plan.require_valid()
    dup = plan_of(
        tmp_path,
        "[dataset]\nresolution = 64\n[[datasets]]\n"
        '  [[datasets.subsets]]\n  image_dir = "a"\n'
        '  [[datasets.subsets]]\n  image_dir = "a"\n  num_repeats = 5\n'
        '[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "a"\n',
    )
    assert dup.datasets[0].skipped == [
        f"datasets[0].subsets[1]: same image_dir as datasets[0].subsets[0] ({tmp_path / 'a'})"
    ]
    assert dup.datasets[1].skipped == []  # the same folder in another dataset is fine


def test_captions_class_token_fallback_and_tag_frequency(tmp_path):
    image(tmp_path / "a" / "one.png", (64, 64))
    image(tmp_path / "a" / "two.png", (64, 64))
    (tmp_path / "a" / "one.txt").write_text("Red hat, smile\nsecond line\n")
    plan = plan_of(
        tmp_path,
        '[dataset]\nresolution = 64\ncaption_extension = "txt"\n'
        '[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "a"\n'
        '  class_tokens = "sks"\n',
    )
    entries = images_by_name(plan)
    assert (entries["one.png"].caption, entries["one.png"].has_caption_file) == (
        "Red hat, smile",
        True,
    )
    assert (entries["two.png"].caption, entries["two.png"].has_caption_file) == ("sks", False)
    assert plan.datasets[0].subsets[0].missing_captions == 1
    assert plan.tag_frequency() == {"a": {"red hat": 1, "smile": 1, "sks": 1}}


def test_finetune_metadata_trusts_sizes_and_resolves_stems(tmp_path):
    folder = tmp_path / "ft"
    folder.mkdir()
    (folder / "trusted.png").write_bytes(b"")  # never opened: its size comes from the metadata
    image(folder / "read.jpg", (300, 200))
    (tmp_path / "meta.json").write_text(
        json.dumps(
            {
                "trusted": {"caption": "a", "tags": "x, y", "image_size": [1024, 768]},
                "read.jpg": {"tags": "y"},
                "gone": {"caption": "c"},
            }
        )
    )
    plan = plan_of(
        tmp_path,
        "[general]\nresolution = 512\nenable_bucket = true\n"
        '[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "ft"\n'
        '  metadata_file = "meta.json"\n  num_repeats = 2\n',
    )
    entries = images_by_name(plan)
    assert (entries["trusted.png"].caption, entries["trusted.png"].bucket) == ("a,x, y", (576, 448))
    assert (entries["read.jpg"].caption, entries["read.jpg"].bucket) == ("y", (640, 384))
    assert [b.path.name for b in plan.invalid_images()] == ["gone"]
    assert plan.datasets[0].kind == "finetune" and plan.datasets[0].num_train_images == 4
    assert plan.tag_frequency() == {"meta.json": {"x": 1, "y": 2}}


def test_legacy_folders_plan(tmp_path):
    image(tmp_path / "train" / "5_sks dog" / "a.png", (64, 64))
    image(tmp_path / "reg" / "1_dog" / "r.png", (64, 64))
    plan = plan_of(
        tmp_path, '[dataset]\ntrain_data_dir = "train"\nreg_data_dir = "reg"\nresolution = 64\n'
    )
    train, reg = plan.datasets[0].subsets
    assert (train.num_repeats, train.images[0].caption, train.is_reg) == (5, "sks dog", False)
    assert (reg.images[0].caption, reg.images[0].num_repeats, reg.is_reg) == ("dog", 5, True)
    assert train.origins["num_repeats"].startswith("folder name (5_sks dog)")


def test_bucket_limits_are_normalised_or_rejected(tmp_path):
    image(tmp_path / "a" / "x.jpg", (64, 64))
    body = '[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "a"\n'
    plan = plan_of(
        tmp_path,
        "[general]\nresolution = 512\nenable_bucket = true\n"
        f"min_bucket_reso = 250\nmax_bucket_reso = 1000\n{body}",
    )
    assert any("min_bucket_reso 250 is not a multiple" in w for w in plan.warnings)
    assert min(plan.datasets[0].bucket_resolutions)[0] == 192
    with pytest.raises(ConfigError) as info:
        plan_of(
            tmp_path,
            f"[general]\nresolution = 512\nenable_bucket = true\nmin_bucket_reso = 640\n{body}",
        )
    problem = info.value.problems[0]
    assert (problem.key, problem.line, problem.value) == ("datasets[0].min_bucket_reso", 4, 640)


def test_face_crop_range_is_dropped_with_bucketing(tmp_path):
    image(tmp_path / "a" / "x.jpg", (64, 64))
    plan = plan_of(
        tmp_path,
        "[general]\nresolution = 512\nenable_bucket = true\n"
        "face_crop_aug_range = [2.0, 4.0]\n"
        '[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "a"\n',
    )
    assert plan.datasets[0].subsets[0].params["face_crop_aug_range"] is None
    assert any("face_crop_aug_range only works without bucketing" in w for w in plan.warnings)


def test_plan_is_deterministic_and_writes_info_cache(tmp_path):
    text = _dreambooth(tmp_path, 4, 9, "cache_info = true")
    first = plan_of(tmp_path, text).to_json()
    assert first == plan_of(tmp_path, text).to_json()
    assert not (tmp_path / "train" / "metadata_cache.json").exists()  # the plan only reads
    run = load_run_config([str(tmp_path / "run.toml")], PLAN_COMMAND)
    plan_for_run(run, write_caches=True)
    assert (tmp_path / "train" / "metadata_cache.json").exists()
    assert plan_of(tmp_path, text).to_json() == first
