"""The ``--dataset_config`` file (kohya's schema, TOML or JSON) and the legacy ``--train_data_dir`` layout.

Both become the same frozen dataclasses: a ``DatasetGroupConfig`` holding ``DatasetConfig``s
holding ``SubsetConfig``s. A value is looked up subset → dataset → ``[general]`` → command
line (``DatasetDefaults``) → built-in default: the TOML is more specific than the command
line, as in sd-scripts (CONTRACTS.md §2).

Unlike sd-scripts, every value is type-checked where it is written, and every rejected key or
value is reported with the file, the key path (``datasets[0].subsets[1].num_repeats``), the
value and what was expected. Reading the file and the value checkers are in
``library/data/config_checks.py``; the ``N_name`` folder layout is in ``library/data/folder_layout.py``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from library.data.captions import CaptionOptions
from library.data.config_checks import (
    Checker,
    Reporter,
    _Bad,
    _bool,
    _fraction,
    _int,
    _optional_int,
    _path,
    _resolution,
    _str,
    _toml_repr,
    read_config_file,
)
from library.errors import UserError, did_you_mean

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetDefaults:
    """Dataset values taken from the trainer's command line (the lowest-priority level)."""

    resolution: tuple[int, int] = (512, 512)  # (width, height)
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    validation_split: float = 0.0
    validation_seed: int | None = None
    caption_extension: str = ".caption"
    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    caption_separator: str = ","
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_tag_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    secondary_separator: str = ""
    enable_wildcard: bool = False
    flip_aug: bool = False
    color_aug: bool = False
    random_crop: bool = False
    alpha_mask: bool = False
    resize_interpolation: str | None = None  # None: LANCZOS (library/data/pixels.py)
    num_repeats: int = 1
    class_tokens: str | None = None
    train_data_dir: Path | None = None
    reg_data_dir: Path | None = None
    in_json: Path | None = None  # with train_data_dir: one fine-tuning subset (sd-scripts' fine-tune layout)
    dataset_repeats: int = 1  # its repeats (sd-scripts' --dataset_repeats)
    skip_image_resolution: tuple[int, int] | None = None  # images of at most this area are left out
    # Where each value came from, by field name ("command line", "config file x.toml", "default"), so that
    # an error about a value can name its real source; a field left out is "command line or default".
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class SubsetConfig:
    """One folder of images and how its samples are captioned and augmented."""

    # None only for a fine-tuning subset whose metadata JSON names the images by path (as in
    # sd-scripts); with it, the JSON's relative names are looked up in image_dir.
    image_dir: Path | None
    num_repeats: int = 1
    is_reg: bool = False
    class_tokens: str | None = None
    caption_extension: str = ".caption"
    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    caption_separator: str = ","
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_tag_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    secondary_separator: str = ""
    enable_wildcard: bool = False
    flip_aug: bool = False
    color_aug: bool = False
    random_crop: bool = False
    alpha_mask: bool = False  # --masked_loss: the image's transparency is the loss mask
    resize_interpolation: str | None = None  # the filter that scales images to their bucket; None: LANCZOS
    conditioning_data_dir: Path | None = None  # --masked_loss: a folder of mask images named like the images
    metadata_file: Path | None = None  # set for fine-tuning subsets (captions from a JSON file)
    name: str = "subset"  # where it came from, for messages: "datasets[0].subsets[1]"

    def __post_init__(self) -> None:
        # sd-scripts appends the extension to the stem as written, so "txt" silently looks for
        # "img_001txt"; the intent is never in doubt, so the dot is added.
        if self.caption_extension and not self.caption_extension.startswith("."):
            object.__setattr__(self, "caption_extension", "." + self.caption_extension)

    @property
    def caption_options(self) -> CaptionOptions:
        return CaptionOptions(
            prefix=self.caption_prefix,
            suffix=self.caption_suffix,
            shuffle=self.shuffle_caption,
            keep_tokens=self.keep_tokens,
            keep_tokens_separator=self.keep_tokens_separator,
            separator=self.caption_separator,
            dropout_rate=self.caption_dropout_rate,
            tag_dropout_rate=self.caption_tag_dropout_rate,
            dropout_every_n_epochs=self.caption_dropout_every_n_epochs,
            secondary_separator=self.secondary_separator,
            enable_wildcard=self.enable_wildcard,
        )


