"""The LLM dataset TOML (CONTRACTS.md §6): the image TOML's three levels with text keys.

    [general]                      # any key of [[datasets]] or [[datasets.subsets]]
    [[datasets]]                   # batch_size, max_seq_length, packing, validation_split, validation_seed
      [[datasets.subsets]]         # jsonl_file or text_file, and the keys below
      jsonl_file = "chat.jsonl"
      messages_column = "messages"

Keys at any level: ``num_repeats``, ``text_column``, ``prompt_column`` + ``response_column``,
``messages_column``, ``chat_template`` (a Jinja file), ``prompt_template`` (library/data/prompt_templates.py),
``train_on_prompt``, ``on_bad_row``.
A value is looked up subset → dataset → ``[general]`` → command line (``--train_batch_size``,
``--validation_split``, ``--validation_seed``) → default, as for images. A JSONL subset uses exactly one
format: ``messages_column`` (chat), ``prompt_column`` + ``response_column`` (instruction), or ``text_column``
(default ``"text"``).
Unknown keys, image keys and wrong types are errors naming the file, key path and line.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from library.data.config_checks import (
    Reporter,
    _Bad,
    _bool,
    _fraction,
    _int,
    _optional_int,
    _path,
    _str,
    _toml_repr,
    read_config_file,
)
from library.data.prompt_templates import check_prompt_template
from library.dataset_config import ANY_LEVEL_KEYS as IMAGE_ANY_LEVEL_KEYS
from library.dataset_config import DATASET_KEYS as IMAGE_DATASET_KEYS
from library.dataset_config import SUBSET_KEYS as IMAGE_SUBSET_KEYS
from library.errors import UserError, did_you_mean

logger = logging.getLogger(__name__)

FORMATS = ("chat", "instruct", "text")
DEFAULT_TEXT_COLUMN = "text"
_JSON_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson")
_warned_json_text_files: set[Path] = set()  # a file is warned about once per process


@dataclass(frozen=True)
class TextSubsetConfig:
    """One JSONL or plain-text file and how its rows become training sequences."""

    path: Path
    kind: str  # "jsonl" | "text"
    num_repeats: int = 1
    text_column: str | None = None
    prompt_column: str | None = None
    response_column: str | None = None
    input_column: str | None = None  # Alpaca's "input": appended to the prompt after a blank line when not empty
    messages_column: str | None = None
    chat_template: Path | None = None
    prompt_template: str | None = None  # instruction rows: "chat", "alpaca" or a text with {prompt}
    train_on_prompt: bool = False
    on_bad_row: str = "error"
    name: str = "subset"

    @property
    def format(self) -> str:
        """chat, instruct or text (a plain-text file is always text)."""
        if self.kind == "text":
            return "text"
        if self.messages_column:
            return "chat"
        return "instruct" if self.prompt_column else "text"


@dataclass(frozen=True)
class TextDatasetConfig:
    """Subsets trained together: one sequence length, one batch size (per process), one packing mode."""

    subsets: tuple[TextSubsetConfig, ...]
    batch_size: int = 1
    max_seq_length: int | None = None  # None: the family's default (min(2048, the model's positions))
    packing: bool = True
    validation_split: float = 0.0
    validation_seed: int | None = None
    name: str = "dataset"


@dataclass(frozen=True)
class TextDatasetGroup:
    datasets: tuple[TextDatasetConfig, ...]
    source: str = ""


def _prompt_template(value: Any) -> str:
    value = _str(allow_empty=False)(value)
    if (why := check_prompt_template(value)) is not None:
        raise _Bad(why)
    return value


def _choice(*options: str):
    def check(value: Any) -> str:
        if value not in options:
            raise _Bad(" or ".join(f'"{o}"' for o in options))
        return value

    return check


DATASET_KEYS = {
    "batch_size": _int(1),
    "max_seq_length": _int(2),
    "packing": _bool,
    "validation_split": _fraction(upper_inclusive=False),
    "validation_seed": _optional_int,
}
ANY_LEVEL_KEYS = {
    "num_repeats": _int(1),
    "text_column": _str(allow_empty=False),
    "prompt_column": _str(allow_empty=False),
    "response_column": _str(allow_empty=False),
    "input_column": _str(allow_empty=False),
    "messages_column": _str(allow_empty=False),
    "chat_template": _path,
    "prompt_template": _prompt_template,
    "train_on_prompt": _bool,
    "on_bad_row": _choice("error", "skip"),
}
SUBSET_KEYS = {"jsonl_file": _path, "text_file": _path}
COLUMN_KEYS = ("text_column", "prompt_column", "response_column", "input_column", "messages_column")
_LEVEL_KEYS = {
    "general": set(DATASET_KEYS) | set(ANY_LEVEL_KEYS),
    "dataset": set(DATASET_KEYS) | set(ANY_LEVEL_KEYS) | {"subsets"},
    "subset": set(ANY_LEVEL_KEYS) | set(SUBSET_KEYS),
}
_CHECKERS = {**DATASET_KEYS, **ANY_LEVEL_KEYS, **SUBSET_KEYS}
_IMAGE_KEYS = (set(IMAGE_DATASET_KEYS) | set(IMAGE_ANY_LEVEL_KEYS) | set(IMAGE_SUBSET_KEYS)) - set(_CHECKERS)


def _table(table: Any, where: str, level: str, report: Reporter) -> dict[str, Any]:
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
            values[key] = _CHECKERS[key](value)
        except _Bad as bad:
            raise report.error(f"{where}.{key}", f"got {_toml_repr(value)}, expected {bad}") from None
    return values


def _unknown_key(report: Reporter, where: str, level: str, key: str) -> UserError:
    path = f"{where}.{key}"
    if key in _IMAGE_KEYS:
        return report.error(path, f"'{key}' is an image dataset key; an LLM dataset reads jsonl_file or text_file "
                                  "(see configs/llm_example_data.toml)")
    if any(key in keys for keys in _LEVEL_KEYS.values()):
        hint = "[general] or [[datasets]]" if key in DATASET_KEYS else "[[datasets.subsets]]"
        return report.error(path, f"'{key}' is not allowed in a {level} table; put it in {hint}")
    return report.error(path, f"unknown key '{key}'{did_you_mean(key, _LEVEL_KEYS[level])}")


def load_text_dataset_config(path: Path | str, batch_size: int = 1, *, validation_split: float = 0.0,
                             validation_seed: int | None = None) -> TextDatasetGroup:
    """Read and validate an LLM dataset TOML (JSON when named .json). ``batch_size``, ``validation_split`` and
    ``validation_seed`` are the command line's (``--train_batch_size``, ...): the lowest level of the lookup."""
    path = Path(path)
    data, text = read_config_file(path)
    return parse_text_dataset_config(data, batch_size, source=str(path), text=text,
                                     validation_split=validation_split, validation_seed=validation_seed)


