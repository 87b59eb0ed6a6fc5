"""Reading the rows of an LLM data file: JSON Lines (also gzipped), a JSON array, or plain text blocks.

JSON Lines is what the dataset TOML's ``jsonl_file`` names; a ``.json`` file holding one array of objects
(Alpaca and many exported datasets) and a ``.jsonl.gz`` / ``.json.gz`` file are read too, as TRL, axolotl and
LLaMA-Factory read them. Parquet and Arrow (``datasets.save_to_disk``) folders are not: library/data/text_config.py
refuses them by name with a one-line conversion.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from library.errors import UserError

if TYPE_CHECKING:
    from library.data.text_config import TextSubsetConfig


class RowError(Exception):
    """A row that cannot become a sample; the message says why."""


def _open_text(path: Path):
    """The file as UTF-8 text (an optional BOM dropped); ``.gz`` files decompressed on the fly."""
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", errors="surrogateescape")
    return open(path, encoding="utf-8-sig", errors="surrogateescape")


def is_json_array_file(path: Path) -> bool:
    """``.json`` (or ``.json.gz``): one JSON array of rows, not one object per line."""
    name = path.name.lower().removesuffix(".gz")
    return name.endswith(".json")


# surrogateescape decodes each byte that is not UTF-8 to one of these (valid UTF-8 never gives them)
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


def _not_utf8(line: str) -> RowError | None:
    """The RowError for a line read with ``surrogateescape`` that held bytes which are not UTF-8, else None."""
    found = _ESCAPED_BYTE.search(line)
    if found is None:
        return None
    byte = ord(found.group()) - 0xDC00
    return RowError(f"not UTF-8 text (byte 0x{byte:02x} at column {found.start() + 1}); re-save the file as UTF-8")


def read_rows(subset: TextSubsetConfig):
    """(line number, row) pairs: JSON objects for JSONL, text blocks otherwise; a bad line yields its RowError.

    The file is read as UTF-8 with an optional BOM (Windows tools write one). Bytes that are not UTF-8
    are escaped rather than raised, so such a line is a bad row like any other (reported or skipped
    per ``on_bad_row``) instead of ending the read of the whole file.
    """
    path = Path(subset.path)
    if subset.kind == "jsonl" and is_json_array_file(path):
        yield from _json_array_rows(path)
        return
    with _open_text(path) as f:
        if subset.kind == "jsonl":
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                bad = _not_utf8(line)
                if bad is not None:
                    yield number, bad
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    yield number, RowError(f"not valid JSON ({e.msg} at column {e.colno})")
                    continue
                yield number, row if isinstance(row, dict) else RowError("not a JSON object")
            return
        block: list[str] = []
        start = 0
        bad_line: tuple[int, RowError] | None = None  # the block's first undecodable line
        for number, line in enumerate(f, start=1):
            if line.strip():
                start = start or number
                block.append(line)
                if bad_line is None and (bad := _not_utf8(line)):
                    bad_line = (number, bad)
            elif block:
                yield bad_line or (start, "".join(block).strip("\n"))
                block, start, bad_line = [], 0, None
        if block:
            yield bad_line or (start, "".join(block).strip("\n"))


def _json_array_rows(path: Path):
    """(entry number, row) pairs of a JSON array file; the number counts entries from 1 (in place of a line)."""
    with _open_text(path) as f:
        text = f.read()
    bad = _not_utf8(text)
    if bad is not None:
        raise UserError(f"{path}: {bad}")
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); a .json file must "
                        "hold one array of objects (one object per line is JSON Lines: name it .jsonl)") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: a .json data file must hold one array of objects [{{...}}, ...], found a "
                        f"{type(data).__name__}; one object per line is JSON Lines: name it .jsonl")
    for number, row in enumerate(data, start=1):
        yield number, row if isinstance(row, dict) else RowError("not a JSON object")
