"""DreamBooth class images (prior preservation the paper's way): fill a folder before training.

With `class_prompt` and `num_class_images`, `class_data_dir` is filled up to that many images made
by the base model itself with sdtrain's own sampler. Image i is named `class-<i:05d>.png` and is
generated from seed `derive_seed(class_seed, "class-image", i)`, so generation is resumable: an
interrupted fill restarts at the first missing index and produces the same images a straight run
would. Images already in the folder (any name) count towards the total and are never touched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sdtrain.data.scan import find_images

if TYPE_CHECKING:
    from sdtrain.config.methods import DreamBoothSection
    from sdtrain.models.bundle import ModelBundle

log = logging.getLogger(__name__)

NAME = "class-{index:05d}.png"


@dataclass(frozen=True)
class ClassImagePlan:
    """How many class images exist and which indices will be generated."""

    folder: Path
    wanted: int
    present: int
    indices: tuple[int, ...]  # the class-XXXXX indices to generate

    @property
    def to_generate(self) -> int:
        return len(self.indices)

    def describe(self) -> str:
        """One line for the plan view."""
        if not self.indices:
            return f"class images: {self.present} present in {self.folder} (>= {self.wanted})"
        return (
            f"class images: {self.to_generate} will be generated into {self.folder} before "
            f"training ({self.present} present, {self.wanted} wanted)"
        )


def plan_class_images(section: DreamBoothSection) -> ClassImagePlan | None:
    """What a fill would do now (None when the run generates no class images)."""
    if section.num_class_images is None or section.class_data_dir is None:
        return None
    folder = Path(section.class_data_dir)
    images = find_images(folder)
    names = {p.name for p in images}
    missing = section.num_class_images - len(images)
    indices: list[int] = []
    index = 0
    while len(indices) < missing:
        if NAME.format(index=index) not in names:
            indices.append(index)
        index += 1
    return ClassImagePlan(folder, section.num_class_images, len(images), tuple(indices))


def fill_class_images(
    bundle: ModelBundle,
    section: DreamBoothSection,
    plan: ClassImagePlan,
    clip_skip: int | None = None,
) -> list[Path]:
    """Generate the planned images one by one (each written atomically as soon as it exists)."""
    import io

    from sdtrain.atomic import write_bytes
    from sdtrain.config.prompt_file import PromptSpec
    from sdtrain.log import progress
    from sdtrain.models.sampling import generate_images
    from sdtrain.seeds import derive_seed

    if not plan.indices:
        return []
    assert section.class_prompt is not None
    plan.folder.mkdir(parents=True, exist_ok=True)
    size = section.class_resolution or bundle.family.resolution
    specs = [
        PromptSpec(
            prompt=section.class_prompt,
            width=size,
            height=size,
            steps=section.class_sample_steps,
            scale=section.class_guidance_scale,
            seed=derive_seed(section.class_seed, "class-image", index) % 2**32,
            sampler=section.class_sampler,
            index=index,
            source="dreambooth.class_prompt",
        )
        for index in plan.indices
    ]
    written: list[Path] = []
    log.info("generating %d class images into %s", len(specs), plan.folder)
    with progress() as bar:
        task = bar.add_task("class images", total=len(specs), info="")

        def save(item) -> None:  # noqa: ANN001 - GeneratedImage
            path = plan.folder / NAME.format(index=item.spec.index)
            buffer = io.BytesIO()
            item.image.save(buffer, format="PNG")
            write_bytes(path, buffer.getvalue())
            written.append(path)
            bar.update(task, advance=1)

        generate_images(bundle, specs, clip_skip=clip_skip, progress=save)
    return written