@dataclass(frozen=True)
class DatasetConfig:
    """Subsets trained together at one resolution and batch size (batch size is per process)."""

    subsets: tuple[SubsetConfig, ...]
    resolution: tuple[int, int] = (512, 512)  # (width, height)
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    validation_split: float = 0.0
    validation_seed: int | None = None
    skip_image_resolution: tuple[int, int] | None = None  # (width, height): images of at most its area are skipped
    name: str = "dataset"


@dataclass(frozen=True)
class DatasetGroupConfig:
    datasets: tuple[DatasetConfig, ...]
    source: str = ""  # the TOML path or "--train_data_dir"


# sd-scripts' names of the filter that scales an image to its bucket (library/data/pixels.py maps them to PIL's)
RESIZE_INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")


def _resize_interpolation(value: Any) -> str:
    if value not in RESIZE_INTERPOLATIONS:
        raise _Bad("one of " + ", ".join(f'"{name}"' for name in RESIZE_INTERPOLATIONS))
    return value


DATASET_KEYS: dict[str, Checker] = {
    "resolution": _resolution,
    "batch_size": _int(1),
    "enable_bucket": _bool,
    "min_bucket_reso": _int(1),
    "max_bucket_reso": _int(1),
    "bucket_reso_steps": _int(1),
    "bucket_no_upscale": _bool,
    "validation_split": _fraction(upper_inclusive=False),
    "validation_seed": _optional_int,
    "skip_image_resolution": _resolution,
}
ANY_LEVEL_KEYS: dict[str, Checker] = {
    "num_repeats": _int(1),
    "shuffle_caption": _bool,
    "keep_tokens": _int(0),
    "keep_tokens_separator": _str(allow_empty=True),
    "caption_separator": _str(allow_empty=False),
    "secondary_separator": _str(allow_empty=True),
    "enable_wildcard": _bool,
    "caption_prefix": _str(allow_empty=True),
    "caption_suffix": _str(allow_empty=True),
    "caption_extension": _str(allow_empty=False),  # SubsetConfig adds a missing dot
    "caption_dropout_rate": _fraction(upper_inclusive=True),
    "caption_tag_dropout_rate": _fraction(upper_inclusive=True),
    "caption_dropout_every_n_epochs": _int(0),
    "flip_aug": _bool,
    "color_aug": _bool,
    "random_crop": _bool,
    "alpha_mask": _bool,
    "class_tokens": _str(allow_empty=True),
    "resize_interpolation": _resize_interpolation,
}
SUBSET_KEYS: dict[str, Checker] = {
    "image_dir": _path,
    "is_reg": _bool,
    "metadata_file": _path,
    "conditioning_data_dir": _path,
}
# sd-scripts keys (its config_util.py schema) that change nothing here: type-checked, then ignored with a note.
HARMLESS_KEYS: dict[str, tuple[Checker, str]] = {
    "cache_info": (_bool, "it only speeds up sd-scripts' scan of image sizes (its metadata cache file); this "
                          "toolkit reads the sizes itself, so the key is ignored"),
}
# sd-scripts keys this toolkit does not implement: refusing them beats ignoring them silently.
UNSUPPORTED_KEYS = frozenset({
    "token_warmup_min", "token_warmup_step", "face_crop_aug_range", "network_multiplier", "custom_attributes",
    "debug_dataset",
})  # fmt: skip
# Command-line options of sd-scripts written into a dataset config (sd-scripts refuses them there too).
COMMAND_LINE_KEYS = {
    "prior_loss_weight": "it is a command-line option: pass --prior_loss_weight (or put it in --config_file)",
    "max_token_length": "it is a command-line option: pass --max_token_length (or put it in --config_file)",
    "train_batch_size": "a dataset config calls it batch_size",
    "dataset_repeats": "a dataset config calls it num_repeats",
}

_LEVEL_KEYS = {
    "general": set(DATASET_KEYS) | set(ANY_LEVEL_KEYS) | set(HARMLESS_KEYS),
    "dataset": set(DATASET_KEYS) | set(ANY_LEVEL_KEYS) | set(HARMLESS_KEYS) | {"subsets"},
    "subset": set(ANY_LEVEL_KEYS) | set(SUBSET_KEYS) | set(HARMLESS_KEYS),
}
_ALL_CHECKERS = {**DATASET_KEYS, **ANY_LEVEL_KEYS, **SUBSET_KEYS, **{k: c for k, (c, _) in HARMLESS_KEYS.items()}}


