"""Check a dataset before training: images, captions, repeats, buckets, steps — no model loaded.

    python tools/check_dataset.py --dataset_config data.toml --train_batch_size 2 \\
        --gradient_accumulation_steps 2 --num_processes 2

The same library code as train_network.py reads the TOML (or the --train_data_dir layout: N_name
subfolders, or with --in_json sd-scripts' fine-tuning metadata JSON),
scans and decodes every image, assigns buckets and counts steps, so what this prints is what
the trainer will see. Per subset: images, repeats, captions found / missing (with the caption
extensions that do exist next to the images), corrupt files; then the bucket table and steps
per epoch for the given batch size, accumulation and process count. Exit status 0 when the
trainer would start, 1 when it would stop (the reasons are printed), 2 for a bad command line
or TOML.

An LLM dataset TOML (jsonl_file / text_file subsets, max_seq_length, ...; see README "LLMs") is
recognised by its keys and checked with the LLM schema: every row is read and its columns
checked. With --pretrained_model_name_or_path (only the tokenizer and config.json are read,
no weights) the rows are also tokenised and packed as in training, giving samples, tokens
and steps, and the first sample of each subset is shown as text with the tokens the loss learns
between ⟦ ⟧ (--show_samples N for more, 0 for none):

    python tools/check_dataset.py --dataset_config llm_data.toml --pretrained_model_name_or_path my-llm
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from library.arg_checks import check_data_sources  # noqa: E402
from library.data import text_config  # noqa: E402
from library.data.captions import caption_path, other_caption_extensions  # noqa: E402
from library.data.images import ImageCaptionDataset, list_images  # noqa: E402
from library.data.sampler import steps_per_epoch  # noqa: E402
from library.dataset_config import (  # noqa: E402
    ANY_LEVEL_KEYS,
    DATASET_KEYS,
    RESIZE_INTERPOLATIONS,
    SUBSET_KEYS,
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
    p.add_argument("--in_json", default=None,
                   help="with --train_data_dir: sd-scripts' fine-tuning metadata JSON (image -> caption / tags)")
    p.add_argument("--dataset_repeats", type=int, default=1, help="repeats of the --in_json dataset")
    p.add_argument("--train_batch_size", type=int, default=1, help="batch size per process (TOML batch_size wins)")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--num_processes", type=int, default=1, help="processes (GPUs) the run will use")
    p.add_argument("--max_train_steps", type=int, default=None,
                   help="as the trainer: default 1600, or 3 epochs for an LLM dataset when no length is given")
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
    p.add_argument("--validation_split", type=float, default=0.0,
                   help="as the trainer: the dataset default (a TOML value wins)")
    p.add_argument("--validation_seed", type=int, default=None, help="as the trainer: the dataset default")
    p.add_argument("--resize_interpolation", default=None, choices=RESIZE_INTERPOLATIONS,
                   help="as the trainer: the dataset default (images are decoded with it)")
    p.add_argument("--pretrained_model_name_or_path", default=None,
                   help="LLM datasets: the model folder whose tokenizer tokenises and packs the rows")  # fmt: skip
    p.add_argument("--show_samples", type=int, default=1,
                   help="LLM datasets with a tokenizer: show the first N samples of each subset as text, the "
                        "tokens the loss learns between ⟦ ⟧ (0: none)")  # fmt: skip
    return p


def defaults_from(args: argparse.Namespace) -> DatasetDefaults:
    return DatasetDefaults(
        resolution=parse_resolution(args.resolution) if args.resolution else DatasetDefaults.resolution,
        batch_size=args.train_batch_size, enable_bucket=args.enable_bucket, min_bucket_reso=args.min_bucket_reso,
        max_bucket_reso=args.max_bucket_reso, bucket_reso_steps=args.bucket_reso_steps,
        bucket_no_upscale=args.bucket_no_upscale, caption_extension=args.caption_extension,
        train_data_dir=Path(args.train_data_dir) if args.train_data_dir else None,
        reg_data_dir=Path(args.reg_data_dir) if args.reg_data_dir else None,
        in_json=Path(args.in_json) if args.in_json else None, dataset_repeats=args.dataset_repeats,
        validation_split=args.validation_split, validation_seed=args.validation_seed,
        resize_interpolation=args.resize_interpolation,
    )  # fmt: skip


def load_config(args: argparse.Namespace) -> DatasetGroupConfig:
    for name in ("train_batch_size", "gradient_accumulation_steps", "num_processes"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    check_data_sources(args)  # the trainer's own rules for these options
    if args.dataset_config:
        return load_dataset_config(args.dataset_config, defaults_from(args))
    return config_from_train_data_dir(defaults_from(args))


def survey_subset(subset: SubsetConfig) -> list[str]:
    """Images and caption files as found on disk (before the trainer's own checks)."""
    kind = "regularisation" if subset.is_reg else "training"
    head = f"  {subset.name}: {subset.image_dir or subset.metadata_file} ({kind}, {subset.num_repeats} repeats)"
    if subset.image_dir is None:  # a fine-tuning subset whose metadata file names the images by path
        return [head, f"    images and captions: from {subset.metadata_file}"]
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
        others = other_caption_extensions(missing, ext)  # what training's warning and error name
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
    buckets = [(i, *b) for i, d in enumerate(built) for b in d.buckets]  # as library/data/image_data.py
    return steps_lines(buckets, batch_sizes.pop(), args, problems)


def steps_lines(buckets: list, batch: int, args: argparse.Namespace, problems: list[str]) -> list[str]:
    """Batches and optimizer steps per epoch as the trainer's sampler counts them."""
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


# --- LLM dataset TOMLs (library/data/text_config.py) ---------------------------------------

# Keys only the LLM schema has: one of them anywhere means the TOML is an LLM dataset.
TEXT_ONLY_KEYS = frozenset(
    (set(text_config.DATASET_KEYS) | set(text_config.ANY_LEVEL_KEYS) | set(text_config.SUBSET_KEYS))
    - (set(DATASET_KEYS) | set(ANY_LEVEL_KEYS) | set(SUBSET_KEYS))
)


def is_text_dataset_toml(path: str) -> bool:
    """Whether a dataset TOML uses LLM keys (jsonl_file, max_seq_length, ...); unreadable files are not
    decided here, the image loader reports them."""
    from library.data.config_checks import read_config_file
    from library.errors import UserError

    try:
        data, _ = read_config_file(Path(path))  # .json or TOML, as the trainers read it
    except UserError:
        return False
    tables = [data.get("general")] if isinstance(data.get("general"), dict) else []
    for dataset in data.get("datasets") or []:
        if isinstance(dataset, dict):
            tables.append(dataset)
            tables += [t for t in dataset.get("subsets") or [] if isinstance(t, dict)]
    return any(key in TEXT_ONLY_KEYS for table in tables for key in table)


def row_problem(subset: text_config.TextSubsetConfig, row: object) -> str | None:
    """What the trainer would say about a row before tokenising it (None: a usable row)."""
    from library.data.text_data import RowError, check_row

    try:
        check_row(subset, row)
    except RowError as e:
        return str(e)
    return None


def survey_text_subset(subset: text_config.TextSubsetConfig, problems: list[str]) -> list[str]:
    """Rows and bad rows of one file, with the trainer's messages; bad rows stop it unless on_bad_row = "skip"."""
    from library.data.text_data import read_rows

    rows, bad = 0, []
    for line, row in read_rows(subset):
        rows += 1
        why = row_problem(subset, row)
        if why is not None:
            bad.append(f"{subset.path}:{line}: {why}")
    lines = [f"  {subset.name}: {subset.path} ({subset.format}, {subset.num_repeats} repeats): {rows} rows, "
             f"{len(bad)} bad"]  # fmt: skip
    lines += [f"    bad row {where}" for where in bad[:10]]
    if len(bad) > 10:
        lines.append(f"    ... and {len(bad) - 10} more bad rows")
    if rows == 0:
        problems.append(f"{subset.name}: {subset.path} is empty (no rows)")
    elif bad and subset.on_bad_row == "error":
        problems.append(f"{bad[0]} ({subset.name}; set on_bad_row = \"skip\" to skip such rows)")
    return lines


def check_text(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The LLM schema, every row, and with a tokenizer the samples, packing and steps the trainer would get."""
    group = text_config.load_text_dataset_config(args.dataset_config, args.train_batch_size,
                                                 validation_split=args.validation_split,
                                                 validation_seed=args.validation_seed)
    lines, problems = [f"dataset config: {group.source} (LLM text data)"], []
    for dataset in group.datasets:
        lines.append(f"{dataset.name}: max_seq_length {dataset.max_seq_length or 'model default'}, "
                     f"packing {'on' if dataset.packing else 'off'}, batch size {dataset.batch_size}")  # fmt: skip
        for subset in dataset.subsets:
            lines += survey_text_subset(subset, problems)
    if problems:
        return lines, problems
    if not args.pretrained_model_name_or_path:
        lines.append("rows not tokenised: pass --pretrained_model_name_or_path (the model folder; only its tokenizer "
                     "and config are read) for samples, tokens, packing and steps")  # fmt: skip
        return lines, problems
    return lines + tokenised_summary(group, args, problems), problems


def tokenised_summary(group: text_config.TextDatasetGroup, args: argparse.Namespace, problems: list[str]) -> list[str]:
    """Tokenise and pack as library/families/llm.py's build_data does, then count steps like the sampler."""
    from transformers import AutoConfig, AutoTokenizer

    from library.data.text_data import build_dataset
    from library.families.llm import default_max_seq_length

    model = args.pretrained_model_name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
        positions = getattr(AutoConfig.from_pretrained(model), "max_position_embeddings", None)
    except (OSError, ValueError) as e:
        raise UserError(f"--pretrained_model_name_or_path {model}: cannot read its tokenizer / config.json "
                        f"({e}); give the model folder") from None
    try:
        group = text_config.replace_max_seq_length(group, default_max_seq_length(positions), positions)
        datasets = [build_dataset(d, tokenizer, args.seed) for d in group.datasets]
    except UserError as e:
        problems.append(str(e))
        return []
    lines = [line for d in datasets for line in d.summary()]
    lines += [line for d in datasets for line in sample_lines(d, tokenizer, args.show_samples)]
    batch_sizes = {d.config.batch_size for d in datasets}
    if len(batch_sizes) > 1:
        problems.append(f"datasets with different batch_size ({sorted(batch_sizes)}) are not supported")
        return lines
    buckets = [i for i, d in enumerate(datasets) for _ in d.sequences]  # as build_text_data: one per dataset
    return lines + steps_lines(buckets, batch_sizes.pop(), args, problems)


def sample_lines(dataset: Any, tokenizer: Any, count: int) -> list[str]:
    """The first ``count`` samples of each subset as text, with the tokens in the loss marked."""
    from library.data.text_preview import CLOSE, OPEN, render_sample

    lines = []
    for index, report in enumerate(dataset.reports):
        samples = [s for s in dataset.train if s.subset == index][:max(0, count)]
        for n, sample in enumerate(samples):
            lines.append(f"{report.name} sample {n + 1} (in the loss: {OPEN}...{CLOSE}):")
            lines += [f"    {line}" for line in render_sample(sample.input_ids, sample.labels, tokenizer).split("\n")]
    return lines


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not 0 <= args.validation_split < 1:  # the trainer's own check (library/arg_checks.check_ranges)
            raise UserError(f"--validation_split {args.validation_split}: expected a fraction from 0 up to (not "
                            "including) 1")
        text = bool(args.dataset_config) and is_text_dataset_toml(args.dataset_config)
        if args.max_train_steps is None and args.max_train_epochs is None and text:
            from library.families.llm import DEFAULT_EPOCHS

            args.max_train_epochs = DEFAULT_EPOCHS  # the trainer's LLM default (library/model_setup.build_family)
        elif args.max_train_steps is None:
            args.max_train_steps = 1600  # kohya's default
        if text:
            lines, problems = check_text(args)
        else:
            config = load_config(args)
            lines, problems = check(config, args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
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
