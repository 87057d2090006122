"""Legacy dataset mode (no blueprint): `<repeats>_<tokens>` folders, or in_json fine-tuning.

Reference behaviour kept: each immediate sub-folder `20_sls frog` of train_data_dir is one subset
with 20 repeats and class tokens "sls frog" (underscores after the first are kept); reg_data_dir
works the same with `is_reg`. Differences: folders are taken in sorted name order (the reference
uses the file system's order), and a train_data_dir without `N_name` folders raises a DataError that
says what to do instead of printing "No data found" and exiting quietly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from sdtrain.config.blueprint import Support
from sdtrain.config.sections import DatasetSection
from sdtrain.config.tables import Blueprint, DatasetTables, Origin, TableRef
from sdtrain.errors import ConfigError, DataError, Problem

log = logging.getLogger(__name__)

OriginOf = Callable[[str, str], Origin]


def parse_folder_name(name: str) -> tuple[int, str | None] | None:
    """'20_sls frog' -> (20, 'sls frog'); '5' -> (5, None); 'images' -> None (no subset)."""
    head, sep, rest = name.partition("_")
    try:
        repeats = int(head)
    except ValueError:
        return None
    return repeats, (rest if sep and rest else None)


def _folder_subsets(
    parent: Path, is_reg: bool, key: str, first_index: int, origin: Origin
) -> list[TableRef]:
    subsets: list[TableRef] = []
    for folder in sorted(p for p in parent.iterdir() if p.is_dir()):
        if folder.name.startswith("."):
            continue
        parsed = parse_folder_name(folder.name)
        if parsed is None:
            log.warning(
                "ignoring folder %s in %s: its name does not start with <repeats>_ "
                "(e.g. 10_sks dog)",
                folder.name,
                key,
            )
            continue
        repeats, tokens = parsed
        named = Origin("folder name", str(folder))
        label = f"datasets[0].subsets[{first_index + len(subsets)}]"
        values: dict[str, object] = {
            "image_dir": str(folder.resolve()),
            "num_repeats": repeats,
            "is_reg": is_reg,
        }
        origins = {"image_dir": origin, "num_repeats": named, "is_reg": origin}
        if tokens is not None:
            values["class_tokens"] = tokens
            origins["class_tokens"] = named
        subsets.append(TableRef(label=label, values=values, origins=origins, origin=named))
    return subsets


# the image suffixes of data/scan.py (config may not import the data layer)
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _no_data(train_dir: Path) -> DataError:
    loose = sum(1 for p in train_dir.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    detail = f" It holds {loose} images directly." if loose else ""
    return DataError(
        f"No data found in train_data_dir {train_dir}: it has no <repeats>_<name> folders.{detail}",
        hint=f"move the images into a sub-folder such as '{train_dir / '10_sks dog'}' "
        "(10 repeats, caption 'sks dog' for images without a caption file), or use a "
        "dataset blueprint (dataset_config)",
    )


def legacy_blueprint(
    section: DatasetSection, support: Support, origin_of: OriginOf | None = None
) -> Blueprint:
    """The one-dataset blueprint of legacy mode, from train_data_dir / reg_data_dir / in_json."""
    locate = origin_of or (lambda _t, key: Origin("run config"))
    general = TableRef(label="[general]")
    if section.in_json:
        return _finetune(section, support, locate, general)
    if not section.train_data_dir:
        raise ConfigError(
            [Problem(key="dataset", message="no dataset given")],
            hint="set dataset_config (a blueprint file), write [[datasets]] tables, "
            "or set train_data_dir in [dataset]",
        )
    if not support.dreambooth:
        raise ConfigError(
            [
                Problem(
                    key="dataset.train_data_dir",
                    message=f"`{support.title}` needs in_json (metadata) with train_data_dir",
                )
            ],
            hint="set in_json, or use a dataset blueprint with metadata_file",
        )
    train_dir = Path(section.train_data_dir)
    if not train_dir.is_dir():
        raise DataError(
            f"train_data_dir does not exist: {train_dir}",
            hint="check the path (relative paths are taken from the run config's folder)",
        )
    subsets = _folder_subsets(
        train_dir, False, "train_data_dir", 0, locate("dataset", "train_data_dir")
    )
    if not subsets:
        raise _no_data(train_dir)
    if section.reg_data_dir:
        reg_dir = Path(section.reg_data_dir)
        if not reg_dir.is_dir():
            raise DataError(
                f"reg_data_dir does not exist: {reg_dir}",
                hint="check the path, or remove reg_data_dir",
            )
        reg = _folder_subsets(
            reg_dir, True, "reg_data_dir", len(subsets), locate("dataset", "reg_data_dir")
        )
        if not reg:
            log.warning(
                "reg_data_dir %s has no <repeats>_<class> folders; no regularization "
                "images are used",
                reg_dir,
            )
        subsets.extend(reg)
    table = TableRef(label="datasets[0]", origin=locate("dataset", "train_data_dir"))
    return Blueprint(
        general=general,
        source=f"legacy folders {train_dir}",
        datasets=[DatasetTables(index=0, kind="dreambooth", table=table, subsets=subsets)],
    )


def _finetune(
    section: DatasetSection, support: Support, locate: OriginOf, general: TableRef
) -> Blueprint:
    problems = []
    if not support.finetune:
        problems.append(
            Problem(
                key="dataset.in_json",
                message=f"`{support.title}` cannot train from a metadata file (in_json)",
                hint="use <repeats>_<name> folders or image_dir subsets",
            )
        )
    if section.reg_data_dir:
        problems.append(
            Problem(
                key="dataset.reg_data_dir",
                message="reg_data_dir is not used in fine-tune mode (in_json)",
                hint="remove reg_data_dir, or use a blueprint with a DreamBooth "
                "dataset for the regularization images",
            )
        )
    if problems:
        raise ConfigError(problems)
    assert section.in_json is not None
    values: dict[str, object] = {"metadata_file": section.in_json}
    origins = {"metadata_file": locate("dataset", "in_json")}
    if section.train_data_dir:
        values["image_dir"] = section.train_data_dir
        origins["image_dir"] = locate("dataset", "train_data_dir")
    subset = TableRef(
        label="datasets[0].subsets[0]",
        values=values,
        origins=origins,
        origin=origins["metadata_file"],
    )
    table = TableRef(label="datasets[0]", origin=origins["metadata_file"])
    return Blueprint(
        general=general,
        source=f"legacy metadata {section.in_json}",
        datasets=[DatasetTables(index=0, kind="finetune", table=table, subsets=[subset])],
    )
