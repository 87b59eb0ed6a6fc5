"""Which images a subset has and their captions, as read from disk (before any augmentation).

A DreamBooth subset: the images directly in ``image_dir``, captioned by side files or
``class_tokens``. A fine-tuning subset: the images and captions of sd-scripts' metadata JSON.
Errors say what was found instead (other caption extensions, images one folder further down).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from library.data.captions import (
    caption_extension_hint,
    caption_path,
    other_caption_extensions,
    read_caption_file,
    read_utf8,
)
from library.data.folder_layout import REPEATS_FOLDER
from library.data.pixels import IMAGE_EXTENSIONS
from library.dataset_config import SubsetConfig
from library.errors import UserError

# The dataset's warnings keep one logger name (library.data.images), wherever in it they are raised.
logger = logging.getLogger("library.data.images")

LIST_LIMIT = 10  # how many file names an error message lists


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (extension case-insensitive), sorted by name."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def subset_images(subset: SubsetConfig) -> list[Path]:
    folder = subset.image_dir
    assert folder is not None  # only metadata_file subsets may leave image_dir out
    if not folder.is_dir():
        raise UserError(
            f"{subset.name}: image_dir {folder} does not exist (resolved to {folder.absolute()}; "
            "relative paths start from the current directory)"
        )
    images = list_images(folder)
    if not images:
        if nested := _image_subfolders(folder):
            raise UserError(_nested_images_message(subset, nested))
        others = sorted({p.suffix.lower() or p.name for p in folder.iterdir() if p.is_file()})
        found = f"; files found: {', '.join(others[:LIST_LIMIT])}" if others else "; the folder is empty"
        raise UserError(f"{subset.name}: no images in {folder} (looked for {', '.join(IMAGE_EXTENSIONS)}){found}")
    return images


def _image_subfolders(folder: Path) -> dict[Path, int]:
    """Subfolders of ``folder`` that hold images, with their image counts."""
    found = {p: len(list_images(p)) for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith(".")}
    return {p: n for p, n in found.items() if n}


def _nested_images_message(subset: SubsetConfig, nested: dict[Path, int]) -> str:
    """image_dir names the parent of the images' folders, often kohya's N_name layout; say what to write instead."""
    listing = ", ".join(f"{p.name}/ ({n} images)" for p, n in list(nested.items())[:LIST_LIMIT])
    head = f"{subset.name}: image_dir {subset.image_dir} holds no images itself, only subfolders with images: {listing}"
    kohya = {p: REPEATS_FOLDER.match(p.name) for p in nested}
    kohya = {p: m for p, m in kohya.items() if m and int(m.group(1)) >= 1}
    if subset.name.startswith("--"):  # a --train_data_dir N_name folder: images are not searched for below it
        return f"{head}. Move the images up into {subset.image_dir}; subfolders are not read."
    if not kohya:
        return f"{head}. image_dir is not searched recursively: point it at the folder with the images."
    path, match = next(iter(kohya.items()))
    return (f"{head}. These are N_name folders (N = repeats, name = class tokens) of the --train_data_dir layout; "
            f'image_dir must be the folder with the images: image_dir = "{path.as_posix()}" with num_repeats = '
            f'{int(match.group(1))} and class_tokens = "{match.group(2)}" (one [[datasets.subsets]] per folder), '
            f"or drop --dataset_config and pass --train_data_dir {subset.image_dir} for the folder layout.")


def side_captions(subset: SubsetConfig, images: list[Path]) -> list[str]:
    """Captions from side files, else class_tokens; missing both is an error with a hint.

    Images that fall back to class_tokens while files with another caption-like extension sit
    next to them are almost always a wrong caption_extension, so that gets a warning.
    """
    captions: list[str] = []
    missing: list[Path] = []
    for image in images:
        caption = read_caption_file(caption_path(image, subset.caption_extension), all_lines=subset.enable_wildcard)
        if caption is None:
            missing.append(image)
            caption = subset.class_tokens
        captions.append(caption if caption is not None else "")
    found = other_caption_extensions(missing, subset.caption_extension) if missing else None
    if missing and subset.class_tokens is None:
        raise UserError(
            f"{subset.name}: {len(missing)} of {len(images)} images in {subset.image_dir} have no caption file "
            f'"{subset.caption_extension}" (e.g. {caption_path(missing[0], subset.caption_extension).name}) and '
            "the subset has no class_tokens." + (f" {caption_extension_hint(found)}." if found else "")
            + " Or set class_tokens to caption every image without a caption file with it."
        )  # fmt: skip
    if found:
        logger.warning('%s: %d of %d images in %s have no caption file "%s" and are captioned with class_tokens '
                       "%r only; %s", subset.name, len(missing), len(images), subset.image_dir,
                       subset.caption_extension, subset.class_tokens, caption_extension_hint(found))  # fmt: skip
    return captions


def metadata_images(subset: SubsetConfig) -> tuple[list[Path], list[str]]:
    """Images and captions of a fine-tuning subset (sd-scripts' metadata JSON: key → caption/tags)."""
    path = subset.metadata_file
    assert path is not None
    if not path.is_file():
        raise UserError(f"{subset.name}: metadata_file {path} not found")
    try:
        data = json.loads(read_utf8(path))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, dict) or not data:
        raise UserError(f'{path}: expected a JSON object mapping image names to {{"caption": ..., "tags": ...}}')
    images, captions, missing_image, missing_caption = [], [], [], []
    for key, entry in sorted(data.items()):
        image = _locate_image(key, subset.image_dir)
        entry = entry if isinstance(entry, dict) else {}
        caption, tags = entry.get("caption"), entry.get("tags")
        if caption and tags:
            caption = f"{caption}, {tags}"  # sd-scripts appends the tags to the caption
        caption = caption or tags
        if image is None:
            missing_image.append(key)
        elif not isinstance(caption, str):
            missing_caption.append(key)
        else:
            images.append(image)
            captions.append(caption)
    if missing_image:
        where = f"in {subset.image_dir}" if subset.image_dir is not None else (
            f"(without image_dir, a name must be an image path, absolute or relative to {Path.cwd()})"
        )  # fmt: skip
        raise UserError(
            f"{path}: {len(missing_image)} entries name no image {where}: {', '.join(missing_image[:LIST_LIMIT])}"
        )
    if missing_caption:
        raise UserError(
            f'{path}: {len(missing_caption)} entries have neither "caption" nor "tags": '
            f"{', '.join(missing_caption[:LIST_LIMIT])}"
        )
    return images, captions


def _locate_image(key: str, image_dir: Path | None) -> Path | None:
    """As sd-scripts: the key as a path (absolute or from the current directory), then a name in image_dir."""
    candidates = [Path(key)]
    if image_dir is not None:
        candidates.append(image_dir / key)
        candidates += [image_dir / (key + ext) for ext in IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS)]
    return next((c for c in candidates if c.suffix.lower() in IMAGE_EXTENSIONS and c.is_file()), None)
