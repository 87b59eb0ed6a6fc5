"""The ``--dataset_config`` TOML (kohya's schema) and the legacy ``--train_data_dir`` layout.

Both become the same frozen dataclasses: a ``DatasetGroupConfig`` holding ``DatasetConfig``s
holding ``SubsetConfig``s. A value is looked up subset → dataset → ``[general]`` → command
line (``DatasetDefaults``) → built-in default: the TOML is more specific than the command
line, as in sd-scripts (CONTRACTS.md §2).

Unlike sd-scripts, every value is type-checked where it is written, and every rejected key or
value is reported with the file, the key path (``datasets[0].subsets[1].num_repeats``), the
value and what was expected.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from library.data.captions import CaptionOptions
from library.errors import UserError, did_you_mean


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
    num_repeats: int = 1
    class_tokens: str | None = None
    train_data_dir: Path | None = None
    reg_data_dir: Path | None = None
    in_json: Path | None = None  # with train_data_dir: one fine-tuning subset (sd-scripts' fine-tune layout)
    dataset_repeats: int = 1  # its repeats (sd-scripts' --dataset_repeats)


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
    name: str = "dataset"


@dataclass(frozen=True)
class DatasetGroupConfig:
    datasets: tuple[DatasetConfig, ...]
    source: str = ""  # the TOML path or "--train_data_dir"


# ---------------------------------------------------------------------------------------
# Value checkers: each returns the normalised value or raises _Bad(what was expected).


class _Bad(Exception):
    """A value of the wrong type or range; carries what was expected."""


Checker = Callable[[Any], Any]


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Bad("true or false")
    return value


def _int(minimum: int) -> Checker:
    def check(value: Any) -> int:
        # bool is an int in Python, but `num_repeats = true` is a mistake, not 1.
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise _Bad(f"an integer >= {minimum}")
        return value

    return check


def _optional_int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Bad("an integer")
    return value


def _fraction(upper_inclusive: bool) -> Checker:
    def check(value: Any) -> float:
        ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok_type or value < 0 or value > 1 or (value == 1 and not upper_inclusive):
            raise _Bad("a number from 0 to 1" + ("" if upper_inclusive else " (1 excluded)"))
        return float(value)

    return check


def _str(allow_empty: bool) -> Checker:
    def check(value: Any) -> str:
        if not isinstance(value, str) or (not allow_empty and not value):
            raise _Bad("a string" if allow_empty else "a non-empty string")
        return value

    return check


def _path(value: Any) -> Path:
    return Path(_str(allow_empty=False)(value)).expanduser()


def _resolution(value: Any) -> tuple[int, int]:
    expected = "a positive integer or [width, height]"
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if not isinstance(value, list) or len(value) != 2:
        raise _Bad(expected)
    if any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in value):
        raise _Bad(expected)
    return (value[0], value[1])


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
}
SUBSET_KEYS: dict[str, Checker] = {
    "image_dir": _path,
    "is_reg": _bool,
    "metadata_file": _path,
    "conditioning_data_dir": _path,
}
# sd-scripts keys this toolkit does not implement: refusing them beats ignoring them silently.
UNSUPPORTED_KEYS = frozenset({
    "token_warmup_min", "token_warmup_step",
    "face_crop_aug_range", "cache_info",
    "network_multiplier", "debug_dataset", "resize_interpolation", "custom_attributes",
})  # fmt: skip

_LEVEL_KEYS = {
    "general": set(DATASET_KEYS) | set(ANY_LEVEL_KEYS),
    "dataset": set(DATASET_KEYS) | set(ANY_LEVEL_KEYS) | {"subsets"},
    "subset": set(ANY_LEVEL_KEYS) | set(SUBSET_KEYS),
}
_ALL_CHECKERS = {**DATASET_KEYS, **ANY_LEVEL_KEYS, **SUBSET_KEYS}


def _toml_repr(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, list, dict)):
        return json.dumps(value, default=str)
    return repr(value)


_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(?:#.*)?$")
_KEY_LINE = re.compile(r"^\s*(?:\"([^\"]+)\"|'([^']+)'|([A-Za-z0-9_-]+))\s*=")


def _line_numbers(text: str) -> dict[str, int]:
    """Line of every table header and key, by the key path used in messages.

    A key name such as ``num_repeats`` is normally written once per subset, so a plain text
    search cannot tell which occurrence a message is about; walking the headers in order gives
    each ``[[datasets]]`` / ``[[datasets.subsets]]`` its index, as tomllib numbers them.
    """
    lines: dict[str, int] = {}
    table, datasets, subsets = "", -1, -1
    in_string = False  # inside a multi-line string, where "key = ..." is text, not a key
    for number, line in enumerate(text.splitlines(), start=1):
        was_in_string = in_string
        in_string ^= (line.count('"""') + line.count("'''")) % 2 == 1
        if was_in_string:
            continue
        if header := _HEADER.match(line):
            name = re.sub(r"\s*\.\s*", ".", header.group(2)).replace('"', "").replace("'", "")
            if name == "datasets" and header.group(1) == "[[":
                datasets, subsets = datasets + 1, -1
                table = f"datasets[{datasets}]"
            elif name == "datasets.subsets" and header.group(1) == "[[":
                subsets += 1
                table = f"datasets[{datasets}].subsets[{subsets}]"
            else:
                table = name
            lines.setdefault(table, number)
        elif key := _KEY_LINE.match(line):
            name = next(group for group in key.groups() if group)
            lines.setdefault(f"{table}.{name}" if table else name, number)
    return lines


