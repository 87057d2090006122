"""DreamBooth class images: planned counts, seeded per index, resumable, existing images kept."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from sdtrain.config.methods import DreamBoothSection
from sdtrain.tools.class_images import fill_class_images, plan_class_images


def _section(folder: Path, count: int) -> DreamBoothSection:
    return DreamBoothSection(
        class_prompt="a pattern",
        class_data_dir=str(folder),
        num_class_images=count,
        class_sample_steps=2,
        class_resolution=64,
        class_seed=5,
    )


def test_fill_is_resumable_and_keeps_existing_images(tmp_path):
    from sdtrain.models.builtin import load_builtin

    bundle = load_builtin("builtin:tiny-sd1")
    folder = tmp_path / "class"
    folder.mkdir()
    mine = folder / "mine.jpg"
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(mine)
    before = mine.read_bytes()
    section = _section(folder, 4)
    plan = plan_class_images(section)
    assert plan is not None and plan.present == 1 and plan.indices == (0, 1, 2)
    assert "3 will be generated" in plan.describe()
    written = fill_class_images(bundle, section, plan)
    assert [p.name for p in written] == ["class-00000.png", "class-00001.png", "class-00002.png"]
    first = {p.name: p.read_bytes() for p in written}
    assert len(set(first.values())) == 3  # each index has its own seed
    # an interrupted fill: image 1 is missing; the rerun makes exactly it, identical
    (folder / "class-00001.png").unlink()
    again = plan_class_images(section)
    assert again is not None and again.indices == (1,)
    fill_class_images(bundle, section, again)
    assert (folder / "class-00001.png").read_bytes() == first["class-00001.png"]
    assert mine.read_bytes() == before
    done = plan_class_images(section)
    assert done is not None and done.indices == () and done.present == 4
    assert not list(folder.glob(".*"))  # no temporary files left