def parse_text_dataset_config(data: Mapping[str, Any], batch_size: int = 1, source: str = "<dataset config>",
                              text: str | None = None, *, validation_split: float = 0.0,
                              validation_seed: int | None = None) -> TextDatasetGroup:
    """Validate an already-parsed LLM dataset TOML (``text`` adds line numbers to errors)."""
    report = Reporter(source, text)
    for key in data:
        if key not in ("general", "datasets"):
            msg = f"unknown top-level key '{key}'{did_you_mean(key, ['general', 'datasets'])}"
            raise report.error(key, msg + "; expected [general] and [[datasets]]")
    general = _table(data.get("general", {}), "general", "general", report)
    datasets = data.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise report.error("datasets", 'no [[datasets]] table; add one with a [[datasets.subsets]] jsonl_file = "..."')
    defaults = {"batch_size": batch_size, "max_seq_length": None, "packing": True,
                "validation_split": validation_split, "validation_seed": validation_seed, "num_repeats": 1,
                "train_on_prompt": False, "on_bad_row": "error"}
    built = tuple(_dataset(t, i, {**defaults, **general}, report) for i, t in enumerate(datasets))
    return TextDatasetGroup(datasets=built, source=source)


def _dataset(table: Any, i: int, inherited: dict[str, Any], report: Reporter) -> TextDatasetConfig:
    where = f"datasets[{i}]"
    values = _table(table, where, "dataset", report)
    subsets = values.pop("subsets", None)
    if not isinstance(subsets, list) or not subsets:
        raise report.error(where, 'no [[datasets.subsets]]; add one with jsonl_file = "..." or text_file = "..."')
    merged = {**inherited, **values}
    built = tuple(_subset(s, f"{where}.subsets[{j}]", merged, report) for j, s in enumerate(subsets))
    return TextDatasetConfig(subsets=built, name=where, **{k: merged[k] for k in DATASET_KEYS})


