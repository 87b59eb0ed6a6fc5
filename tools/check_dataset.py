"""Check a dataset before training: images, captions, repeats, buckets, steps — no model loaded.

    python tools/check_dataset.py --dataset_config data.toml --train_batch_size 2 \\
        --gradient_accumulation_steps 2 --num_processes 2

The same library code as train_network.py reads the TOML (or the --train_data_dir layout),
scans and decodes every image, assigns buckets and counts steps, so what this prints is what
the trainer will see. Per subset: images, repeats, captions found / missing (with the caption
extensions that do exist next to the images), corrupt files; then the bucket table and steps
per epoch for the given batch size, accumulation and process count. Exit status 0 when the
trainer would start, 1 when it would stop (the reasons are printed), 2 for a bad command line
or TOML.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from library.data.captions import caption_path  # noqa: E402
from library.data.images import IMAGE_EXTENSIONS, ImageCaptionDataset, list_images  # noqa: E402
from library.data.sampler import steps_per_epoch  # noqa: E402
from library.dataset_config import (  # noqa: E402
    DatasetDefaults,
    DatasetGroupConfig,
    SubsetConfig,
    config_from_train_data_dir,
    load_dataset_config,
    parse_resolution,
)
from library.errors import UserError  # noqa: E402
from library.train_setup import plan_steps  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset_config", default=None, help="dataset TOML (kohya schema)")
    p.add_argument("--train_data_dir", default=None, help="legacy layout: a folder of N_name subfolders")
    p.add_argument("--reg_data_dir", default=None, help="legacy layout: regularisation images")
    p.add_argument("--train_batch_size", type=int, default=1, help="batch size per process (TOML batch_size wins)")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--num_processes", type=int, default=1, help="processes (GPUs) the run will use")
    p.add_argument("--max_train_steps", type=int, default=1600)
    p.add_argument("--max_train_epochs", type=int, default=None)
    p.add_argument("--resolution", default=None, help='"512" or "768,512" (TOML resolution wins)')
    p.add_argument("--enable_bucket", action="store_true")
    p.add_argument("--min_bucket_reso", type=int, default=256)
    p.add_argument("--max_bucket_reso", type=int, default=1024)
    p.add_argument("--bucket_reso_steps", type=int, default=64)
    p.add_argument("--bucket_no_upscale", action="store_true")
    p.add_argument("--caption_extension", default=".caption")
    p.add_argument("--on_bad_image", choices=("error", "skip"), default="error",
                   help="as the trainer: corrupt images stop the run (error) or are left out (skip)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed (decides a validation split, as in training)")
    return p


def defaults_from(args: argparse.Namespace) -> DatasetDefaults:
    return DatasetDefaults(
        resolution=parse_resolution(args.resolution) if args.resolution else DatasetDefaults.resolution,
        batch_size=args.train_batch_size, enable_bucket=args.enable_bucket, min_bucket_reso=args.min_bucket_reso,
        max_bucket_reso=args.max_bucket_reso, bucket_reso_steps=args.bucket_reso_steps,
        bucket_no_upscale=args.bucket_no_upscale, caption_extension=args.caption_extension,
        train_data_dir=Path(args.train_data_dir) if args.train_data_dir else None,
        reg_data_dir=Path(args.reg_data_dir) if args.reg_data_dir else None,
    )  # fmt: skip


def load_config(args: argparse.Namespace) -> DatasetGroupConfig:
    for name in ("train_batch_size", "gradient_accumulation_steps", "num_processes"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    if args.dataset_config:
        return load_dataset_config(args.dataset_config, defaults_from(args))
    return config_from_train_data_dir(defaults_from(args))


def survey_subset(subset: SubsetConfig) -> list[str]:
    """Images and caption files as found on disk (before the trainer's own checks)."""
    kind = "regularisation" if subset.is_reg else "training"
    head = f"  {subset.name}: {subset.image_dir} ({kind}, {subset.num_repeats} repeats)"
    if not subset.image_dir.is_dir():
        return [head, "    folder not found"]
    images = list_images(subset.image_dir)
    lines = [head, f"    images: {len(images)}"]
    if subset.metadata_file is not None:
        return [*lines, f"    captions: from {subset.metadata_file}"]
    ext = subset.caption_extension
    missing = [p for p in images if not caption_path(p, ext).is_file()]
    lines.append(f"    captions ({ext}): {len(images) - len(missing)} found, {len(missing)} missing")
    if missing:
        stems = {p.stem for p in missing}
        others = Counter(
            p.suffix for p in subset.image_dir.iterdir()
            if p.stem in stems and p.suffix and p.suffix.lower() not in IMAGE_EXTENSIONS and p.suffix != ext
        )  # fmt: skip
        if others:
            lines.append("    other caption extensions next to them: "
                         + ", ".join(f"{s} ({n})" for s, n in others.most_common()))  # fmt: skip
        fallback = f"class_tokens {subset.class_tokens!r}" if subset.class_tokens is not None else "nothing"
        lines.append(f"    images without a caption file get: {fallback}")
    return lines


def check(config: DatasetGroupConfig, args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(report lines, problems that would stop the trainer)."""
    lines: list[str] = [f"dataset config: {config.source}"]
    problems: list[str] = []
    built: list[ImageCaptionDataset] = []
    for dataset in config.datasets:
        c = dataset
        lines.append(f"{c.name}: resolution {c.resolution[0]}x{c.resolution[1]}, batch size {c.batch_size}, "
                     f"buckets {'on' if c.enable_bucket else 'off'}")  # fmt: skip
        for subset in c.subsets:
            lines += survey_subset(subset)
        try:
            # "skip" so that every corrupt file is listed; the trainer's setting decides below.
            data = ImageCaptionDataset(dataset, seed=args.seed, on_bad_image="skip")
        except UserError as e:
            problems.append(str(e))
            continue
        built.append(data)
        for path, why in data.skipped:
            lines.append(f"  corrupt image: {path} ({why})")
        if data.skipped and args.on_bad_image == "error":
            problems.append(f"{c.name}: {len(data.skipped)} unreadable image(s); fix them or pass --on_bad_image skip")
        lines += bucket_table(data)
    if built and not problems:
        lines += step_summary(built, args, problems)
    return lines, problems


def bucket_table(data: ImageCaptionDataset) -> list[str]:
    images = Counter(r.bucket for r in data.records)
    samples = Counter(data.buckets)
    lines = [f"  {'bucket':>11} {'images':>7} {'samples':>8}"]
    lines += [f"  {w:>5}x{h:<5} {images[(w, h)]:>7} {samples[(w, h)]:>8}" for (w, h) in sorted(images)]
    lines.append(f"  total {len(data.records)} images, {len(data)} samples per epoch (images x repeats)")
    return lines


def step_summary(built: list[ImageCaptionDataset], args: argparse.Namespace, problems: list[str]) -> list[str]:
    batch_sizes = {d.config.batch_size for d in built}
    if len(batch_sizes) > 1:
        problems.append(f"datasets with different batch_size ({sorted(batch_sizes)}) are not supported")
        return []
    batch = batch_sizes.pop()
    buckets = [(i, *b) for i, d in enumerate(built) for b in d.buckets]  # as library/data/image_data.py
    accumulation = args.gradient_accumulation_steps
    batches = steps_per_epoch(buckets, batch, args.num_processes, accumulation)  # as the trainer's sampler
    try:
        plan = plan_steps(batches, accumulation, args.max_train_steps, args.max_train_epochs)
    except UserError as e:
        problems.append(str(e))
        return []
    global_batch = batch * args.num_processes * accumulation
    return [
        f"global batch: {batch} per process x {args.num_processes} processes x "
        f"{accumulation} accumulation = {global_batch}",
        f"batches per process per epoch: {batches} (a bucket's short last optimizer step is filled from the "
        "same bucket)",
        f"optimizer steps per epoch: {plan.steps_per_epoch}",
        f"total: {plan.max_train_steps} steps = {plan.num_epochs} epochs",
    ]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lines, problems = check(config, args)
    print("\n".join(lines))
    if problems:
        print("\nthe trainer would stop:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    print("\nok: the trainer would start with this data")
    return 0


if __name__ == "__main__":
    sys.exit(main())
