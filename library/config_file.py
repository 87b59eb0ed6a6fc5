"""``--config_file`` / ``--output_config`` and where every argument value came from.

Precedence (CONTRACTS.md §2): command line > TOML > argparse default. The TOML's tables
only group keys; they are flattened. Unlike sd-scripts, an unknown key or a value of the
wrong type is an error naming the key, its line and the closest valid name; the kohya_ss
GUI's own keys (library/sd_scripts_args.py GUI_ONLY_KEYS) are ignored with one note.

GUI exports also differ from hand-written TOMLs in how they say "off" or "none": a switch as
0 / 1 (``int(checkbox)``), an empty string for a folder or file not chosen, and an empty
string for a list of ``key=value`` options. Those mean off / unset / no options here.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import toml

from library.errors import UserError, did_you_mean
from library.sd_scripts_args import GUI_ONLY_KEYS

if TYPE_CHECKING:
    from library.accelerator import Setting

# Never written by --output_config nor logged: secrets and the config switches themselves.
SECRET_KEYS = frozenset({"wandb_api_key", "huggingface_token"})
_NOT_WRITTEN = frozenset({"config_file", "output_config"}) | SECRET_KEYS

# Where parse_args_with_sources keeps the GUI keys it ignored, as (key, value) pairs, for the log's note
# (arg_checks.no_op_notes); the leading underscore keeps it out of the tracker log.
IGNORED_KEYS_ATTR = "_config_file_ignored"

SOURCE_CLI = "command line"
SOURCE_DEFAULT = "default"


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest != "help"}


def _key_line(text: str, key: str) -> int | None:
    """The 1-based line where ``key`` is assigned in the TOML text, for error messages (also as the last
    part of a dotted key: ``training.learning_rate = 1e-4``)."""
    pattern = re.compile(rf"^\s*(?:[\w\"' -]+\.\s*)*[\"']?{re.escape(key)}[\"']?\s*=")
    for number, line in enumerate(text.splitlines(), start=1):
        if pattern.match(line):
            return number
    return None


def toml_path(name: str) -> Path:
    """``--config_file run`` means run.toml, for reading and for --output_config, as in sd-scripts."""
    path = Path(name)
    return path if path.suffix.lower() == ".toml" else path.with_name(path.name + ".toml")


def read_toml(path: Path) -> tuple[dict[str, Any], str]:
    """Parse a TOML file, turning syntax errors into a UserError with file and line."""
    if not path.is_file():
        raise UserError(f"Config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        return toml.loads(text), text
    except toml.TomlDecodeError as e:
        raise UserError(f"{path}: TOML syntax error at line {e.lineno}, column {e.colno}: {e.msg}") from None


def _flatten(data: dict[str, Any], path: Path, actions: dict[str, argparse.Action]) -> dict[str, tuple[Any, str]]:
    """Flatten one level of tables; returns key → (value, table name) and rejects duplicates."""
    flat: dict[str, tuple[Any, str]] = {}
    for key, value in data.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            if key in ("datasets", "subsets"):
                raise UserError(f"{path}: [[{key}]] belongs in a dataset TOML; pass that file with "
                                f"--dataset_config, not --config_file.")
            raise UserError(f"{path}: [[{key}]] (an array of tables) is not an argument; use [section] tables "
                            "holding argument = value lines.")
        if isinstance(value, dict) and key in actions:
            # `seed = {a = 1}` (or a [seed] table): the argument takes a value, not a table.
            raise UserError(f"{path}: '{key}' = {value!r} has the wrong type; --{key} takes a single value, "
                            "not a table.")
        items = value.items() if isinstance(value, dict) else [(key, value)]
        table = key if isinstance(value, dict) else ""
        for sub_key, sub_value in items:
            if isinstance(sub_value, dict):
                raise UserError(f"{path}: table [{table}.{sub_key}] is nested too deeply; "
                                "use [section] tables holding argument = value lines.")
            if sub_key in flat:
                raise UserError(f"{path}: argument '{sub_key}' is set twice (in [{flat[sub_key][1]}] and "
                                f"[{table}]); keep one.")
            flat[sub_key] = (sub_value, table)
    return flat


def _convert(action: argparse.Action, key: str, value: Any, where: str) -> Any:
    """Check and convert one TOML value the way argparse would treat the CLI string."""
    def bad(expected: str) -> UserError:
        return UserError(f"{where}: '{key}' = {value!r} has the wrong type; expected {expected}.")

    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        # kohya_ss GUI v24 / v25.0 write some switches as int(checkbox): 0 and 1 mean false and true.
        if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
            return bool(value)
        if not isinstance(value, bool):
            raise bad("true or false (or 0 / 1)")
        return value
    if action.nargs in ("*", "+"):
        if isinstance(value, str) and not value.strip():
            return []  # network_args = "": the GUI's (and older configs') way of saying "no options"
        values = value if isinstance(value, list) else [value]
        return [_convert_scalar(action, key, v, where, bad) for v in values]
    if _unset_by_empty(action) and value == "":
        return None  # logging_dir = "": a folder not chosen, not the current directory
    if isinstance(value, list):
        raise bad("a single value, not a list")
    return _convert_scalar(action, key, value, where, bad)


def _convert_scalar(action: argparse.Action, key: str, value: Any, where: str, bad) -> Any:
    kind = action.type
    if isinstance(value, bool) or isinstance(value, (dict, list)):
        raise bad({int: "an integer", float: "a number"}.get(kind, "a string"))
    if kind is int:
        if not isinstance(value, int):
            raise bad("an integer")
    elif kind is float:
        if not isinstance(value, (int, float)):
            raise bad("a number")
        value = float(value)
    elif kind is str or kind is None:
        # kohya's TOMLs write numbers for string options such as resolution = 512.
        if isinstance(value, (int, float)):
            value = str(value)
        if not isinstance(value, str):
            raise bad("a string")
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(str(c) for c in action.choices if c is not None)
        raise UserError(f"{where}: '{key}' = {value!r} is not one of: {choices}.")
    return value


def _unset_by_empty(action: argparse.Action) -> bool:
    """A single string that is unset by default (a path, a name): an empty string means unset too."""
    return action.type in (str, None) and action.default is None and action.nargs is None and action.option_strings


def load_config_file(parser: argparse.ArgumentParser, path: Path) -> dict[str, Any]:
    """Read a --config_file TOML and return validated values keyed by argument name."""
    return read_config_file(parser, path)[0]


def read_config_file(parser: argparse.ArgumentParser, path: Path) -> tuple[dict[str, Any], list[tuple[str, Any]]]:
    """Validated values keyed by argument name, and the kohya_ss GUI keys that were ignored (key, value)."""
    data, text = read_toml(path)
    actions = _actions(parser)
    values: dict[str, Any] = {}
    ignored: list[tuple[str, Any]] = []
    for key, (value, table) in _flatten(data, path, actions).items():
        if key in GUI_ONLY_KEYS and key not in actions:
            ignored.append((key, value))
            continue
        line = _key_line(text, key)
        where = f"{path}" + (f", line {line}" if line else "") + (f", table [{table}]" if table else "")
        if key in ("config_file", "output_config"):
            raise UserError(f"{where}: '{key}' cannot be set inside the config file (it is a command-line "
                            "switch); remove that line.")
        if key not in actions:
            raise UserError(f"{where}: unknown argument '{key}'{did_you_mean(key, [*actions, *GUI_ONLY_KEYS])}.")
        values[key] = _convert(actions[key], key, value, where)
    return values, ignored


def _explicit_cli_dests(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """Names of the arguments given on the command line (by re-parsing with no defaults).

    The probe holds the same option strings as the real parser and abbreviations on, so argparse
    resolves ``--mixed_prec bf16`` to the same argument in both (sd-scripts accepts abbreviations).
    """
    probe = argparse.ArgumentParser(add_help=False, allow_abbrev=parser.allow_abbrev)
    for action in parser._actions:
        if not action.option_strings:
            continue
        if action.dest == "help":  # kept so that abbreviations are ambiguous exactly where they are in parser
            probe.add_argument(*action.option_strings, dest="help", action="store_true", default=argparse.SUPPRESS)
            continue
        kwargs: dict[str, Any] = {"dest": action.dest, "default": argparse.SUPPRESS}
        if isinstance(action, argparse._StoreTrueAction):
            kwargs["action"] = "store_true"
        elif isinstance(action, argparse._StoreFalseAction):
            kwargs["action"] = "store_false"
        else:
            kwargs["nargs"] = action.nargs
        probe.add_argument(*action.option_strings, **kwargs)
    known, _ = probe.parse_known_args(argv)
    return set(vars(known))


def parse_args_with_sources(
    parser: argparse.ArgumentParser, argv: list[str] | None
) -> tuple[argparse.Namespace, dict[str, str]]:
    """Parse the CLI over the --config_file TOML; returns the args and each value's source."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    first = parser.parse_args(argv)
    sources = {dest: SOURCE_DEFAULT for dest in _actions(parser)}
    toml_values: dict[str, Any] = {}
    ignored: list[tuple[str, Any]] = []
    if first.config_file and not first.output_config:
        path = toml_path(first.config_file)
        if path.name != Path(first.config_file).name and not path.is_file():
            raise UserError(f"Config file not found: {path} (--config_file {first.config_file}: .toml is added "
                            "as in sd-scripts).")
        toml_values, ignored = read_config_file(parser, path)
        parser.set_defaults(**toml_values)
        sources.update({k: f"config file {path.name}" for k in toml_values})
    args = parser.parse_args(argv)
    actions = _actions(parser)
    for dest in _explicit_cli_dests(parser, argv):
        sources[dest] = SOURCE_CLI
        if getattr(args, dest) == "" and _unset_by_empty(actions[dest]):
            setattr(args, dest, None)  # --logging_dir "" means unset on the command line too
    if ignored:
        setattr(args, IGNORED_KEYS_ATTR, [(path.name, key, value) for key, value in ignored])
    return args, sources


