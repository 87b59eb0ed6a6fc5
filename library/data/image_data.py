"""The image data of a run: every dataset of the TOML, one epoch order, one DataLoader.

Datasets are concatenated; a sample's bucket key includes its dataset, so a batch never
mixes datasets or buckets. Sample indices are global across datasets, and they key every
per-sample random draw (CONTRACTS.md §3). Optional latent caching encodes every image once
(with flip_aug also its mirror image, as sd-scripts does), in memory or in files next to the images.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from library.data.images import ImageCaptionDataset, collate_fn
from library.data.masks import to_latent_grid
from library.data.pixels import resize_filter
from library.data.sampler import EpochBatchSampler
from library.dataset_config import DatasetGroupConfig, SubsetConfig
from library.errors import UserError
from library.fileio import atomic_save_safetensors


class _Concat(torch.utils.data.Dataset):
    """Datasets side by side; keys are (epoch, global sample index)."""

    def __init__(self, parts: list[ImageCaptionDataset]) -> None:
        self.parts = parts
        self.offsets = []
        total = 0
        for part in parts:
            self.offsets.append(total)
            total += len(part)
        self.total = total
        # (dataset, image) -> latent, and its mirror image's latent for flip_aug subsets
        self.latents: dict[tuple[int, int], torch.Tensor] | None = None
        self.flipped_latents: dict[tuple[int, int], torch.Tensor] = {}
        # (dataset, image) -> loss mask on the latent grid, for subsets with masks (--masked_loss)
        self.masks: dict[tuple[int, int], torch.Tensor] = {}

    def __len__(self) -> int:
        return self.total

    def locate(self, index: int) -> tuple[int, int]:
        for i in range(len(self.parts) - 1, -1, -1):
            if index >= self.offsets[i]:
                return i, index - self.offsets[i]
        raise IndexError(index)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        part_index, local = self.locate(index)
        part = self.parts[part_index]
        if self.latents is not None:
            item = part.caption_item((epoch, local))
            job = (part_index, part.record_of(local))
            # the same per-sample flip decision as the pixel path (caption_item draws it)
            item["latents"] = self.flipped_latents[job] if item["flipped"] else self.latents[job]
            if job in self.masks:  # the mirror image's mask is the mirrored mask, on the latent grid too
                item["mask"] = self.masks[job].flip(-1) if item["flipped"] else self.masks[job]
        else:
            item = part[(epoch, local)]
        item["index"] = index
        item["bucket"] = (part_index, *item["bucket"])
        return item


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    latents = [item.pop("latents", None) for item in items]
    if latents[0] is not None:
        for item in items:
            item["image"] = torch.empty(0)
    batch = collate_fn(items)
    batch["indices"] = torch.tensor(batch["indices"], dtype=torch.long)
    if latents[0] is not None:
        batch.pop("images")
        batch["latents"] = torch.stack(latents)
    return batch


@dataclass
class ImageData:
    """What the loop needs: a loader whose batches follow ``sampler``'s epoch order."""

    datasets: list[ImageCaptionDataset]
    concat: _Concat
    sampler: EpochBatchSampler
    loader: torch.utils.data.DataLoader
    batch_size: int
    resolution: tuple[int, int]
    validation_loader: torch.utils.data.DataLoader | None = None  # images held out by validation_split

    @property
    def num_train_images(self) -> int:
        """ss_num_train_images: training images x num_repeats, reg excluded (as sd-scripts)."""
        return sum(d.num_train_images for d in self.datasets)

    @property
    def num_reg_images(self) -> int:
        """ss_num_reg_images: reg images x their configured num_repeats, before balancing (as sd-scripts)."""
        return sum(d.num_reg_images for d in self.datasets)

    def summary(self) -> str:
        return "\n".join(line for d in self.datasets for line in d.summary())

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for d in self.datasets:
            out.update(d.tag_frequency())
        return out

    def content_digest(self) -> str:
        """Changes when an image is added, removed, replaced or recaptioned (compared on resume)."""
        from library.resume_check import data_digest

        return data_digest([(f"{d.config.name}/{r.path.name}", r.path.stat().st_size, r.caption)
                            for d in self.datasets for r in d.records])

    def metadata(self) -> list[dict[str, Any]]:
        """ss_datasets: per dataset sd-scripts' fields, from what this run scanned (no absolute paths).

        ``img_count`` and ``bucket_info`` are the images and buckets training uses (unreadable images
        skipped, validation images held out); library/train_metadata.py derives ``ss_dataset_dirs`` and
        the legacy layout's flat keys from these dictionaries.
        """
        return [_dataset_metadata(d) for d in self.datasets]

    @torch.no_grad()
    def cache_latents(self, encode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], batch_size: int,
                      device: torch.device, *, to_disk: bool = False, vae_fingerprint: str = "",
                      num_processes: int = 1, rank: int = 0, barrier: Callable[[], None] | None = None) -> None:
        """Encode every used image once (and its mirror image for flip_aug, as sd-scripts does).

        random_crop and color_aug change the pixels every epoch and are refused. In memory, every
        process encodes every image (no process waits on another). With ``to_disk``, each process
        encodes its share into per-image files next to the images, which are reused until the image,
        its bucket or the VAE changes (a file holds the flipped latent too once flip_aug asked for
        it, so one file serves runs with and without flip_aug); then all load them.
        """
        for part in self.datasets:
            for subset in part.config.subsets:
                if subset.random_crop or subset.color_aug:
                    raise UserError(f"{subset.name}: --cache_latents cannot be combined with random_crop or "
                                    "color_aug (they change the pixels every epoch); drop one of them "
                                    "(flip_aug works: a flipped latent is cached too).")
        # regularisation images that balancing left unused are never read, so never encoded
        jobs = [(p, r) for p, part in enumerate(self.datasets) for r in range(len(part.records)) if part.repeats_of(r)]
        cache: dict[tuple[int, int], torch.Tensor] = {}
        flipped: dict[tuple[int, int], torch.Tensor] = {}
        if to_disk:
            mine = [job for i, job in enumerate(jobs) if i % num_processes == rank]
            stored = {job: self._load_cached(job, vae_fingerprint) or {} for job in mine}
            for job, tensors in stored.items():
                if "latent" in tensors:
                    cache[job] = tensors["latent"]
                if "latent_flipped" in tensors and self._flips(job):
                    flipped[job] = tensors["latent_flipped"]
            todo = [job for job in mine if job not in cache]
            todo_flip = [job for job in mine if self._flips(job) and job not in flipped]
            self._encode(todo, encode, batch_size, device, cache, flip=False)
            self._encode(todo_flip, encode, batch_size, device, flipped, flip=True)
            for job in dict.fromkeys(todo + todo_flip):
                # a flipped latent already in the file is kept for later runs with flip_aug
                both = {"latent": cache[job], **({"latent_flipped": flipped[job]} if job in flipped else {})}
                self._save_cached(job, {**stored[job], **both}, vae_fingerprint)
            if barrier is not None:
                barrier()  # every share is on disk before anyone reads the others'
            for job in jobs:
                if job in cache and (job in flipped or not self._flips(job)):
                    continue  # this process's share, already in memory
                tensors = self._load_cached(job, vae_fingerprint) or {}
                if "latent" not in tensors or (self._flips(job) and "latent_flipped" not in tensors):
                    raise UserError(f"latent cache of {self._record(job).path} is missing after caching; "
                                    "is the image folder writable and shared by every process?")
                cache[job] = tensors["latent"]
                if self._flips(job):
                    flipped[job] = tensors["latent_flipped"]
        else:
            self._encode(jobs, encode, batch_size, device, cache, flip=False)
            self._encode([job for job in jobs if self._flips(job)], encode, batch_size, device, flipped, flip=True)
        self.concat.latents = cache
        self.concat.flipped_latents = flipped
        self.concat.masks = self._latent_masks(jobs, cache)
        self.loader = _make_loader(self.concat, self.sampler, 0, False)

    def _latent_masks(self, jobs: list[tuple[int, int]],
                      latents: dict[tuple[int, int], torch.Tensor]) -> dict[tuple[int, int], torch.Tensor]:
        """Each masked image's loss mask averaged onto its latent grid, as the uncached loss averages it: read
        from the images (or mask files) each run, which costs a decode, not a VAE pass."""
        masks = {}
        for job in jobs:
            mask = self.datasets[job[0]].record_mask(job[1])
            if mask is not None:
                masks[job] = to_latent_grid(mask[None], tuple(latents[job].shape[-2:]))[0]
        return masks

    def _record(self, job: tuple[int, int]):
        return self.datasets[job[0]].records[job[1]]

    def _flips(self, job: tuple[int, int]) -> bool:
        return self.datasets[job[0]].config.subsets[self._record(job).subset_index].flip_aug

    @staticmethod
    def _seed_key(job: tuple[int, int], flip: bool) -> int:
        # keyed on (dataset, image), so a cached latent is the same whatever the epoch; the mirror
        # image gets its own (negative) key so its VAE sample is drawn independently
        key = job[1] + 1_000_000 * job[0]
        return -(key + 1) if flip else key

    def _encode(self, jobs: list[tuple[int, int]], encode: Callable, batch_size: int, device: torch.device,
                cache: dict[tuple[int, int], torch.Tensor], *, flip: bool) -> None:
        by_bucket: dict[tuple, list[tuple[int, int]]] = {}
        for job in jobs:
            by_bucket.setdefault((job[0], self._record(job).bucket), []).append(job)
        step = max(batch_size, 1)
        for group in by_bucket.values():
            for start in range(0, len(group), step):
                chunk = group[start:start + step]
                images = torch.stack([self.datasets[p].record_image(r) for p, r in chunk])
                if flip:
                    images = images.flip(-1)  # exactly the pixels the uncached path feeds for a flipped sample
                keys = torch.tensor([self._seed_key(job, flip) for job in chunk])
                try:
                    latents = encode(images.to(device), keys).cpu()
                except UserError as e:
                    if hasattr(e, "with_paths"):  # name the images, not batch positions
                        raise e.with_paths([str(self._record(job).path) for job in chunk]) from None
                    raise
                for job, latent in zip(chunk, latents, strict=True):
                    cache[job] = latent

    def _cache_file(self, job: tuple[int, int]) -> Path:
        record = self._record(job)
        w, h = record.bucket
        # An image listed twice (two subsets or datasets) is two samples with their own VAE draws (seed_key):
        # the later ones get a numbered file, or the two would take turns writing one file (and, with several
        # processes, each reject the other's).
        copy = self._copy_number(job)
        return record.path.with_name(f"{record.path.stem}_{w}x{h}{f'.{copy}' if copy else ''}.latent.safetensors")

    def _copy_number(self, job: tuple[int, int]) -> int:
        """0 for the first record of an image and bucket, 1, 2, ... for later records of the same."""
        numbers = getattr(self, "_copy_numbers", None)
        if numbers is None:
            numbers, seen = {}, {}
            for p, part in enumerate(self.datasets):
                for r, record in enumerate(part.records):
                    key = (record.path, record.bucket)
                    numbers[(p, r)] = seen.get(key, 0)
                    seen[key] = numbers[(p, r)] + 1
            self._copy_numbers = numbers
        return numbers[job]

    def _cache_key(self, job: tuple[int, int], vae_fingerprint: str) -> dict[str, str]:
        # Whether the file holds a flipped latent is told by its tensor names, not by this key, so a
        # file written with flip_aug stays valid without it, and one written without gets the flip added.
        record = self._record(job)
        digest = hashlib.sha256(record.path.read_bytes()).hexdigest()[:32]
        key = {"image_sha256": digest, "bucket": f"{record.bucket[0]}x{record.bucket[1]}", "vae": vae_fingerprint,
               "seed_key": str(self._seed_key(job, False)), "seed": str(self.datasets[job[0]].seed)}
        # Another resize filter gives other pixels. Only a filter other than the default is named, so files
        # cached before resize_interpolation existed (or with it at lanczos, the same pixels) stay valid; the
        # filter's PIL name, so that the aliases (linear, bilinear) share their files.
        pil_filter = resize_filter(self.datasets[job[0]].config.subsets[record.subset_index].resize_interpolation)
        if pil_filter != resize_filter(None):
            key["resize_filter"] = pil_filter.name
        return key

    def _load_cached(self, job: tuple[int, int], vae_fingerprint: str) -> dict[str, torch.Tensor] | None:
        """The file's tensors ("latent", and "latent_flipped" if cached), or None when absent or stale."""
        path = self._cache_file(job)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), "pt") as f:
                if f.metadata() != self._cache_key(job, vae_fingerprint):
                    return None  # the image, its bucket, the seed or the VAE changed: encode again
                return {name: f.get_tensor(name) for name in f.keys() if name in ("latent", "latent_flipped")}
        except (OSError, SafetensorError):
            return None  # a damaged cache file is rebuilt, never trusted

    def _save_cached(self, job: tuple[int, int], tensors: dict[str, torch.Tensor], vae_fingerprint: str) -> None:
        atomic_save_safetensors({name: t.contiguous() for name, t in tensors.items()}, self._cache_file(job),
                                self._cache_key(job, vae_fingerprint))


