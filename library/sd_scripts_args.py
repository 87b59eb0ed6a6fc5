"""sd-scripts arguments this toolkit has no counterpart for, and kohya_ss GUI keys that are no arguments at all.

sd-scripts users pass these on the command line and in ``--config_file`` TOMLs; the kohya_ss GUI writes several
into every TOML it exports. Reporting them as typos ("unknown argument", a wrong "did you mean") would be
misleading, and silently ignoring a setting that changes training would be worse. So every name is handled on
purpose, with the reason next to it:

- ``used``: this toolkit does the same thing (an alias, or a value it can compute); see ``apply_sd_scripts_args``.
- ``ignored``: any value is accepted; training comes out the same (a speed switch, an option of a feature that
  is off); named in the log.
- ``unsupported``: its no-op value (off, empty, sd-scripts' default) is accepted and named in the log; any other
  value stops the run with what to do instead.

library/args.py turns the table into real arguments (group "sd-scripts compatibility"), so the command line and
the config file check their types alike; the defaults (None, or off) tell "not given" apart from a given value.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

from library.errors import UserError


@dataclass(frozen=True)
class SdScriptsArg:
    handling: Literal["used", "ignored", "unsupported"]
    why: str  # what it does in sd-scripts and what happens here (or what to do instead)
    kind: Any = bool  # bool: a switch; otherwise the value type (int, float, str)
    nargs: str | None = None
    choices: tuple[str, ...] | None = None
    no_op: tuple[Any, ...] = field(default=())  # values besides off / None / "" / [] that ask for nothing


_TRAIN_BY_RESUME = "to continue a run, save its state (--save_state) and give that folder to --resume"
_LR_SCHEDULER = "passed to the cosine_with_min_lr / warmup_stable_decay / inverse_sqrt schedules, as sd-scripts does"
_HF_UPLOAD = "uploading to Hugging Face is not built in; upload the output folder afterwards (huggingface-cli upload)"
_DEEPSPEED = "DeepSpeed is not supported; for several GPUs use accelerate launch --num_processes N (DDP)"
_HF_OPTION = "an option of --huggingface_repo_id uploads, which are not built in; nothing is uploaded"

SD_SCRIPTS_ARGS: dict[str, SdScriptsArg] = {
    # used: the same behaviour under this toolkit's own name
    "caption_extention": SdScriptsArg("used", "sd-scripts' misspelt alias of --caption_extension", str),
    "use_8bit_adam": SdScriptsArg("used", "sd-scripts' older switch for --optimizer_type AdamW8bit"),
    "use_lion_optimizer": SdScriptsArg("used", "sd-scripts' older switch for --optimizer_type Lion"),
    "save_n_epoch_ratio": SdScriptsArg(
        "used", "save about N epoch files: --save_every_n_epochs max(1, epochs // N), as sd-scripts", int),
    "console_log_level": SdScriptsArg("used", "level of the log messages of Python's logging (default WARNING)", str,
                                      choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")),
    "cache_text_encoder_outputs_to_disk": SdScriptsArg(
        "used", "as --cache_text_encoder_outputs: the outputs are cached in memory, not written to disk"),
    # ignored: training is the same with any value
    "skip_cache_check": SdScriptsArg("ignored", "skips sd-scripts' check of cached latents; caches are checked "
                                     "as usual, training is the same"),
    "disable_mmap_load_safetensors": SdScriptsArg("ignored", "speeds up sd-scripts' model loading on WSL; models "
                                                  "are read as usual, training is the same"),
    "cache_info": SdScriptsArg("ignored", "caches image sizes for a faster start in sd-scripts; the folders are read "
                               "each run, training is the same"),
    "console_log_simple": SdScriptsArg("ignored", "the log is plain text already"),
    "huggingface_repo_type": SdScriptsArg("ignored", _HF_OPTION, str),
    "huggingface_path_in_repo": SdScriptsArg("ignored", _HF_OPTION, str),
    "huggingface_repo_visibility": SdScriptsArg("ignored", _HF_OPTION, str),
    "huggingface_token": SdScriptsArg("ignored", _HF_OPTION + " (never logged)", str),
    "async_upload": SdScriptsArg("ignored", _HF_OPTION),
    # unsupported: accepted off / empty / at sd-scripts' default, refused otherwise
    "debug_dataset": SdScriptsArg("unsupported", "sd-scripts shows the images instead of training; inspect a "
                                  "dataset with tools/check_dataset.py"),
    "token_warmup_min": SdScriptsArg("unsupported", "tag warm-up (train on the first N tags at first) is not "
                                     "supported; remove it", int, no_op=(1,)),
    "token_warmup_step": SdScriptsArg("unsupported", "tag warm-up is not supported; remove it", float, no_op=(0,)),
    "face_crop_aug_range": SdScriptsArg("unsupported", "face-centred crop augmentation is not supported; crop the "
                                        "images beforehand", str),
    "dataset_class": SdScriptsArg("unsupported", "custom dataset classes are not supported; use --dataset_config "
                                  "or --train_data_dir", str),
    "conditioning_data_dir": SdScriptsArg("unsupported", "on the command line it is not read; set "
                                          "conditioning_data_dir in a subset of the dataset TOML", str),
    "skip_image_resolution": SdScriptsArg("unsupported", "on the command line it is not read; set "
                                          "skip_image_resolution in the dataset TOML", str),
    "initial_epoch": SdScriptsArg("unsupported", f"starting at a later epoch is not supported; {_TRAIN_BY_RESUME}",
                                  int, no_op=(1,)),
    "initial_step": SdScriptsArg("unsupported", f"starting at a later step is not supported; {_TRAIN_BY_RESUME}",
                                 int, no_op=(0,)),
    "skip_until_initial_step": SdScriptsArg("unsupported", f"not supported; {_TRAIN_BY_RESUME}"),
    "lr_scheduler_min_lr_ratio": SdScriptsArg("used", _LR_SCHEDULER, float),
    "lr_scheduler_timescale": SdScriptsArg("used", _LR_SCHEDULER, int),
    "lr_decay_steps": SdScriptsArg("used", _LR_SCHEDULER + " (a ratio of the steps when below 1)", float),
    "fused_backward_pass": SdScriptsArg("unsupported", "fusing the optimizer into the backward pass is not "
                                        "supported; save memory with --gradient_checkpointing or --fp8_base"),
    "fp8_base_unet": SdScriptsArg("unsupported", "use --fp8_base (the frozen base weights in float8)"),
    "cpu_offload_checkpointing": SdScriptsArg("unsupported", "CPU offloading is not supported; use "
                                              "--gradient_checkpointing"),
    "mem_eff_save": SdScriptsArg("unsupported", "an option of sd-scripts' FLUX.1 fine-tuning; remove it"),
    "huggingface_repo_id": SdScriptsArg("unsupported", _HF_UPLOAD, str),
    "save_state_to_huggingface": SdScriptsArg("unsupported", _HF_UPLOAD),
    "resume_from_huggingface": SdScriptsArg("unsupported", "download the state folder and give its path to --resume"),
    "console_log_file": SdScriptsArg("unsupported", "redirect the output instead (... 2>&1 | tee train.log)", str),
    "deepspeed": SdScriptsArg("unsupported", _DEEPSPEED),
    "zero_stage": SdScriptsArg("unsupported", _DEEPSPEED, int, no_op=(2,)),
    "offload_optimizer_device": SdScriptsArg("unsupported", _DEEPSPEED, str),
    "offload_optimizer_nvme_path": SdScriptsArg("unsupported", _DEEPSPEED, str),
    "offload_param_device": SdScriptsArg("unsupported", _DEEPSPEED, str),
    "offload_param_nvme_path": SdScriptsArg("unsupported", _DEEPSPEED, str),
    "zero3_init_flag": SdScriptsArg("unsupported", _DEEPSPEED),
    "zero3_save_16bit_model": SdScriptsArg("unsupported", _DEEPSPEED),
    "fp16_master_weights_and_gradients": SdScriptsArg("unsupported", _DEEPSPEED),
}

# Keys the kohya_ss GUI (lora_gui.py, v24 on) writes into every --config_file TOML it exports that are no
# sd-scripts arguments: the GUI's own settings. sd-scripts puts unknown TOML keys on its namespace unread, so they
# never did anything; here they are ignored with one note. Only in a config file: the GUI never passes them as flags.
GUI_ONLY_KEYS: dict[str, str] = {
    "epoch": "the GUI's epoch count, which it turns into max_train_steps itself; to train by epochs set "
             "max_train_epochs",
    "noise_offset_type": "the GUI's choice of which noise keys to write, noise_offset or multires_noise_*, "
                         "which hold the setting",
    "lowvram": "a GUI switch that sd-scripts does not read",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The table as parser arguments: off / None by default, so that a given value is told apart."""
    g = parser.add_argument_group("sd-scripts compatibility")
    for name, arg in SD_SCRIPTS_ARGS.items():
        label = {"used": "used", "ignored": "ignored", "unsupported": "not supported"}[arg.handling]
        help_text = f"{label}: {arg.why}"
        if arg.kind is bool:
            g.add_argument(f"--{name}", action="store_true", help=help_text)
        else:
            g.add_argument(f"--{name}", type=arg.kind, default=None, nargs=arg.nargs, choices=arg.choices,
                           help=help_text)


