"""The image + caption dataset of one ``DatasetConfig``.

Everything a user can get wrong is checked when the dataset is built, before any model is
loaded: a missing folder, a subset without images, captions that do not exist (with the
extensions that *do* exist next to the images), unreadable or truncated image files. Finding a
subset's images and captions is in ``subset_files.py``.

Sample ``i`` of an epoch is an image repeated ``num_repeats`` times: subsets in order, images
sorted by name, each image's repeats next to each other; regularisation images are repeated
to match the dataset's training samples, as sd-scripts does (``balance_reg_repeats``). Every
random draw for a sample (caption shuffle/dropout, crop, flip, colour) comes from generators seeded from
(seed, dataset name, epoch, i), so a sample is the same in every process and after a resume.
"""

from __future__ import annotations

import logging
import os
import random
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from library.data.buckets import BucketSettings, Size, assign_buckets, cover_size, crop_position, upscaled
from library.data.captions import count_tags, process_caption
from library.data.masks import has_mask, mask_files, mask_tensor
from library.data.pixels import IMAGE_EXTENSIONS, load_image, probe_image, resize_and_crop, shift_hue, to_tensor
from library.data.reg_balance import balance_reg_repeats
from library.data.sampler import derive_seed
from library.data.subset_files import LIST_LIMIT, list_images, metadata_images, side_captions, subset_images
from library.dataset_config import DatasetConfig, SubsetConfig
from library.errors import UserError

logger = logging.getLogger(__name__)

_HUE_SHIFT = 11  # color_aug: up to ±11/256 of the hue circle (about ±16°, like sd-scripts)
# An image enlarged more than this to cover its bucket (a side under 1/8 of the bucket's) trains
# on a blur of a few pixels; likely a thumbnail or a broken export, so it is named in a warning.
_TINY_UPSCALE = 8

# IMAGE_EXTENSIONS, probe_image and resize_and_crop moved to pixels.py, list_images to subset_files.py; tools
# and tests import them from here
__all__ = ["IMAGE_EXTENSIONS", "ImageCaptionDataset", "ImageRecord", "collate_fn", "list_images", "probe_image",
           "resize_and_crop"]  # fmt: skip


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    caption: str  # as read: side file, class_tokens or metadata; augmented per sample later
    size: Size  # (width, height) after EXIF orientation
    subset_index: int
    bucket: Size = (0, 0)
    mask_path: Path | None = None  # the subset's conditioning_data_dir mask (alpha_mask reads the image itself)


def _names(paths: Sequence[Path]) -> str:
    shown = ", ".join(p.name for p in paths[:LIST_LIMIT])
    return shown + (f", ... ({len(paths) - LIST_LIMIT} more)" if len(paths) > LIST_LIMIT else "")


def _probe_all(paths: list[Path]) -> list[Size | str]:
    def probe(path: Path) -> Size | str:
        try:
            return probe_image(path)
        except Exception as exc:  # noqa: BLE001 - any failure to decode means a bad file
            return f"{type(exc).__name__}: {exc}"

    # Decoding releases the GIL, so threads help on large datasets.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(probe, paths))


def _enlargement(size: Size, bucket: Size) -> float:
    """How many times an image of ``size`` is scaled up to cover ``bucket`` (below 1: scaled down)."""
    return max(bucket[0] / max(size[0], 1), bucket[1] / max(size[1], 1))


def _source(subset: SubsetConfig) -> Path:
    """Where a subset's images come from, for messages."""
    return subset.image_dir if subset.image_dir is not None else subset.metadata_file or Path()


def _validation_part(count: int, split: float, seed: int, subset_index: int) -> set[int]:
    """Indices of a subset's images held out for validation (at least one, never all)."""
    if split <= 0 or count < 2:
        return set()
    order = list(range(count))
    random.Random(derive_seed(seed, "validation", subset_index)).shuffle(order)
    return set(order[: min(count - 1, max(1, round(count * split)))])


