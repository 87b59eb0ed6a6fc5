"""The legacy dataset layout: ``--train_data_dir`` / ``--reg_data_dir`` holding ``N_name`` subfolders.

As in sd-scripts, ``10_sks dog`` is a subset with 10 repeats captioned "sks dog" where an image
has no caption file; a subfolder not named so (``sample/``, ``logs/``) or with 0 repeats is
skipped with a warning. ``--train_data_dir`` with ``--in_json`` is sd-scripts' fine-tuning
layout: the folder's images captioned by a metadata JSON.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from library.dataset_config import (
    ANY_LEVEL_KEYS,
    DATASET_KEYS,
    DatasetConfig,
    DatasetDefaults,
    DatasetGroupConfig,
    SubsetConfig,
    check_buckets,
    cli_origin,
)
from library.errors import UserError

logger = logging.getLogger(__name__)

REPEATS_FOLDER = re.compile(r"^(\d+)_(.*)$")


def folder_layout_config(defaults: DatasetDefaults) -> DatasetGroupConfig:
    """One dataset from the ``N_name`` subfolders of train_data_dir (and reg_data_dir, is_reg)."""
    if defaults.train_data_dir is None:
        raise UserError("Give --train_data_dir (a folder of N_name subfolders) or --dataset_config.")
    root = Path(defaults.train_data_dir)
    if defaults.in_json is not None:
        subsets = [_metadata_subset(defaults)]
    else:
        subsets = _folder_subsets(root, "--train_data_dir", False, defaults)
    if defaults.reg_data_dir is not None:
        if defaults.in_json is not None:
            raise UserError("--reg_data_dir is for DreamBooth folders; a fine-tuning dataset (--in_json) has no "
                            "regularisation images. Remove one of them.")
        subsets += _folder_subsets(Path(defaults.reg_data_dir), "--reg_data_dir", True, defaults)
    dataset = DatasetConfig(
        subsets=tuple(subsets), name="--train_data_dir", **{k: getattr(defaults, k) for k in DATASET_KEYS}
    )
    # Every value here is from the command line, --config_file or a default: the message says which.
    check_buckets(dataset, lambda key: cli_origin(key, defaults.sources),
                  lambda message: UserError(f"--train_data_dir {root}: {message}"))
    return DatasetGroupConfig(datasets=(dataset,), source="--train_data_dir")


def _metadata_subset(defaults: DatasetDefaults) -> SubsetConfig:
    """--train_data_dir + --in_json: every image of the folder captioned by sd-scripts' metadata JSON."""
    root = Path(defaults.train_data_dir)
    if not root.is_dir():
        raise UserError(f"--train_data_dir {root}: folder not found")
    if defaults.dataset_repeats < 1:
        raise UserError(f"--dataset_repeats {defaults.dataset_repeats}: expected 1 or more")
    any_level = {k: getattr(defaults, k) for k in ANY_LEVEL_KEYS}
    any_level["num_repeats"] = defaults.dataset_repeats
    return SubsetConfig(image_dir=root, metadata_file=Path(defaults.in_json), name="--in_json", **any_level)


def _folder_subsets(root: Path, option: str, is_reg: bool, defaults: DatasetDefaults) -> list[SubsetConfig]:
    if not root.is_dir():
        raise UserError(f"{option} {root}: folder not found")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    subsets, skipped = [], []
    for folder in folders:
        match = REPEATS_FOLDER.match(folder.name)
        if match is None or int(match.group(1)) < 1:
            skipped.append(folder.name + ("" if match is None else " (0 repeats)"))
            continue
        any_level = {k: getattr(defaults, k) for k in ANY_LEVEL_KEYS}
        any_level["num_repeats"] = int(match.group(1))
        any_level["class_tokens"] = match.group(2) or None
        subsets.append(SubsetConfig(image_dir=folder, is_reg=is_reg, name=f"{option}/{folder.name}", **any_level))
    example = "(N = repeats >= 1, name = class tokens), e.g. 10_sks dog"
    if not subsets:
        found = f"found only {', '.join(skipped)}" if skipped else "it has no subfolders" + _loose_images(root)
        fine_tune = "; or, for images captioned by sd-scripts' fine-tuning metadata JSON, pass it as --in_json"
        raise UserError(f"{option} {root}: no N_name subfolder {example}; {found}. Put the images in such a "
                        f"subfolder{fine_tune if not is_reg else ''}")
    if skipped:  # sd-scripts skips these too ("ignore directory without repeats")
        logger.warning("%s %s: skipped %d subfolder(s) not named N_name %s: %s", option, root, len(skipped),
                       example, ", ".join(skipped))
    return subsets


def _loose_images(root: Path) -> str:
    from library.data.pixels import IMAGE_EXTENSIONS  # imported here: pixels brings PIL and torch

    count = sum(1 for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    return f" ({count} images lie directly in it)" if count else ""