def _subset(table: Any, where: str, inherited: dict[str, Any], report: Reporter) -> TextSubsetConfig:
    own = _table(table, where, "subset", report)
    files = [k for k in SUBSET_KEYS if k in own]
    if len(files) != 1:
        raise report.error(where, "needs exactly one of jsonl_file or text_file" + (f", got {files}" if files else ""))
    kind = "jsonl" if files[0] == "jsonl_file" else "text"
    path = own.pop(files[0])
    convert = ("convert it to JSON Lines, e.g. python -c \"import datasets; datasets.load_from_disk('IN')"
               ".to_json('OUT.jsonl')\" (a folder) or pandas.read_parquet('IN').to_json('OUT.jsonl', "
               "orient='records', lines=True)")
    if path.is_dir() or path.suffix.lower() in (".parquet", ".arrow"):
        what = "a folder" if path.is_dir() else f"a {path.suffix.lower()[1:]} file"
        raise report.error(f"{where}.{files[0]}", f"{path} is {what}; jsonl_file reads JSON Lines (.jsonl, "
                           f".jsonl.gz) or a JSON array (.json): {convert}")
    if not path.is_file():
        raise report.error(f"{where}.{files[0]}", f"file not found: {path}")
    merged = {k: inherited[k] for k in ANY_LEVEL_KEYS if k in inherited} | own
    if kind == "text":
        _warn_json_as_text(path, report.at(f"{where}.text_file"), report.source)
        explicit = [k for k in COLUMN_KEYS if k in own]
        if explicit:
            raise report.error(f"{where}.{explicit[0]}", "text_file reads plain text; column keys apply to jsonl_file")
        merged = {k: v for k, v in merged.items() if k not in (*COLUMN_KEYS, "chat_template", "prompt_template")}
    else:
        _check_columns(merged, where, report, own)
    if merged.get("chat_template") is not None and not merged["chat_template"].is_file():
        raise report.error(f"{where}.chat_template", f"file not found: {merged['chat_template']}")
    return TextSubsetConfig(path=path, kind=kind, name=where, **merged)


def _warn_json_as_text(path: Path, at: str, source: str) -> None:
    """A JSON (Lines) file as text_file trains on its raw JSON text, braces and keys included: say so, once."""
    if not path.name.lower().endswith(_JSON_SUFFIXES) or path.resolve() in _warned_json_text_files:
        return
    _warned_json_text_files.add(path.resolve())
    logger.warning("%s: %s: text_file = %s is read as plain text, so the model trains on its raw JSON (braces, "
                   "quotes and keys included); jsonl_file = \"%s\" (with messages_column, prompt_column + "
                   "response_column or text_column) is probably meant", source, at, path, path)


def _check_columns(values: dict[str, Any], where: str, report: Reporter, own: dict[str, Any]) -> None:
    formats = [f for f, keys in (("chat", ("messages_column",)), ("instruct", ("prompt_column", "response_column")),
                                 ("text", ("text_column",))) if any(values.get(k) for k in keys)]
    if len(formats) > 1:
        set_keys = [k for k in COLUMN_KEYS if values.get(k)]
        raise report.error(where, f"sets {', '.join(set_keys)} (here or inherited): choose one format, "
                                  "messages_column (chat), prompt_column + response_column, or text_column")
    if formats == ["instruct"] and not (values.get("prompt_column") and values.get("response_column")):
        raise report.error(where, "prompt_column and response_column go together; set both")
    if formats != ["instruct"]:
        # Keys of instruction rows: set in this subset they are a mistake; inherited from [general] or the
        # dataset (for the instruction subsets beside this one) they do not apply here.
        for key, why in (("input_column", "adds Alpaca's input to the prompt"),
                         ("prompt_template", "formats instruction rows")):
            if values.get(key) and key in own:
                hint = " (chat rows use chat_template)" if key == "prompt_template" and formats == ["chat"] else ""
                raise report.error(f"{where}.{key}", f"{why}; it goes with prompt_column + response_column{hint}")
            values.pop(key, None)
    if not formats:
        values["text_column"] = DEFAULT_TEXT_COLUMN


def _seq_length_key(text: str | None, name: str) -> str:
    """Where max_seq_length was set for dataset ``name`` (datasets[i]): its own table, else [general], which it
    inherits."""
    import re
    import tomllib

    try:
        datasets = tomllib.loads(text).get("datasets") if text else None
    except tomllib.TOMLDecodeError:  # a .json config: the dataset's own key is the better guess
        datasets = None
    found = re.fullmatch(r"datasets\[(\d+)\]", name)
    if not isinstance(datasets, list) or found is None or int(found.group(1)) >= len(datasets):
        return f"{name}.max_seq_length"
    own = datasets[int(found.group(1))]
    return f"{name}.max_seq_length" if isinstance(own, dict) and "max_seq_length" in own else "general.max_seq_length"


def replace_max_seq_length(group: TextDatasetGroup, default: int, limit: int | None = None) -> TextDatasetGroup:
    """Fill each dataset's unset max_seq_length with the model's default; a value above ``limit`` (the
    model's max_position_embeddings, None when unknown) is an error: positions past it were never trained
    and, for learned position embeddings, do not exist."""
    for d in group.datasets:
        if limit is not None and d.max_seq_length is not None and d.max_seq_length > limit:
            source = Path(group.source)
            text = source.read_text(encoding="utf-8") if source.is_file() else None
            raise Reporter(group.source, text).error(
                _seq_length_key(text, d.name), f"{d.max_seq_length} is more than the model supports "
                f"(max_position_embeddings = {limit}); set max_seq_length = {limit} or less")
    return dataclasses.replace(group, datasets=tuple(
        d if d.max_seq_length is not None else dataclasses.replace(d, max_seq_length=default) for d in group.datasets))
