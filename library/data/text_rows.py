"""Reading the rows of an LLM data file: JSON Lines (also gzipped), a JSON array, or plain text blocks; and
the columns of a row: a text column, or chat turns as {"role", "content"} (OpenAI, ShareGPT, text parts).

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


# --- the columns of a row ------------------------------------------------------------------------


# Columns that tell which dataset TOML key a row's format wants, for the "no column" message.
_FORMAT_HINTS = (({"messages"}, 'messages_column = "messages"'),
                 ({"conversations"}, 'messages_column = "conversations" (ShareGPT from/value turns are read)'),
                 ({"prompt", "completion"}, 'prompt_column = "prompt" and response_column = "completion"'),
                 ({"prompt", "response"}, 'prompt_column = "prompt" and response_column = "response"'),
                 ({"instruction", "input", "output"},
                  'prompt_column = "instruction", input_column = "input" and response_column = "output" (Alpaca)'),
                 ({"instruction", "output"}, 'prompt_column = "instruction" and response_column = "output"'),
                 ({"text"}, 'text_column = "text"'))


def _column(row: dict, column: str, kind: type) -> Any:
    if column not in row:
        hint = next((f"; set {key} in the dataset TOML" for names, key in _FORMAT_HINTS if names <= row.keys()), "")
        raise RowError(f"no column '{column}' (the row has: {', '.join(sorted(row)) or 'no columns'}){hint}")
    value = row[column]
    if kind is str and _is_message_list(value):
        # TRL's conversational prompt/completion: {"prompt": [turns], "completion": [turns]}
        raise RowError(f"column '{column}' holds chat turns (TRL's conversational prompt/completion), not text; "
                       "chat rows are read from one column: write each row as {\"messages\": prompt + completion} "
                       "(e.g. jq -c '{messages: (.prompt + .completion)}' in.jsonl > out.jsonl) and set "
                       'messages_column = "messages" (the assistant turns are learnt, as TRL\'s completion)')
    if not isinstance(value, kind):
        raise RowError(f"column '{column}' is {type(value).__name__}, expected {kind.__name__}")
    if kind is str and not value.strip():
        raise RowError(f"column '{column}' is empty")
    return value


def _is_message_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and ("role" in m or "from" in m) for m in value)


def check_row(subset: TextSubsetConfig, row: Any) -> None:
    """Raise :class:`RowError` for a row the tokeniser would refuse (missing/empty columns, malformed chat),
    without tokenising; tools/check_dataset.py reports with it what training would say."""
    if isinstance(row, RowError):
        raise row
    if subset.format == "chat":
        _messages(row, subset.messages_column)
    elif subset.format == "instruct":
        _column(row, subset.prompt_column, str)
        _column(row, subset.response_column, str)
    elif not isinstance(row, str):
        _column(row, subset.text_column, str)


# ShareGPT's speaker names (``{"from": "human", "value": ...}``), as axolotl and LLaMA-Factory read them.
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "bing": "assistant", "system": "system"}


# The roles a turn may have (ShareGPT's speaker names are mapped to them).
_ROLES = ("system", "user", "assistant", "tool")


def _message(m: Any, where: str) -> dict:
    """One turn as {"role", "content"}: OpenAI's form, ShareGPT's from/value, or content given as text parts.

    ShareGPT's speaker names are mapped under ``role`` too (``{"role": "human"}`` is a user turn, as
    ``{"from": "human"}`` is); any other role is refused rather than rendered as an unknown speaker.
    """
    if isinstance(m, dict) and "from" in m and "value" in m and "role" not in m:
        if m["from"] not in _SHAREGPT_ROLES:
            raise RowError(f"{where}: ShareGPT speaker '{m['from']}' is not one of {', '.join(_SHAREGPT_ROLES)}")
        m = {"role": _SHAREGPT_ROLES[m["from"]], "content": m["value"]}
    if isinstance(m, dict) and (m.get("tool_calls") or m.get("function_call")):
        key = "tool_calls" if m.get("tool_calls") else "function_call"
        raise RowError(f"{where} has {key}: tool calls are not supported (only text turns are trained); "
                       "leave such rows out of the file")
    if isinstance(m, dict) and isinstance(m.get("role"), str) and m["role"] not in _ROLES:
        role = m["role"]
        if role not in _SHAREGPT_ROLES:
            raise RowError(f"{where}: role '{role}' is not one of {', '.join(_ROLES)} (nor ShareGPT's "
                           f"{', '.join(r for r in _SHAREGPT_ROLES if r not in _ROLES)})")
        m = {**m, "role": _SHAREGPT_ROLES[role]}
    if isinstance(m, dict) and isinstance(m.get("content"), list):  # [{"type": "text", "text": ...}, ...]
        parts = m["content"]
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in parts):
            raise RowError(f"{where}: only text content parts can be trained ({{\"type\": \"text\", \"text\": ...}})")
        m = {**m, "content": "".join(p["text"] for p in parts)}
    if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
        raise RowError(f"{where} is not {{\"role\": str, \"content\": str}} (nor ShareGPT's {{\"from\", \"value\"}})")
    return m


def _system_into_first_user(messages: list[dict]) -> list[dict]:
    """The system message's text put before the first user turn's, for templates without a system role."""
    system, rest = messages[0], list(messages[1:])
    for i, m in enumerate(rest):
        if m["role"] == "user":
            rest[i] = {**m, "content": f"{system['content']}\n\n{m['content']}"}
            return rest
    return [{"role": "user", "content": system["content"]}, *rest]


def _messages(row: dict, column: str) -> list[dict]:
    messages = [_message(m, f"{column}[{i}]") for i, m in enumerate(_column(row, column, list))]
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError(f"'{column}' has no assistant message to learn")
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip():  # as for an empty response_column
            raise RowError(f"{column}[{i}] is an empty assistant message")
    return messages