def bucket_info(dataset: ImageCaptionDataset) -> dict[str, Any]:
    """sd-scripts' ``bucket_info``: {"buckets": {i: {"resolution": [w, h], "count": samples}}, ...}.

    ``count`` includes repeats (and the balanced repeats of regularisation images), as sd-scripts counts
    the images it puts in a bucket. sd-scripts writes null without bucketing; here the one bucket of the
    fixed resolution is listed too, since it is what training used and A1111 shows it as the resolution.
    """
    samples = Counter(dataset.buckets)
    info: dict[str, Any] = {"buckets": {i: {"resolution": list(size), "count": samples[size]}
                                        for i, size in enumerate(sorted(samples))}}
    if dataset.config.enable_bucket:
        # sd-scripts' mean over images (not samples) of |bucket aspect ratio - image aspect ratio|
        errors = [abs(r.bucket[0] / r.bucket[1] - r.size[0] / r.size[1]) for r in dataset.records]
        info["mean_img_ar_error"] = sum(errors) / len(errors) if errors else 0.0
    return info


def _subset_metadata(subset: SubsetConfig, img_count: int) -> dict[str, Any]:
    return {
        "img_count": img_count, "num_repeats": subset.num_repeats,
        "image_dir": subset.image_dir.name if subset.image_dir else None,
        "is_reg": subset.is_reg, "class_tokens": subset.class_tokens,
        **({"metadata_file": subset.metadata_file.name} if subset.metadata_file else {}),
        "color_aug": subset.color_aug, "flip_aug": subset.flip_aug, "random_crop": subset.random_crop,
        "alpha_mask": subset.alpha_mask, "resize_interpolation": subset.resize_interpolation,  # as sd-scripts
        "shuffle_caption": subset.shuffle_caption, "keep_tokens": subset.keep_tokens,
        "keep_tokens_separator": subset.keep_tokens_separator,
        "caption_prefix": subset.caption_prefix, "caption_suffix": subset.caption_suffix,
        # not in sd-scripts' subset entry (it writes the command-line values as flat keys); kept here so
        # the flat ss_caption_* keys can be the values training used, which a TOML may set per subset
        "caption_dropout_rate": subset.caption_dropout_rate,
        "caption_tag_dropout_rate": subset.caption_tag_dropout_rate,
        "caption_dropout_every_n_epochs": subset.caption_dropout_every_n_epochs,
    }