class ImageCaptionDataset(torch.utils.data.Dataset):
    """All samples of one dataset; see the module docstring.

    ``split="validation"`` gives the images held out by ``validation_split`` (each once, no
    repeats); ``"train"`` gives the rest. ``on_bad_image="skip"`` leaves unreadable files out
    and lists them in ``skipped`` and ``summary()``; ``"error"`` stops with the list.
    """

    def __init__(self, dataset: DatasetConfig, seed: int, on_bad_image: str = "error", split: str = "train") -> None:
        if on_bad_image not in ("error", "skip"):
            raise UserError(f"--on_bad_image {on_bad_image!r}: expected 'error' or 'skip'")
        if split not in ("train", "validation"):
            raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
        self.config = dataset
        self.seed = seed
        self.split = split
        self.epoch = 0
        self.skipped: list[tuple[Path, str]] = []
        self.records = self._scan(on_bad_image)
        if split == "validation":
            self._repeats = [1] * len(self.records)  # every held-out image once, reg or not
        else:
            self._repeats = self._train_repeats()
        self._sample_record = [i for i, n in enumerate(self._repeats) for _ in range(n)]

    def _large_enough(self, subset: SubsetConfig, records: list[ImageRecord]) -> list[ImageRecord]:
        """``records`` less the images of at most skip_image_resolution's area, as sd-scripts skips them."""
        if self.config.skip_image_resolution is None:
            return records
        w, h = self.config.skip_image_resolution
        kept = [r for r in records if r.size[0] * r.size[1] > w * h]
        small = [r.path for r in records if r.size[0] * r.size[1] <= w * h]
        if small:
            logger.warning("%s: skip_image_resolution %dx%d: skipped %d image(s) of at most %d pixels: %s",
                        subset.name, w, h, len(small), w * h, _names(small))  # fmt: skip
        if records and not kept and self.split == "train":
            raise UserError(f"{subset.name}: every image in {_source(subset)} is at most {w}x{h} pixels in area, so "
                            f"skip_image_resolution = [{w}, {h}] of {self.config.name} skips them all; lower it")
        return kept

    def _train_repeats(self) -> list[int]:
        subsets = [self.config.subsets[r.subset_index] for r in self.records]
        is_reg = [s.is_reg for s in subsets]
        if is_reg and all(is_reg):
            names = ", ".join(s.name for s in self.config.subsets)
            raise UserError(
                f"{self.config.name}: every subset ({names}) has is_reg = true. Regularisation images are repeated "
                "to match the training images of the same dataset (as in sd-scripts), so with none they would "
                "never be used; add a training subset to this dataset or set is_reg = false."
            )
        return balance_reg_repeats([s.num_repeats for s in subsets], is_reg)

    def _scan(self, on_bad_image: str) -> list[ImageRecord]:
        records: list[ImageRecord] = []
        val_seed = self.config.validation_seed if self.config.validation_seed is not None else self.seed
        for index, subset in enumerate(self.config.subsets):
            if subset.metadata_file is not None:
                images, captions = metadata_images(subset)
            else:
                images = subset_images(subset)
                captions = side_captions(subset, images)
            masks: list[Path | None] = (mask_files(subset.name, images, subset.conditioning_data_dir)
                                        if subset.conditioning_data_dir is not None else [None] * len(images))
            held_out = _validation_part(len(images), self.config.validation_split, val_seed, index)
            keep = [i for i in range(len(images)) if (i in held_out) == (self.split == "validation")]
            sizes = _probe_all([images[i] for i in keep])
            bad = [(images[i], s) for i, s in zip(keep, sizes, strict=True) if isinstance(s, str)]
            if bad and on_bad_image == "error":
                listing = "; ".join(f"{p} ({why})" for p, why in bad[:LIST_LIMIT])
                raise UserError(
                    f"{subset.name}: {len(bad)} unreadable image(s): {listing}. Fix or remove them, "
                    "or pass --on_bad_image skip to train without them."
                )
            for path, why in bad:
                logger.warning("skipping unreadable image %s (%s)", path, why)
            self.skipped += bad
            good = [
                ImageRecord(images[i], captions[i], s, index, mask_path=masks[i])
                for i, s in zip(keep, sizes, strict=True)
                if not isinstance(s, str)
            ]
            if not good and keep:
                raise UserError(f"{subset.name}: every image in {_source(subset)} is unreadable")
            records += self._large_enough(subset, good)
        settings = BucketSettings(
            self.config.resolution, self.config.enable_bucket, self.config.min_bucket_reso,
            self.config.max_bucket_reso, self.config.bucket_reso_steps, self.config.bucket_no_upscale,
        )  # fmt: skip
        buckets = assign_buckets([r.size for r in records], settings)
        if settings.enable_bucket and settings.bucket_no_upscale:
            # A bucket side is at least one step, so a side under it is enlarged despite no_upscale.
            small = [r.path for r, b in zip(records, buckets, strict=True) if upscaled(r.size, b)]
            if small:
                logger.warning("%s: bucket_no_upscale, but %d image(s) have a side under bucket_reso_steps (%d px) "
                               "and are upscaled to one step: %s", self.config.name, len(small),
                               settings.bucket_reso_steps, _names(small))  # fmt: skip
        tiny = [r.path for r, b in zip(records, buckets, strict=True) if _enlargement(r.size, b) > _TINY_UPSCALE]
        if tiny:  # those also under bucket_no_upscale's step were named above, but say why they matter
            logger.warning("%s: %d image(s) are enlarged more than %dx to their bucket (a side under 1/%d of it), so "
                           "they train as a blur; replace or remove them: %s", self.config.name, len(tiny),
                           _TINY_UPSCALE, _TINY_UPSCALE, _names(tiny))  # fmt: skip
        return [
            ImageRecord(r.path, r.caption, r.size, r.subset_index, bucket, r.mask_path)
            for r, bucket in zip(records, buckets, strict=True)
        ]

    # --- indexing -------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """The epoch used by plain integer keys (keys ``(epoch, index)`` carry their own)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self._sample_record)

    @property
    def buckets(self) -> list[Size]:
        """The bucket of every sample index (for ``EpochBatchSampler``)."""
        return [self.records[r].bucket for r in self._sample_record]

    def record_of(self, index: int) -> int:
        """The index in ``records`` (the image) of sample ``index``."""
        return self._sample_record[index]

    def repeats_of(self, record_index: int) -> int:
        """Samples per epoch of an image (0 for a regularisation image left unused by balancing)."""
        return self._repeats[record_index]

    def _configured_samples(self, reg: bool) -> int:
        return sum(self.config.subsets[r.subset_index].num_repeats for r in self.records
                   if self.config.subsets[r.subset_index].is_reg == reg)

    @property
    def num_train_images(self) -> int:
        """Training images x num_repeats (reg excluded): sd-scripts' ``num_train_images``."""
        return self._configured_samples(reg=False)

    @property
    def num_reg_images(self) -> int:
        """Reg images x their configured num_repeats, before balancing: sd-scripts' ``num_reg_images``."""
        return self._configured_samples(reg=True)

    def _key(self, key: int | tuple[int, int]) -> tuple[int, int]:
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"sample index {index} out of range 0..{len(self) - 1}")
        return int(epoch), index

    def _uniforms(self, epoch: int, index: int) -> list[float]:
        # Four uniforms drawn up front, whatever is enabled, so switching one augmentation on
        # does not change the others' draws. The dataset's name is part of the seed so that
        # sample 0 of two datasets in one run does not get the same draws.
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.config.name, epoch, index, "image"))
        return torch.rand(4, generator=generator).tolist()

    def caption_item(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """Everything of a sample except the pixels (for training from cached latents)."""
        epoch, index = self._key(key)
        record = self.records[self._sample_record[index]]
        subset = self.config.subsets[record.subset_index]
        rng = random.Random(derive_seed(self.seed, self.config.name, epoch, index, "caption"))
        u_flip, u_x, u_y, _ = self._uniforms(epoch, index)
        # one decision for pixels and cached latents alike (the latent cache holds a flipped copy)
        flipped = subset.flip_aug and u_flip < 0.5
        top, left = crop_position(record.size, record.bucket, subset.random_crop, (u_x, u_y))
        if flipped:  # SDXL's crop condition describes the image the model sees: the mirrored one
            left = cover_size(record.size, record.bucket)[0] - record.bucket[0] - left
        return {
            "caption": process_caption(record.caption, subset.caption_options, rng, epoch + 1),
            "is_reg": subset.is_reg,
            "index": index,
            "image_path": str(record.path),
            "bucket": record.bucket,
            "original_size": record.size,
            "crop_top_left": (top, left),
            "flipped": flipped,
        }

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        item = self.caption_item(key)
        epoch, index = self._key(key)
        record = self.records[self._sample_record[index]]
        subset = self.config.subsets[record.subset_index]
        _, u_x, u_y, u_hue = self._uniforms(epoch, index)
        image, _ = load_image(record.path, record.bucket, subset.random_crop, (u_x, u_y), subset.resize_interpolation)
        if subset.color_aug:
            image = shift_hue(image, round((2 * u_hue - 1) * _HUE_SHIFT))
        tensor = to_tensor(image)
        if item["flipped"]:
            tensor = tensor.flip(-1)
        if has_mask(subset):
            item["mask"] = mask_tensor(record.path, record.mask_path, record.size, record.bucket, subset.random_crop,
                                       (u_x, u_y), item["flipped"])
        return {"image": tensor, **item}

    def record_mask(self, record_index: int) -> torch.Tensor | None:
        """The loss mask of an image without augmentation (what a latent cache pairs with), or None."""
        record = self.records[record_index]
        if not has_mask(self.config.subsets[record.subset_index]):
            return None
        return mask_tensor(record.path, record.mask_path, record.size, record.bucket, False, (0.0, 0.0), False)

    def record_image(self, record_index: int) -> torch.Tensor:
        """An image without augmentation (centre crop, no flip): what a latent cache encodes."""
        record = self.records[record_index]
        interpolation = self.config.subsets[record.subset_index].resize_interpolation
        image, _ = load_image(record.path, record.bucket, False, (0.0, 0.0), interpolation)
        return to_tensor(image)

    # --- reporting ------------------------------------------------------------------------

    def summary(self) -> list[str]:
        """Lines for the start-up summary: images, repeats, samples, buckets, skipped files."""
        c = self.config
        bucketing = "off" if not c.enable_bucket else (
            f"on ({c.min_bucket_reso}..{c.max_bucket_reso} step {c.bucket_reso_steps}"
            + (", no upscale)" if c.bucket_no_upscale else ")")
        )  # fmt: skip
        lines = [
            f"{c.name} ({self.split}): resolution {c.resolution[0]}x{c.resolution[1]}, "
            f"batch size {c.batch_size} per process, buckets {bucketing}"
        ]
        per_subset = Counter(r.subset_index for r in self.records)
        samples_of: Counter[int] = Counter()
        unused: Counter[int] = Counter()
        for r, n in zip(self.records, self._repeats, strict=True):
            samples_of[r.subset_index] += n
            unused[r.subset_index] += n == 0
        for i, subset in enumerate(c.subsets):
            n, repeats = per_subset[i], 1 if self.split == "validation" else subset.num_repeats
            kind = "regularisation" if subset.is_reg else "training"
            tokens = f", class_tokens {subset.class_tokens!r}" if subset.class_tokens else ""
            balanced = ""
            if subset.is_reg and self.split == "train":
                balanced = (f" -> {samples_of[i]} (reg samples balanced to the dataset's {self.num_train_images} "
                            "training samples, as sd-scripts"
                            + (f"; {unused[i]} images unused)" if unused[i] else ")"))
            lines.append(
                f"  {subset.name}: {n} {kind} images x {repeats} repeats = {n * repeats} samples{balanced} "
                f"({_source(subset)}{tokens})"
            )
        lines.append(f"  total: {len(self.records)} images, {len(self)} samples per epoch")
        samples = Counter(self.buckets)
        for (w, h), n in sorted(samples.items()):
            lines.append(f"  bucket {w}x{h}: {n} samples")
        for path, why in self.skipped:
            lines.append(f"  skipped unreadable image: {path} ({why})")
        return lines

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """Folder name → {tag: count} over the captions as read (sd-scripts' ``ss_tag_frequency``)."""
        captions: dict[str, list[str]] = {}
        separators: dict[str, str] = {}
        for record in self.records:
            subset = self.config.subsets[record.subset_index]
            # sd-scripts names a subset without image_dir by its metadata file
            name = (subset.image_dir or subset.metadata_file or Path()).name
            captions.setdefault(name, []).append(record.caption)
            separators.setdefault(name, subset.caption_separator)
        return {name: count_tags(caps, separators[name]) for name, caps in captions.items()}


def collate_fn(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack one bucket's samples into a batch (the sampler never mixes buckets)."""
    buckets = {item["bucket"] for item in items}
    if len(buckets) != 1:
        raise ValueError(f"a batch mixes buckets {sorted(buckets)}; use EpochBatchSampler")
    batch = {
        "images": torch.stack([item["image"] for item in items]),
        "captions": [item["caption"] for item in items],
        "is_reg": torch.tensor([item["is_reg"] for item in items], dtype=torch.bool),
        "indices": [item["index"] for item in items],
        "image_paths": [item["image_path"] for item in items],
        "bucket": items[0]["bucket"],
        "original_sizes": [item["original_size"] for item in items],
        "crop_top_lefts": [item["crop_top_left"] for item in items],
    }
    masks = [item.get("mask") for item in items]
    if any(mask is not None for mask in masks):  # samples of subsets without masks train everywhere
        shape = next(mask for mask in masks if mask is not None).shape
        batch["masks"] = torch.stack([torch.ones(shape) if mask is None else mask for mask in masks])
    return batch