class _Reporter:
    """Builds error messages that name the file, the key path and (when known) the line."""

    def __init__(self, source: str, text: str | None) -> None:
        self.source = source
        self.lines = _line_numbers(text) if text is not None else {}

    def _line(self, key_path: str) -> int | None:
        # A value a dataset or subset inherits is written in an enclosing table or in [general].
        key = key_path.rpartition(".")[2]
        paths, table = [key_path], key_path.rpartition(".")[0]
        while table := table.rpartition(".")[0]:
            paths.append(f"{table}.{key}")
        return next((self.lines[p] for p in [*paths, f"general.{key}"] if p in self.lines), None)

    def error(self, key_path: str, message: str) -> UserError:
        line = self._line(key_path)
        return UserError(f"{self.source}: {key_path}{f' (line {line})' if line else ''}: {message}")

    def unknown_key(self, where: str, level: str, key: str) -> UserError:
        path = f"{where}.{key}"
        from library.data import text_config  # imported here: it builds on this module

        llm_keys = {*text_config.DATASET_KEYS, *text_config.ANY_LEVEL_KEYS, *text_config.SUBSET_KEYS}
        if key in llm_keys - _ALL_CHECKERS.keys():  # this module parses the dataset TOMLs of SD / SDXL runs only
            return self.error(path, f"'{key}' is an LLM dataset key: {self.source} is a dataset config for a causal LM "
                              "(text), but the model is a diffusion model (SD/SDXL), which trains on images; give an "
                              "image dataset TOML (image_dir subsets) or an LLM as --pretrained_model_name_or_path")
        if key in UNSUPPORTED_KEYS:
            return self.error(path, "this sd-scripts key is not supported by this toolkit; remove it")
        if any(key in keys for keys in _LEVEL_KEYS.values()):
            hint = "[general] or [[datasets]]" if key in DATASET_KEYS else "[[datasets.subsets]]"
            return self.error(path, f"'{key}' is not allowed in a {level} table; put it in {hint}")
        return self.error(path, f"unknown key '{key}'{did_you_mean(key, _LEVEL_KEYS[level])}")


def _checked_table(table: Any, where: str, level: str, report: _Reporter) -> dict[str, Any]:
    """The table's values after key and type checks (``subsets`` is passed through)."""
    if not isinstance(table, dict):
        raise report.error(where, f"expected a table, got {_toml_repr(table)}")
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in _LEVEL_KEYS[level]:
            raise report.unknown_key(where, level, key)
        if key == "subsets":
            values[key] = value
            continue
        try:
            values[key] = _ALL_CHECKERS[key](value)
        except _Bad as bad:
            raise report.error(f"{where}.{key}", f"got {_toml_repr(value)}, expected {bad}") from None
    return values