def _asks_for_nothing(arg: SdScriptsArg, value: Any) -> bool:
    return value in (None, False, "", []) or value in arg.no_op


def _show(value: Any) -> str:
    if value is True:
        return ""
    return " " + " ".join(map(str, value)) if isinstance(value, list) else f" {value}"


def apply_sd_scripts_args(args: argparse.Namespace, sources: dict[str, str] | None = None) -> None:
    """Refuse unsupported values and map the ``used`` arguments onto this toolkit's own (before other checks).

    ``sources`` (argument → where its value came from, library/config_file.py): when an alias and the argument
    it stands for disagree and one was given on the command line, the other in ``--config_file``, the command
    line wins, as it does for every argument; from the same place they are an error."""
    refused = [(name, arg) for name, arg in SD_SCRIPTS_ARGS.items()
               if arg.handling == "unsupported" and not _asks_for_nothing(arg, getattr(args, name, None))]
    if refused:
        lines = [f"--{name}{_show(getattr(args, name))}: {arg.why}." for name, arg in refused]
        raise UserError("This sd-scripts argument is not supported by this toolkit (remove it or leave it at its "
                        "default):\n  " + "\n  ".join(lines))
    alias = getattr(args, "caption_extention", None)
    if alias and alias_wins(sources, "caption_extention", "caption_extension", args.caption_extension, alias,
                             (".caption",), f"--caption_extention {alias} (sd-scripts' misspelt alias) and "
                             f"--caption_extension {args.caption_extension} disagree; keep --caption_extension."):
        args.caption_extension = alias
    for switch, optimizer in (("use_8bit_adam", "AdamW8bit"), ("use_lion_optimizer", "Lion")):
        if getattr(args, switch, False) and alias_wins(
                sources, switch, "optimizer_type", args.optimizer_type, optimizer, ("",),
                f"--{switch} means --optimizer_type {optimizer}, but --optimizer_type is {args.optimizer_type}; "
                "keep one of them."):
            args.optimizer_type = optimizer
    _apply_save_n_epoch_ratio(args)
    if getattr(args, "cache_text_encoder_outputs_to_disk", False):
        args.cache_text_encoder_outputs = True
    level = getattr(args, "console_log_level", None)
    if level:
        logging.basicConfig(format="%(message)s")  # a handler, so that INFO / DEBUG show at all
        logging.getLogger().setLevel(level)


