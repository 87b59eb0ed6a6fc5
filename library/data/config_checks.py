"""Reading a dataset config file (TOML, or JSON as sd-scripts also accepts) and checking its values.

Shared by the image (``library/dataset_config.py``) and LLM (``text_config.py``) dataset configs:
the value checkers, and ``Reporter``, which builds messages naming the file, the key path
(``datasets[0].subsets[1].num_repeats``) and, when it can be found, the line of the key.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from library.errors import UserError

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


def _toml_repr(value: Any) -> str:
    if value is None:  # only JSON can write it
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, list, dict)):
        return json.dumps(value, default=str)
    return repr(value)


# ---------------------------------------------------------------------------------------
# Reading the file and finding the line of each key.


def is_json(path: Path | str) -> bool:
    """sd-scripts reads a dataset config ending in .json as JSON, anything else as TOML."""
    return Path(path).suffix.lower() == ".json"


# A data file's columns → the dataset TOML keys that read them (the first whose columns a row has all wins).
_DATA_COLUMNS: tuple[tuple[tuple[str, ...], tuple[tuple[str, str], ...]], ...] = (
    (("messages",), (("messages_column", "messages"),)),
    (("conversations",), (("messages_column", "conversations"),)),
    (("instruction", "input", "output"),
     (("prompt_column", "instruction"), ("input_column", "input"), ("response_column", "output"),
      ("prompt_template", "alpaca"))),
    (("instruction", "output"), (("prompt_column", "instruction"), ("response_column", "output"),
                                 ("prompt_template", "alpaca"))),
    (("prompt", "completion"), (("prompt_column", "prompt"), ("response_column", "completion"))),
    (("prompt", "response"), (("prompt_column", "prompt"), ("response_column", "response"))),
    (("text",), (("text_column", "text"),)),
)
_DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")


def _data_rows(text: str) -> list[dict] | None:
    """The first rows of ``text`` when it is a data file (JSON Lines or a JSON array of objects with a known
    column), else None."""
    rows: list[Any] = []
    text = text.removeprefix("\ufeff")
    try:
        data = json.loads(text)
        rows = data[:5] if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        for line in [line for line in text.splitlines() if line.strip()][:5]:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                return None
    rows = [row for row in rows if isinstance(row, dict)]
    if rows and any(set(names) <= row.keys() for row in rows for names, _ in _DATA_COLUMNS):
        return rows
    return None


def _toml_string(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string


def data_file_error(path: Path, text: str | None) -> UserError | None:
    """The error for a data file given as ``--dataset_config``: the dataset TOML that wraps it; else None.

    A ``.jsonl`` name, or rows that are objects with messages / conversations / prompt / instruction / text
    columns, make it a data file (what TRL's ``--dataset_name`` takes), not a dataset TOML.
    """
    rows = _data_rows(text) if text is not None else None
    if rows is None and not path.name.lower().endswith(_DATA_SUFFIXES):
        return None
    seen = next((keys for names, keys in _DATA_COLUMNS for row in rows or [] if set(names) <= row.keys()), None)
    data_path, note = path.resolve(), ""
    if rows is not None and is_json(path):
        try:
            whole = json.loads((text or "").removeprefix("\ufeff"))
        except json.JSONDecodeError:  # one object per line named .json: the data reader wants .jsonl
            data_path = data_path.with_suffix(".jsonl")
            note = f"; one object per line is JSON Lines: rename the file {data_path.name}"
        else:
            if not isinstance(whole, list):
                note = "; a .json data file holds an array of rows [{...}, ...]: put the row in one"
    lines = ["[[datasets]]", "  [[datasets.subsets]]", f"  jsonl_file = {_toml_string(str(data_path))}"]
    lines += [f"  {key} = {_toml_string(value)}" for key, value in seen or ()]
    if seen is None:
        lines.append('  messages_column = "messages"   # or prompt_column + response_column, or text_column')
        columns = sorted({c for row in rows or [] for c in row})
        what = f"a data file (JSON Lines{'; its rows have ' + ', '.join(columns) if columns else ''})"
    else:
        columns = [repr(value) for key, value in seen if key.endswith("_column")]
        named = f"a {columns[0]} column" if len(columns) == 1 else f"{', '.join(columns)} columns"
        what = f"a data file (rows with {named})"
    toml = "\n".join(lines)
    return UserError(f"--dataset_config {path} is {what}, not a dataset TOML{note}. Save these lines as a .toml "
                     f"file (e.g. data.toml) and pass that as --dataset_config:\n\n{toml}\n")


def read_config_file(path: Path) -> tuple[dict[str, Any], str]:
    """The parsed file and its text; a missing file or a syntax error is a UserError with the line."""
    if not path.is_file():
        raise UserError(f"--dataset_config {path}: file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        if error := data_file_error(path, None):
            raise error from None
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if error := data_file_error(path, text):
        raise error
    if is_json(path):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: JSON syntax error at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
        if not isinstance(data, dict):
            raise UserError(f'{path}: expected a JSON object {{"general": {{...}}, "datasets": [...]}}, '
                            f"got {type(data).__name__}")
        return data, text
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as exc:
        # The message already says "(at line L, column C)".
        hint = "; it looks like JSON: name the file .json" if text.lstrip().startswith("{") else ""
        raise UserError(f"{path}: TOML syntax error: {exc}{hint}") from None


_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(?:#.*)?$")
_KEY_LINE = re.compile(r"^\s*(?:\"([^\"]+)\"|'([^']+)'|([A-Za-z0-9_-]+))\s*=")


def _toml_line_numbers(text: str) -> dict[str, int]:
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


_JSON_TOKEN = re.compile(r'"(?:[^"\\\n]|\\.)*"|[{}\[\],]|\n')


def _json_line_numbers(text: str) -> dict[str, int]:
    """Line of every key and array element of (syntactically valid) JSON, by key path."""
    lines: dict[str, int] = {}
    # One frame per open object / array: [path, is_object, expecting a key, next child's path or index]
    stack: list[list[Any]] = []
    number = 1

    def child_path() -> str:
        if not stack:
            return ""
        path, is_object, _, child = stack[-1]
        return child if is_object else f"{path}[{child}]"

    for token in _JSON_TOKEN.finditer(text):
        tok = token.group()
        if tok == "\n":
            number += 1
        elif tok in "{[":
            path = child_path()
            if path:
                lines.setdefault(path, number)
            stack.append([path, tok == "{", tok == "{", 0])
        elif tok in "}]":
            if stack:
                stack.pop()
        elif tok == ",":
            if stack and stack[-1][1]:
                stack[-1][2] = True
            elif stack:
                stack[-1][3] += 1
        elif stack and stack[-1][1] and stack[-1][2]:  # a key
            parent = stack[-1][0]
            key = json.loads(tok)
            stack[-1][2], stack[-1][3] = False, f"{parent}.{key}" if parent else key
            lines.setdefault(stack[-1][3], number)
    return lines


class Reporter:
    """Builds error messages that name the file, the key path and (when known) the line."""

    def __init__(self, source: str, text: str | None) -> None:
        self.source = source
        if text is None:
            self.lines: dict[str, int] = {}
        else:
            self.lines = _json_line_numbers(text) if is_json(source) else _toml_line_numbers(text)

    def line(self, key_path: str) -> int | None:
        # A value a dataset or subset inherits is written in an enclosing table or in [general].
        key = key_path.rpartition(".")[2]
        paths, table = [key_path], key_path.rpartition(".")[0]
        while table := table.rpartition(".")[0]:
            paths.append(f"{table}.{key}")
        return next((self.lines[p] for p in [*paths, f"general.{key}"] if p in self.lines), None)

    def at(self, key_path: str) -> str:
        """``key_path`` with its line, when known: ``datasets[0].resolution (line 5)``."""
        line = self.line(key_path)
        return f"{key_path}{f' (line {line})' if line else ''}"

    def error(self, key_path: str, message: str) -> UserError:
        return UserError(f"{self.source}: {self.at(key_path)}: {message}")