def _dataset_metadata(d: ImageCaptionDataset) -> dict[str, Any]:
    c = d.config
    images_of = Counter(r.subset_index for r in d.records)
    return {
        "is_dreambooth": all(s.metadata_file is None for s in c.subsets),
        "resolution": list(c.resolution), "batch_size_per_device": c.batch_size,
        # the same counts sd-scripts writes here and in ss_num_train_images / ss_num_reg_images
        "num_train_images": d.num_train_images, "num_reg_images": d.num_reg_images,
        "enable_bucket": c.enable_bucket, "bucket_no_upscale": c.bucket_no_upscale,
        # None without bucketing, as sd-scripts: the range played no part
        "min_bucket_reso": c.min_bucket_reso if c.enable_bucket else None,
        "max_bucket_reso": c.max_bucket_reso if c.enable_bucket else None,
        "tag_frequency": d.tag_frequency(), "bucket_info": bucket_info(d),
        # as sd-scripts: the (width, height) whose area or less was left out, None when unset
        "skip_image_resolution": list(c.skip_image_resolution) if c.skip_image_resolution else None,
        "subsets": [_subset_metadata(s, images_of[i]) for i, s in enumerate(c.subsets)],
    }


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """Identifies a VAE by its config and the bytes of its weights (cached latents depend on both).

    Bytes, not float sums: a sum's rounding depends on the device and its kernels, so processes on different
    GPUs (or a CPU) would disagree about the same VAE and reject each other's cache files."""
    h = hashlib.sha256(json.dumps(dict(getattr(vae, "config", {})), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, tensor in sorted(vae.state_dict().items()):
            h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            h.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _make_loader(dataset: torch.utils.data.Dataset, sampler: Any, num_workers: int,
                 persistent: bool) -> torch.utils.data.DataLoader:
    # pinned batches let move_batch's non_blocking copies overlap the GPU's work instead of waiting for it
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=_collate, num_workers=num_workers,
                                       persistent_workers=persistent and num_workers > 0,
                                       pin_memory=torch.cuda.is_available())


def build_image_data(config: DatasetGroupConfig, *, seed: int, on_bad_image: str, num_processes: int, rank: int,
                     num_workers: int, persistent_workers: bool, accumulation: int = 1) -> ImageData:
    """Scan every dataset, build the epoch-order sampler for this process and the DataLoader."""
    datasets = [ImageCaptionDataset(d, seed=seed, on_bad_image=on_bad_image) for d in config.datasets]
    batch_sizes = {d.config.batch_size for d in datasets}
    if len(batch_sizes) > 1:
        raise UserError(f"{config.source}: datasets with different batch_size ({sorted(batch_sizes)}) are not "
                        "supported yet; use one batch_size for all datasets.")
    resolutions = {d.config.resolution for d in datasets}
    concat = _Concat(datasets)
    buckets = [(i, *b) for i, d in enumerate(datasets) for b in d.buckets]
    batch_size = batch_sizes.pop()
    sampler = EpochBatchSampler(buckets, batch_size, num_processes, rank, seed, accumulation=accumulation)
    workers = min(num_workers, max((os.cpu_count() or 1) - 1, 0))
    loader = _make_loader(concat, sampler, workers, persistent_workers)
    resolution = max(resolutions, key=lambda r: r[0] * r[1])
    return ImageData(datasets, concat, sampler, loader, batch_size, resolution,
                     validation_loader=_validation_loader(config, seed, on_bad_image, batch_size))


def _validation_loader(config: DatasetGroupConfig, seed: int, on_bad_image: str,
                       batch_size: int) -> torch.utils.data.DataLoader | None:
    """Every held-out image once per evaluation, in a fixed order (epoch 0 keys: the same draws each time)."""
    held = [ImageCaptionDataset(d, seed=seed, on_bad_image=on_bad_image, split="validation")
            for d in config.datasets if d.validation_split > 0]
    if not held:
        return None
    concat = _Concat(held)
    buckets = [(i, *b) for i, d in enumerate(held) for b in d.buckets]
    by_bucket: dict[tuple, list[int]] = {}
    for index, bucket in enumerate(buckets):
        by_bucket.setdefault(bucket, []).append(index)
    batches = [[(0, i) for i in members[start:start + batch_size]]
               for members in by_bucket.values() for start in range(0, len(members), batch_size)]
    return _make_loader(concat, batches, 0, False)


# Stay on the CPU: the sample indices only key the per-sample random draws, which are made on the CPU; on a
# GPU each draw would copy them back (a device sync per draw, stalling the queue of kernels).
_CPU_KEYS = frozenset({"indices"})


def move_batch(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors to the device (non-blocking from pinned memory where possible), the sample indices excepted."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) and k not in _CPU_KEYS else v
            for k, v in batch.items()}