def load_dataset_config(path: Path | str, defaults: DatasetDefaults) -> DatasetGroupConfig:
    """Read and validate a kohya-style dataset TOML; see the module docstring for precedence."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--dataset_config {path}: file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # The message already says "(at line L, column C)".
        raise UserError(f"{path}: TOML syntax error: {exc}") from None
    return parse_dataset_config(data, defaults, source=str(path), text=text)


def parse_dataset_config(
    data: Mapping[str, Any], defaults: DatasetDefaults, source: str = "<dataset config>", text: str | None = None
) -> DatasetGroupConfig:
    """Validate an already-parsed dataset TOML (``text``, when given, adds line numbers to errors)."""
    report = _Reporter(source, text)
    for key in data:
        if key not in ("general", "datasets"):
            msg = f"unknown top-level key '{key}'{did_you_mean(key, ['general', 'datasets'])}"
            raise report.error(key, msg + "; expected [general] and [[datasets]]")
    general = _checked_table(data.get("general", {}), "general", "general", report)
    datasets = data.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise report.error("datasets", "no [[datasets]] table; add at least one with a [[datasets.subsets]]")
    cli = dataclasses.asdict(defaults)
    built = [_dataset(table, i, general, cli, report) for i, table in enumerate(datasets)]
    return DatasetGroupConfig(datasets=tuple(built), source=source)


def _dataset(table: Any, i: int, general: dict, cli: dict, report: _Reporter) -> DatasetConfig:
    where = f"datasets[{i}]"
    values = _checked_table(table, where, "dataset", report)
    subsets = values.pop("subsets", None)
    if not isinstance(subsets, list) or not subsets:
        raise report.error(where, 'no [[datasets.subsets]]; add one with image_dir = "..."')
    inherited = {**cli, **general, **values}  # later levels win
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
    _check_buckets(dataset, report)
    return dataset


# Written in a metadata_file subset, these would be ignored (its captions come from the JSON);
# sd-scripts' fine-tuning subset schema refuses them too. Inherited values are harmless.
_DREAMBOOTH_ONLY = ("class_tokens", "caption_extension")


def _subset(table: Any, where: str, inherited: dict, report: _Reporter) -> SubsetConfig:
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


def _check_buckets(dataset: DatasetConfig, report: _Reporter) -> None:
    if not dataset.enable_bucket:
        return
    lo, hi, (w, h) = dataset.min_bucket_reso, dataset.max_bucket_reso, dataset.resolution
    if lo > hi:
        raise report.error(dataset.name, f"min_bucket_reso ({lo}) is larger than max_bucket_reso ({hi})")
    if min(w, h) < lo or max(w, h) > hi:
        raise report.error(
            dataset.name,
            f"resolution {w}x{h} is outside the bucket range min_bucket_reso={lo} .. max_bucket_reso={hi}; "
            "lower min_bucket_reso or raise max_bucket_reso",
        )


# ---------------------------------------------------------------------------------------
# Legacy layout: --train_data_dir / --reg_data_dir with "N_name" subfolders.

_REPEATS_FOLDER = re.compile(r"^(\d+)_(.*)$")


def config_from_train_data_dir(defaults: DatasetDefaults) -> DatasetGroupConfig:
    """One dataset from the ``N_name`` subfolders of train_data_dir (and reg_data_dir, is_reg)."""
    if defaults.train_data_dir is None:
        raise UserError("Give --train_data_dir (a folder of N_name subfolders) or --dataset_config.")
    if defaults.in_json is not None:
        subsets = [_metadata_subset(defaults)]
    else:
        subsets = _folder_subsets(Path(defaults.train_data_dir), "--train_data_dir", False, defaults)
    if defaults.reg_data_dir is not None:
        if defaults.in_json is not None:
            raise UserError("--reg_data_dir is for DreamBooth folders; a fine-tuning dataset (--in_json) has no "
                            "regularisation images. Remove one of them.")
        subsets += _folder_subsets(Path(defaults.reg_data_dir), "--reg_data_dir", True, defaults)
    dataset = DatasetConfig(
        subsets=tuple(subsets), name="--train_data_dir", **{k: getattr(defaults, k) for k in DATASET_KEYS}
    )
    _check_buckets(dataset, _Reporter("command line", None))
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
    if not folders:
        raise UserError(
            f"{option} {root} has no subfolders; put the images in a subfolder named N_name "
            "(N = repeats, name = class tokens), e.g. 10_sks dog"
            + ("; or, for images captioned by sd-scripts' fine-tuning metadata JSON, pass it as --in_json"
               if not is_reg else "")
        )
    subsets = []
    for folder in folders:
        match = _REPEATS_FOLDER.match(folder.name)
        if match is None or int(match.group(1)) < 1:
            raise UserError(
                f"{option}: subfolder '{folder.name}' is not named N_name (N = repeats >= 1, name = class "
                f"tokens), e.g. '10_{folder.name}'; rename it or move it out of {root}"
            )
        any_level = {k: getattr(defaults, k) for k in ANY_LEVEL_KEYS}
        any_level["num_repeats"] = int(match.group(1))
        any_level["class_tokens"] = match.group(2) or None
        subsets.append(SubsetConfig(image_dir=folder, is_reg=is_reg, name=f"{option}/{folder.name}", **any_level))
    return subsets


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