def write_output_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Path:
    """Write the non-default arguments to --config_file as TOML, never overwriting a file."""
    if not args.config_file:
        raise UserError("--output_config needs --config_file: the path of the TOML to write.")
    path = toml_path(args.config_file)
    if path.exists():
        raise UserError(f"--output_config refuses to overwrite {path}; choose a new --config_file path.")
    values = {}
    for dest, action in _actions(parser).items():
        value = getattr(args, dest, None)
        if dest in _NOT_WRITTEN or value is None or value == action.default:
            continue
        values[dest] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(toml.dumps(values), encoding="utf-8")
    return path


# Free text, logged as written even when it looks like a path ("/home/alice/notes" in a comment is text).
_FREE_TEXT_KEYS = frozenset({"training_comment", "caption_prefix", "caption_suffix", "caption_separator",
                             "keep_tokens_separator", "log_prefix", "log_tracker_name", "wandb_run_name"})
_WINDOWS_ABSOLUTE = re.compile(r"^(?:[A-Za-z]:[\\/]|\\\\)")


def _private_path(text: str) -> bool:
    """An absolute or home-relative path: it names the user's folders, so only its last part is logged."""
    return text.startswith(("/", "~")) or bool(_WINDOWS_ABSOLUTE.match(text))


def _path_safe(text: str) -> str:
    if _private_path(text):
        return re.split(r"[\\/]", text.rstrip("/\\"))[-1] or text[:1]
    key, sep, value = text.partition("=")  # network_args / optimizer_args: lycoris_config=/home/x/y.toml
    if sep and _private_path(value):
        return f"{key}={_path_safe(value)}"
    return text


def loggable_config(args: argparse.Namespace, accelerate: Mapping[str, Setting] | None = None) -> dict[str, Any]:
    """Arguments safe to send to trackers: no secrets, no absolute paths, plain scalar types.

    ``accelerate``: the effective accelerate settings (accelerator.resolve_accelerate_settings); their values
    replace the script's (often unset) arguments, so the log shows what the run used.
    """
    out: dict[str, Any] = {}
    for key, value in vars(args).items():
        if key in SECRET_KEYS or value is None or key.startswith("_"):
            continue
        if key not in _FREE_TEXT_KEYS:
            if isinstance(value, str):
                value = _path_safe(value)
            elif isinstance(value, list):
                value = [_path_safe(v) if isinstance(v, str) else v for v in value]
        if isinstance(value, list):
            value = " ".join(str(v) for v in value)
        out[key] = value
    for key, setting in (accelerate or {}).items():
        out[key] = setting.value
    return out