def alias_wins(sources: dict[str, str] | None, alias: str, name: str, value: Any, meaning: Any,
                unset: tuple[Any, ...], conflict: str) -> bool:
    """Whether the alias's meaning replaces ``name``'s ``value``: yes when ``name`` was not given or agrees; when
    they disagree, the one given on the command line wins over the one from ``--config_file`` (with a warning),
    and from the same place they are an error (``conflict``). A value in ``unset`` counts as not given unless it
    was typed on the command line."""
    from library.config_file import SOURCE_CLI, SOURCE_DEFAULT

    source = sources.get(name, SOURCE_DEFAULT) if sources else None
    # A config file's default-looking value (the kohya_ss GUI writes every key) counts as not given; one typed on
    # the command line counts even then.
    given = value not in unset or source == SOURCE_CLI if sources else value not in unset
    given = given and source != SOURCE_DEFAULT
    if not given or value == meaning:
        return True
    alias_cli, name_cli = (bool(sources) and sources.get(n) == SOURCE_CLI for n in (alias, name))
    if alias_cli == name_cli:
        raise UserError(conflict)
    loser, winner = (name, alias) if alias_cli else (alias, name)
    logging.getLogger(__name__).warning("--%s from %s is set aside: --%s on the command line sets the same thing, "
                                        "and the command line wins.", loser, sources[loser], winner)
    return alias_cli


def _apply_save_n_epoch_ratio(args: argparse.Namespace) -> None:
    ratio = getattr(args, "save_n_epoch_ratio", None)
    if ratio is None:
        return
    if ratio < 1:
        raise UserError(f"--save_n_epoch_ratio {ratio}: the number of epoch files must be at least 1.")
    if args.save_every_n_epochs is not None:
        raise UserError(f"--save_n_epoch_ratio {ratio} and --save_every_n_epochs {args.save_every_n_epochs} both "
                        "set the epoch cadence; keep one.")
    if args.max_train_epochs:  # else the trainer sets it once the data gives the epoch count (epoch_cadence)
        args.save_every_n_epochs = epoch_cadence(ratio, args.max_train_epochs)


def epoch_cadence(ratio: int, num_epochs: int) -> int:
    """sd-scripts' ``--save_n_epoch_ratio``: save every ``max(1, epochs // N)`` epochs (about N epoch files)."""
    return max(1, num_epochs // ratio)


def sd_scripts_notes(values: dict[str, Any]) -> list[str]:
    """One log line for each table argument that was given (``values``: the arguments by name)."""
    notes = []
    for name, arg in SD_SCRIPTS_ARGS.items():
        value = values.get(name)
        if value is None or value is False:
            continue
        shown = "" if name in ("huggingface_token",) else _show(value)
        if arg.handling == "used":
            notes.append(f"--{name}{shown}: sd-scripts argument, {arg.why}.")
        elif arg.handling == "ignored":
            notes.append(f"--{name}{shown}: sd-scripts argument, ignored: {arg.why}.")
        else:
            notes.append(f"--{name}{shown}: sd-scripts argument, not supported by this toolkit; accepted because "
                         "it asks for nothing at this value.")
    return notes