def _unknown_key(report: Reporter, where: str, level: str, key: str) -> UserError:
    path = f"{where}.{key}"
    from library.data import text_config  # imported here: it builds on this module

    llm_keys = {*text_config.DATASET_KEYS, *text_config.ANY_LEVEL_KEYS, *text_config.SUBSET_KEYS}
    if key in llm_keys - _ALL_CHECKERS.keys():  # this module parses the dataset configs of SD / SDXL runs only
        return report.error(path, f"'{key}' is an LLM dataset key: {report.source} is a dataset config for a causal "
                            "LM (text), but the model is a diffusion model (SD/SDXL), which trains on images; give "
                            "an image dataset config (image_dir subsets) or an LLM as --pretrained_model_name_or_path")
    if key in UNSUPPORTED_KEYS:
        return report.error(path, "this sd-scripts key is not supported by this toolkit; remove it")
    if key in COMMAND_LINE_KEYS:
        return report.error(path, f"'{key}' is not a dataset config key (in sd-scripts neither): "
                            f"{COMMAND_LINE_KEYS[key]}")
    if any(key in keys for keys in _LEVEL_KEYS.values()):
        hint = "[general] or [[datasets]]" if key in DATASET_KEYS else "[[datasets.subsets]]"
        return report.error(path, f"'{key}' is not allowed in a {level} table; put it in {hint}")
    return report.error(path, f"unknown key '{key}'{did_you_mean(key, _LEVEL_KEYS[level])}")


def _checked_table(table: Any, where: str, level: str, report: Reporter) -> dict[str, Any]:
    """The table's values after key and type checks (``subsets`` is passed through)."""
    if not isinstance(table, dict):
        raise report.error(where, f"expected a table, got {_toml_repr(table)}")
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in _LEVEL_KEYS[level]:
            raise _unknown_key(report, where, level, key)
        if key == "subsets":
            values[key] = value
            continue
        try:
            values[key] = _ALL_CHECKERS[key](value)
        except _Bad as bad:
            raise report.error(f"{where}.{key}", f"got {_toml_repr(value)}, expected {bad}") from None
        if key in HARMLESS_KEYS:
            logger.info("%s: %s: %s", report.source, report.at(f"{where}.{key}"), HARMLESS_KEYS[key][1])
            del values[key]
    return values


def load_dataset_config(path: Path | str, defaults: DatasetDefaults) -> DatasetGroupConfig:
    """Read and validate a kohya-style dataset config (.json: JSON, else TOML); see the module docstring."""
    path = Path(path)
    data, text = read_config_file(path)
    return parse_dataset_config(data, defaults, source=str(path), text=text)


def parse_dataset_config(
    data: Mapping[str, Any], defaults: DatasetDefaults, source: str = "<dataset config>", text: str | None = None
) -> DatasetGroupConfig:
    """Validate an already-parsed dataset config (``text``, when given, adds line numbers to errors)."""
    report = Reporter(source, text)
    for key in data:
        if key not in ("general", "datasets"):
            msg = f"unknown top-level key '{key}'{did_you_mean(key, ['general', 'datasets'])}"
            raise report.error(key, msg + "; expected [general] and [[datasets]]")
    general = _checked_table(data.get("general", {}), "general", "general", report)
    datasets = data.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise report.error("datasets", "no [[datasets]] table; add at least one with a [[datasets.subsets]]")
    built = [_dataset(table, i, general, defaults, report) for i, table in enumerate(datasets)]
    return DatasetGroupConfig(datasets=tuple(built), source=source)


def _dataset(table: Any, i: int, general: dict, defaults: DatasetDefaults, report: Reporter) -> DatasetConfig:
    where = f"datasets[{i}]"
    values = _checked_table(table, where, "dataset", report)
    subsets = values.pop("subsets", None)
    if not isinstance(subsets, list) or not subsets:
        raise report.error(where, 'no [[datasets.subsets]]; add one with image_dir = "..."')
    inherited = {**dataclasses.asdict(defaults), **general, **values}  # later levels win
    built = tuple(_subset(sub, f"{where}.subsets[{j}]", inherited, report) for j, sub in enumerate(subsets))
    kinds = {s.metadata_file is not None for s in built}
    if len(kinds) > 1:
        dreambooth = next(s.name for s in built if s.metadata_file is None)
        finetune = next(s.name for s in built if s.metadata_file is not None)
        raise report.error(
            where,
            f"mixes DreamBooth subsets ({dreambooth}, captions from side files/class_tokens) with fine-tuning "
            f"subsets ({finetune}, metadata_file); put them in separate [[datasets]]",
        )
    dataset = DatasetConfig(subsets=built, name=where, **{k: inherited[k] for k in DATASET_KEYS})

    def origin(key: str) -> str:
        for table, written in ((where, values), ("general", general)):
            if key in written:
                line = report.lines.get(f"{table}.{key}")
                return f"{table}.{key}" + (f", line {line}" if line else "")
        return cli_origin(key, defaults.sources)

    check_buckets(dataset, origin, lambda message: report.error(where, message))
    return dataset


