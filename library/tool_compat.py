"""Options of sd-scripts' LoRA tools that the tools here have no counterpart for, each handled on purpose.

Users of sd-scripts' ``networks/merge_lora.py``, ``svd_merge_lora.py``, ``sdxl_merge_lora.py`` and
``extract_lora_from_models.py`` arrive with their command lines. argparse would answer "unrecognized
arguments" (or match a prefix of another option), which reads like a typo. As library/sd_scripts_args.py does
for the trainer, every such name here is one of:

- ``ignored``: any value is accepted and the result is the same; the tool prints why.
- ``unsupported``: its no-op value (off, empty) is accepted; any other stops the tool with what to do instead.
- ``alias``: the same meaning as one of the tool's own options (``target``), which it sets.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Literal

from library.errors import UserError


@dataclass(frozen=True)
class ToolArg:
    handling: Literal["ignored", "unsupported", "alias"]
    why: str
    kind: Any = bool  # bool: a switch; otherwise the value type
    nargs: str | None = None
    target: str | None = None  # alias: dest of the tool's own option


_BY_WEIGHTS = "here the model's weights (and the LoRAs' keys and metadata) tell SD 1.x, 2.x and SDXL apart"

MERGE_ARGS: dict[str, ToolArg] = {
    "v2": ToolArg("ignored", f"sd-scripts reads the checkpoint as SD 2.x with it; {_BY_WEIGHTS}"),
    "shuffle": ToolArg("ignored", "sd-scripts permutes the rank components of each module; ΔW, and so the merged "
                       "file's effect, is the same in any order"),
    "loading_device": ToolArg("ignored", "files are read on the CPU and the arithmetic runs on --device", str),
    "working_device": ToolArg("alias", "sdxl_merge_lora.py's name for --device", str, target="device"),
    "lbws": ToolArg("unsupported", "per-block weights of each LoRA (sdxl_merge_lora.py) are not supported; each "
                    "file takes one ratio (--ratios)", str, nargs="*"),
}

EXTRACT_ARGS: dict[str, ToolArg] = {
    "load_precision": ToolArg("ignored", "the weights are read as stored and differenced in float32; a lower load "
                              "precision would only round the difference", str),
    "load_original_model_to": ToolArg("ignored", "the models load on the CPU and each layer's difference moves to "
                                      "--device for its SVD", str),
    "load_tuned_model_to": ToolArg("ignored", "the models load on the CPU and each layer's difference moves to "
                                   "--device for its SVD", str),
}


def add_tool_args(parser: argparse.ArgumentParser, table: dict[str, ToolArg]) -> None:
    """The table as a group of real options (None / off by default, so that a given value is told apart)."""
    group = parser.add_argument_group("sd-scripts compatibility")
    for name, arg in table.items():
        label = {"ignored": "ignored", "unsupported": "not supported", "alias": "alias"}[arg.handling]
        help_text = f"{label}: {arg.why}"
        if arg.kind is bool:
            group.add_argument(f"--{name}", action="store_true", help=help_text)
        else:
            group.add_argument(f"--{name}", type=arg.kind, nargs=arg.nargs, default=None, help=help_text)


def apply_tool_args(args: argparse.Namespace, table: dict[str, ToolArg], defaults: dict[str, Any]) -> list[str]:
    """Refuse unsupported values, set aliases' targets; returns the notes to print for what was ignored or mapped.

    ``defaults``: each alias target's default, so that a target the user gave too is told apart and a
    disagreement is an error rather than a silent choice."""
    given = {name: getattr(args, name, None) for name in table}
    given = {name: value for name, value in given.items() if value not in (None, False, "", [])}
    refused = [f"--{name}: {table[name].why}" for name in given if table[name].handling == "unsupported"]
    if refused:
        raise UserError("sd-scripts option not supported by this tool (remove it):\n  " + "\n  ".join(refused))
    notes = []
    for name, value in given.items():
        arg = table[name]
        if arg.handling == "alias":
            target = arg.target or ""
            current = getattr(args, target)
            if current != defaults.get(target) and current != value:
                raise UserError(f"--{name} {value} and --{target} {current} disagree ({arg.why}); keep --{target}")
            setattr(args, target, value)
            notes.append(f"--{name} {value}: read as --{target} {value} ({arg.why})")
        else:
            notes.append(f"--{name} (sd-scripts) is ignored: {arg.why}")
    return notes