# Written in a metadata_file subset, these would be ignored (its captions come from the JSON);
# sd-scripts' fine-tuning subset schema refuses them too. Inherited values are harmless.
_DREAMBOOTH_ONLY = ("class_tokens", "caption_extension")


def _subset(table: Any, where: str, inherited: dict, report: Reporter) -> SubsetConfig:
    values = _checked_table(table, where, "subset", report)
    dreambooth_only = [k for k in _DREAMBOOTH_ONLY if k in values] + (["is_reg"] if values.get("is_reg") else [])
    if "metadata_file" in values and dreambooth_only:
        raise report.error(f"{where}.{dreambooth_only[0]}", f"{dreambooth_only[0]} applies to DreamBooth subsets, "
                           "not to metadata_file subsets (their captions come from the JSON); remove it")
    if "metadata_file" not in values and "image_dir" not in values:
        raise report.error(where, 'missing image_dir; a DreamBooth subset needs image_dir = "path/to/images" '
                           "(only a metadata_file subset whose JSON names the images by path may leave it out)")
    merged = {k: inherited[k] for k in ANY_LEVEL_KEYS} | {"image_dir": None} | values
    return SubsetConfig(name=where, **merged)


def cli_origin(key: str, sources: Mapping[str, str]) -> str:
    """Where a command-line level value came from, for messages: the flag and, when known, its source."""
    option = {"batch_size": "train_batch_size"}.get(key, key)
    source = sources.get(key)  # as library/config_file.py labels them
    if source is None:
        return f"--{option} on the command line, in --config_file or its default"
    if source == "default":
        return f"the default of --{option}"
    if source.startswith("config file"):
        return f"{option} in the {source}"
    return f"--{option} on the {source}" if source == "command line" else f"--{option}, {source}"


def check_buckets(dataset: DatasetConfig, origin: Callable[[str], str], fail: Callable[[str], UserError]) -> None:
    """The bucket range must hold the resolution; ``origin(key)`` says where a value was set."""
    if not dataset.enable_bucket:
        return
    lo, hi, (w, h) = dataset.min_bucket_reso, dataset.max_bucket_reso, dataset.resolution
    if lo > hi:
        raise fail(f"min_bucket_reso ({lo}) is larger than max_bucket_reso ({hi}); min_bucket_reso is from "
                   f"{origin('min_bucket_reso')}, max_bucket_reso from {origin('max_bucket_reso')}")
    if min(w, h) < lo or max(w, h) > hi:
        bound, fix = (("min_bucket_reso", f"set min_bucket_reso to {min(w, h)} or less") if min(w, h) < lo
                      else ("max_bucket_reso", f"set max_bucket_reso to {max(w, h)} or more"))
        raise fail(f"resolution {w}x{h} is outside the bucket range min_bucket_reso={lo} .. max_bucket_reso={hi}; "
                   f"resolution is from {origin('resolution')}, {bound} from {origin(bound)}; {fix}, or change "
                   "the resolution")


def config_from_train_data_dir(defaults: DatasetDefaults) -> DatasetGroupConfig:
    """One dataset from the ``N_name`` subfolders of train_data_dir (and reg_data_dir, is_reg)."""
    from library.data.folder_layout import folder_layout_config  # imported here: it builds on this module

    return folder_layout_config(defaults)


def parse_resolution(text: str) -> tuple[int, int]:
    """``--resolution`` as typed: "512" or "768,512" (width,height)."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) not in (1, 2) or any(n <= 0 for n in numbers):
        raise UserError(f"--resolution {text!r}: expected a positive integer or width,height (e.g. 768,512)")
    return (numbers[0], numbers[-1])
