"""Flag names of diffusers' training scripts and of TRL / the HF Trainer, so that their users are understood.

Users of diffusers' train_text_to_image_lora.py / train_dreambooth_lora(_sdxl).py and of TRL's SFT scripts arrive
with their own names. argparse would answer "unrecognized arguments", or worse, match a prefix of one of this
toolkit's arguments. Every name below is handled on purpose, as library/sd_scripts_args.py does for sd-scripts:

- ``alias``: the same meaning under this toolkit's name; the value sets that argument (``target``, or a
  ``key=value`` entry of ``--optimizer_args`` / ``--network_args``) and the log names the alias. When the target
  was given too with another value, the command line beats a config file and the same place is an error.
- ``ignored``: training comes out the same with any value; named in the log.
- ``refused``: a UserError naming the flag and what to write instead; its no-op values (off, empty, the
  other tool's default) are accepted.

Names this toolkit already has with the same meaning (``--learning_rate``, ``--output_dir``, ``--lr_scheduler``,
...) are not here. ``--lr_scheduler_type`` is sd-scripts' custom scheduler class here; an HF Trainer schedule
name given to it is read as ``--lr_scheduler`` (``_hf_schedule_name``), since no class has such a name.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from library.errors import UserError
from library.sd_scripts_args import alias_wins

logger = logging.getLogger(__name__)

DIFFUSERS, TRL, BOTH = "diffusers", "TRL/Trainer", "diffusers and TRL/Trainer"


def _hf_bool(text: str) -> bool:
    """HfArgumentParser's spelling of a switch's value: ``--bf16 True``, ``--packing false``."""
    lowered = text.strip().lower()
    if lowered not in ("true", "false", "yes", "no", "t", "f", "y", "n", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return lowered in ("true", "yes", "t", "y", "1")


class HfSwitch(argparse._StoreTrueAction):
    """A switch that also takes an explicit value, as the HF Trainer's (``--bf16``, ``--bf16 True``, ``--bf16 no``).

    A _StoreTrueAction, so that ``--config_file`` reads it as true / false (library/config_file.py); unset is
    None, so that an explicit false is told apart from not given."""

    def __init__(self, option_strings: list[str], dest: str, default: Any = None, required: bool = False,
                 help: str | None = None) -> None:  # noqa: A002 - argparse's keyword
        argparse.Action.__init__(self, option_strings=option_strings, dest=dest, nargs="?", const=True,
                                 default=default, type=_hf_bool, required=required, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)


@dataclass(frozen=True)
class ForeignArg:
    origin: str
    handling: Literal["alias", "ignored", "refused"]
    why: str  # alias: what it sets here; ignored: why nothing changes; refused: what to write instead
    kind: Any = bool  # bool: a switch (HfSwitch); otherwise the value type
    target: str | None = None  # alias: the argument it sets (a key=value list with ``key``)
    key: str | None = None  # alias into --optimizer_args / --network_args: the key it writes
    convert: Callable[[Any], Any] | None = None  # alias: its value → the target's value
    nargs: str | None = None
    choices: tuple[str, ...] | None = None
    no_op: tuple[Any, ...] = (False,)  # values that ask for nothing (besides None, "" and []); False only as a bool


_CHECKPOINT = ("and --save_state: their checkpoints resume training, and so do this toolkit's state folders "
               "({output_name}-step{N:08d}-state)")
_FOLDER = ("images live in a folder named N_<caption> (N = repeats per epoch; the rest is the caption of images "
           "without a caption file) under --train_data_dir, or in a dataset TOML subset (image_dir, class_tokens, "
           "num_repeats; the snippet below)")
_CLASS = ("regularisation images live in a folder named N_<class prompt> under --reg_data_dir, or in a dataset TOML "
          "subset with is_reg = true (the snippet below); they are not generated: make them beforehand "
          "(--prior_loss_weight is the same here)")
_CAPTIONS = ("captions are read from a text file next to each image (--caption_extension .txt) or from a metadata "
             "JSON (--in_json)")
_SAMPLES = ("write the prompts to a file (one per line, options --n --w --h --s --d --l) and pass --sample_prompts "
            "FILE with --sample_every_n_steps N or --sample_every_n_epochs N")
_NO_DOWNLOAD = ("nothing is downloaded: image data is a folder (--train_data_dir) or a dataset TOML; LLM data is a "
                "dataset TOML with jsonl_file = \"train.jsonl\" (export a hub dataset with datasets' to_json) "
                "passed as --dataset_config")
_UPLOAD = "uploading is not built in; upload the output folder afterwards (huggingface-cli upload)"
_LLM_TOML = "set it in the dataset TOML (--dataset_config) of an LLM: "
_OPTIM = {  # the HF Trainer's --optim values → --optimizer_type (and the arguments the Trainer adds)
    "adamw_torch": "AdamW", "adamw_torch_fused": "AdamW", "adamw_hf": "AdamW", "adamw_8bit": "AdamW8bit",
    "adamw_bnb_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit", "paged_adamw_32bit": "PagedAdamW32bit",
    "lion_8bit": "Lion8bit", "lion_32bit": "Lion", "paged_lion_8bit": "PagedLion8bit", "sgd": "SGD",
    "adafactor": "Adafactor",
}


def _optim(value: str) -> str:
    if value.lower() not in _OPTIM:
        raise UserError(f"--optim {value}: no counterpart here; choose --optimizer_type (see the argument "
                        f"reference), or one of --optim {', '.join(_OPTIM)}.")
    return _OPTIM[value.lower()]


def _report_to(values: list[str]) -> str | None:
    wanted = {v for v in values if v != "none"}
    return None if not wanted else "all" if "all" in wanted or len(wanted) > 1 else wanted.pop()


def _steps(value: float) -> int:
    """The HF Trainer's step counts may be a ratio of the run below 1; this toolkit's cadences are counts."""
    if value < 1 or value != int(value):
        raise UserError(f"{value:g} is a ratio of the run's steps in the HF Trainer; this toolkit needs a whole "
                        "number of steps: multiply it by the run's total steps (printed at start-up).")
    return int(value)


FOREIGN_ARGS: dict[str, ForeignArg] = {
    # diffusers' scripts
    "rank": ForeignArg(DIFFUSERS, "alias", "--network_dim, and --network_alpha the same unless given (their "
                       "scripts set lora_alpha = rank: scale 1)", int, "network_dim"),
    "snr_gamma": ForeignArg(DIFFUSERS, "alias", "--min_snr_gamma (the same weights, v-prediction included)", float,
                            "min_snr_gamma"),
    "checkpointing_steps": ForeignArg(DIFFUSERS, "alias", f"--save_every_n_steps {_CHECKPOINT}", int,
                                      "save_every_n_steps"),
    "checkpoints_total_limit": ForeignArg(DIFFUSERS, "alias", "--save_last_n_steps (checkpoints x steps between "
                                          "them - 1: the last N saves are kept)", int, "save_last_n_steps"),
    "lr_num_cycles": ForeignArg(DIFFUSERS, "alias", "--lr_scheduler_num_cycles", int, "lr_scheduler_num_cycles"),
    "lr_power": ForeignArg(DIFFUSERS, "alias", "--lr_scheduler_power", float, "lr_scheduler_power"),
    "adam_weight_decay": ForeignArg(DIFFUSERS, "alias", "--optimizer_args weight_decay=...", float,
                                    "optimizer_args", "weight_decay"),
    "random_flip": ForeignArg(DIFFUSERS, "alias", "--flip_aug", bool, "flip_aug", convert=bool),
    "center_crop": ForeignArg(DIFFUSERS, "alias", "centre crops, this toolkit's default (their default, random "
                              "crops, is --random_crop here)", bool, "random_crop", convert=lambda _: False),
    "train_text_encoder": ForeignArg(DIFFUSERS, "alias", "the text encoder LoRA trains, this toolkit's default "
                                     "(their default, the UNet only, is --network_train_unet_only here)", bool,
                                     "network_train_unet_only", convert=lambda _: False),
    "pretrained_vae_model_name_or_path": ForeignArg(DIFFUSERS, "alias", "--vae", str, "vae"),
    "enable_xformers_memory_efficient_attention": ForeignArg(DIFFUSERS, "alias", "--xformers (PyTorch SDPA "
                                                             "attention is always used)", bool, "xformers",
                                                             convert=bool),
    "optimizer": ForeignArg(DIFFUSERS, "alias", "--optimizer_type (AdamW, Prodigy)", str, "optimizer_type",
                            convert=lambda v: {"adamw": "AdamW", "prodigy": "Prodigy"}.get(v.lower(), v)),
    "prodigy_beta3": ForeignArg(DIFFUSERS, "alias", "--optimizer_args beta3=...", float, "optimizer_args", "beta3"),
    "prodigy_decouple": ForeignArg(DIFFUSERS, "alias", "--optimizer_args decouple=...", bool, "optimizer_args",
                                   "decouple", no_op=()),
    "prodigy_use_bias_correction": ForeignArg(DIFFUSERS, "alias", "--optimizer_args use_bias_correction=...", bool,
                                              "optimizer_args", "use_bias_correction", no_op=()),
    "prodigy_safeguard_warmup": ForeignArg(DIFFUSERS, "alias", "--optimizer_args safeguard_warmup=...", bool,
                                           "optimizer_args", "safeguard_warmup", no_op=()),
    "prediction_type": ForeignArg(DIFFUSERS, "alias", "v_prediction is --v_parameterization; epsilon is refused: "
                                  "the prediction type comes from the model's scheduler config", str,
                                  "v_parameterization", convert=lambda v: v == "v_prediction",
                                  choices=("epsilon", "v_prediction")),
    "instance_data_dir": ForeignArg(DIFFUSERS, "refused", _FOLDER, str),
    "instance_prompt": ForeignArg(DIFFUSERS, "refused", _FOLDER, str),
    "class_data_dir": ForeignArg(DIFFUSERS, "refused", _CLASS, str),
    "class_prompt": ForeignArg(DIFFUSERS, "refused", _CLASS, str),
    "with_prior_preservation": ForeignArg(DIFFUSERS, "refused", _CLASS),
    "num_class_images": ForeignArg(DIFFUSERS, "refused", _CLASS, int),
    "repeats": ForeignArg(DIFFUSERS, "refused", "repeats are the N of a folder named N_<caption>, or num_repeats in "
                          "a dataset TOML subset", int, no_op=(1,)),
    "validation_prompt": ForeignArg(DIFFUSERS, "refused", _SAMPLES, str),
    "validation_epochs": ForeignArg(DIFFUSERS, "refused", _SAMPLES, int),
    "num_validation_images": ForeignArg(DIFFUSERS, "refused", "one image per line of the --sample_prompts file "
                                        "(repeat a line for more, with --d SEED to vary them)", int),
    "image_column": ForeignArg(DIFFUSERS, "refused", _CAPTIONS, str),
    "caption_column": ForeignArg(DIFFUSERS, "refused", _CAPTIONS, str),
    "scale_lr": ForeignArg(DIFFUSERS, "refused", "multiply --learning_rate by batch size x gradient accumulation "
                           "steps x processes yourself"),
    "max_train_samples": ForeignArg(DIFFUSERS, "refused", "train on a smaller folder, or stop earlier with "
                                    "--max_train_steps", int),
    "revision": ForeignArg(DIFFUSERS, "refused", "nothing is downloaded: give the model's local folder as "
                           "--pretrained_model_name_or_path", str),
    "variant": ForeignArg(DIFFUSERS, "refused", "a folder's weight variant is not chosen: give a folder whose "
                          "weights have the standard file names (the precision is --mixed_precision)", str),
    # both
    "num_train_epochs": ForeignArg(BOTH, "alias", "--max_train_epochs (whole epochs; with --max_steps or "
                                   "--max_train_steps the steps win, as in their scripts)", float, "max_train_epochs"),
    "dataloader_num_workers": ForeignArg(BOTH, "alias", "--max_data_loader_n_workers", int,
                                         "max_data_loader_n_workers"),
    "report_to": ForeignArg(BOTH, "alias", "--log_with (tensorboard logs go to {output_dir}/logs unless "
                            "--logging_dir is given)", str, "log_with", convert=_report_to, nargs="+",
                            choices=("tensorboard", "wandb", "all", "none")),
    "resume_from_checkpoint": ForeignArg(BOTH, "alias", "--resume: a state folder of this toolkit (--save_state) "
                                         "or latest", str, "resume"),
    "adam_beta1": ForeignArg(BOTH, "alias", "--optimizer_args betas=(beta1, beta2)", float, "optimizer_args",
                             "betas"),
    "adam_beta2": ForeignArg(BOTH, "alias", "--optimizer_args betas=(beta1, beta2)", float, "optimizer_args",
                             "betas"),
    "adam_epsilon": ForeignArg(BOTH, "alias", "--optimizer_args eps=...", float, "optimizer_args", "eps"),
    "use_dora": ForeignArg(BOTH, "alias", "--network_args use_dora=true", bool, "network_args", "use_dora"),
    "dataset_name": ForeignArg(BOTH, "refused", _NO_DOWNLOAD, str),
    "push_to_hub": ForeignArg(BOTH, "refused", _UPLOAD),
    "hub_model_id": ForeignArg(BOTH, "refused", _UPLOAD, str),
    "hub_token": ForeignArg(BOTH, "refused", _UPLOAD, str),
    # TRL / the HF Trainer
    "model_name_or_path": ForeignArg(TRL, "alias", "--pretrained_model_name_or_path", str,
                                     "pretrained_model_name_or_path"),
    "per_device_train_batch_size": ForeignArg(TRL, "alias", "--train_batch_size (per process here too)", int,
                                              "train_batch_size"),
    "max_steps": ForeignArg(TRL, "alias", "--max_train_steps (optimizer steps)", int, "max_train_steps",
                            no_op=(-1,)),
    "warmup_ratio": ForeignArg(TRL, "alias", "--lr_warmup_steps (a value below 1 is a ratio here; --warmup_steps "
                               "wins, as in the Trainer)", float, "lr_warmup_steps", no_op=(0,)),
    "warmup_steps": ForeignArg(TRL, "alias", "--lr_warmup_steps", float, "lr_warmup_steps", no_op=(0,)),
    "weight_decay": ForeignArg(TRL, "alias", "--optimizer_args weight_decay=...", float, "optimizer_args",
                               "weight_decay"),
    "optim": ForeignArg(TRL, "alias", "--optimizer_type (adamw_torch: AdamW, adamw_8bit: AdamW8bit, "
                        "paged_adamw_8bit: PagedAdamW8bit, lion_8bit: Lion8bit, adafactor: Adafactor, ...)", str,
                        "optimizer_type", convert=_optim),
    "lora_r": ForeignArg(TRL, "alias", "--network_dim, and --network_alpha 16 (TRL's default lora_alpha) unless "
                         "given", int, "network_dim"),
    "lora_alpha": ForeignArg(TRL, "alias", "--network_alpha", float, "network_alpha"),
    "lora_dropout": ForeignArg(TRL, "alias", "--network_dropout (dropout on the LoRA's hidden state, which PEFT "
                               "export writes as lora_dropout)", float, "network_dropout"),
    "lora_target_modules": ForeignArg(TRL, "alias", "--network_args target_modules=a,b,c (all-linear: the LLM "
                                      "default)", str, "network_args", "target_modules", nargs="+"),
    "use_rslora": ForeignArg(TRL, "alias", "--network_args use_rslora=true", bool, "network_args", "use_rslora"),
    "bf16": ForeignArg(TRL, "alias", "--mixed_precision bf16", bool, "mixed_precision",
                       convert=lambda _: "bf16"),
    "fp16": ForeignArg(TRL, "alias", "--mixed_precision fp16", bool, "mixed_precision",
                       convert=lambda _: "fp16"),
    "save_steps": ForeignArg(TRL, "alias", f"--save_every_n_steps {_CHECKPOINT}", float, "save_every_n_steps",
                             convert=_steps),
    "save_total_limit": ForeignArg(TRL, "alias", "--save_last_n_steps (checkpoints x steps between them - 1: the "
                                   "last N saves are kept)", int, "save_last_n_steps"),
    "eval_steps": ForeignArg(TRL, "alias", "--validate_every_n_steps (needs a validation_split)", float,
                             "validate_every_n_steps", convert=_steps),
    "run_name": ForeignArg(TRL, "alias", "--wandb_run_name", str, "wandb_run_name"),
    "use_peft": ForeignArg(TRL, "alias", "nothing: this toolkit always trains LoRA (false is refused)", bool,
                           no_op=()),
    "logging_steps": ForeignArg(TRL, "ignored", "the loss is logged at every step", float),
    "per_device_eval_batch_size": ForeignArg(TRL, "ignored", "validation batches have the training batch size; "
                                             "the validation loss is the same", int),
    "lora_task_type": ForeignArg(TRL, "refused", "only causal LMs train", str, no_op=("CAUSAL_LM",)),
    "lora_modules_to_save": ForeignArg(TRL, "refused", "whole modules do not train beside LoRA; to put LoRA on "
                                       "them: --network_args target_modules=...,lm_head", str, nargs="+"),
    "bnb_4bit_quant_type": ForeignArg(TRL, "refused", "--load_in_4bit quantizes to NF4", str, no_op=("nf4",)),
    "use_bnb_nested_quant": ForeignArg(TRL, "refused", "--load_in_4bit always uses double quantization",
                                       no_op=(True,)),
    "torch_dtype": ForeignArg(TRL, "refused", "the frozen weights are stored in the --mixed_precision dtype: "
                              "--mixed_precision bf16 for bfloat16", str, no_op=("auto",)),
    "dataset_text_field": ForeignArg(TRL, "refused", _LLM_TOML + "text_column = \"...\"", str),
    "max_seq_length": ForeignArg(TRL, "refused", _LLM_TOML + "max_seq_length = N", int),
    "max_length": ForeignArg(TRL, "refused", _LLM_TOML + "max_seq_length = N", int),
    "packing": ForeignArg(TRL, "refused", _LLM_TOML + "packing = true / false (default true here)", no_op=()),
    "completion_only_loss": ForeignArg(TRL, "refused", _LLM_TOML + "train_on_prompt = true for the loss on "
                                       "prompts too (default: on completions only)", no_op=(True,)),
    "assistant_only_loss": ForeignArg(TRL, "refused", _LLM_TOML + "train_on_prompt = true for the loss on every "
                                      "turn (default: on assistant turns only)", no_op=(True,)),
    "dataset_train_split": ForeignArg(TRL, "refused", _NO_DOWNLOAD, str),
    "dataset_test_split": ForeignArg(TRL, "refused", "hold out rows with validation_split in the dataset TOML "
                                     "(or --validation_split)", str),
    "save_strategy": ForeignArg(TRL, "refused", "steps: --save_steps N; epoch: --save_every_n_epochs 1 "
                                "--save_state", str, no_op=("no", "steps")),
    "eval_strategy": ForeignArg(TRL, "refused", "steps: --eval_steps N; epoch: --validate_every_n_epochs 1 (with "
                                "a validation_split)", str, no_op=("no", "steps")),
}

# The HF Trainer's --lr_scheduler_type values that are this toolkit's --lr_scheduler names.
_HF_SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay")
_HF_ONLY_SCHEDULES = {"reduce_lr_on_plateau": "it needs an evaluation metric; choose another --lr_scheduler",
                      "cosine_warmup_with_min_lr": "use --lr_scheduler cosine_with_min_lr"}
_DREAMBOOTH = ("instance_data_dir", "instance_prompt", "class_data_dir", "class_prompt", "with_prior_preservation")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The table as parser arguments: unset (None) by default, so that a given value is told apart."""
    g = parser.add_argument_group("diffusers / TRL names")
    for name, arg in FOREIGN_ARGS.items():
        label = {"alias": "same as", "ignored": "ignored:", "refused": "not supported here:"}[arg.handling]
        help_text = f"{arg.origin} name; {label} {arg.why}"
        if arg.kind is bool:
            g.add_argument(f"--{name}", action=HfSwitch, help=help_text)
        else:
            g.add_argument(f"--{name}", type=arg.kind, default=None, nargs=arg.nargs, choices=arg.choices,
                           help=help_text)


def _given(arg: ForeignArg, value: Any) -> bool:
    """Whether ``value`` asks for something. By identity for True / False, so that 0 (--weight_decay 0, which
    does ask for something) is not taken for a switch that is off."""
    if value is None or (isinstance(value, (str, list)) and not value):
        return False
    return not any(value is v if isinstance(v, bool) or isinstance(value, bool) else value == v for v in arg.no_op)


def _show(value: Any) -> str:
    if value is True:
        return ""
    return " " + " ".join(map(str, value)) if isinstance(value, list) else f" {value}"


def apply_foreign_args(args: argparse.Namespace, defaults: argparse.Namespace,
                       sources: dict[str, str] | None = None) -> None:
    """Refuse the ``refused`` names and set each alias's target (before the other checks look at them).

    ``defaults``: the parser's defaults (a target at its default counts as not given); ``sources`` (argument →
    where its value came from, library/config_file.py) decides a disagreement as in sd_scripts_args, and learns
    where each target's new value came from, so that later defaults (an LLM's rank and epochs) leave it alone."""
    given = {name: getattr(args, name, None) for name, arg in FOREIGN_ARGS.items()
             if _given(arg, getattr(args, name, None))}
    _refuse(args, given)
    if "use_peft" in given and not given["use_peft"]:
        raise UserError("--use_peft false: this toolkit trains LoRA only (full fine-tuning is not supported); "
                        "remove it.")
    if given.get("prediction_type") == "epsilon":
        raise UserError("--prediction_type epsilon: the prediction type comes from the model's scheduler config "
                        "(epsilon for SD 1.x and SDXL base); remove it (--v_parameterization forces v-prediction).")
    applied = _Applied(args, defaults, sources)
    _apply_lengths(applied, given)
    # the checkpoint limits last: they count saves of the cadence that another alias may set
    for name, value in sorted(given.items(), key=lambda item: FOREIGN_ARGS[item[0]].target == "save_last_n_steps"):
        arg = FOREIGN_ARGS[name]
        if arg.handling != "alias" or name in _LENGTHS or arg.target is None:
            continue
        if arg.key:
            applied.set_key(name, arg.target, arg.key, _key_value(args, name, value))
        elif arg.target == "save_last_n_steps":
            applied.set(name, arg.target, _keep_last(args, name, value))
        else:
            applied.set(name, arg.target, arg.convert(value) if arg.convert else value)
        if name in ("checkpointing_steps", "save_steps"):
            applied.set(name, "save_state", True)
        if name in ("rank", "lora_r") and not applied.given("network_alpha") and "lora_alpha" not in given:
            applied.set(name, "network_alpha", float(value) if name == "rank" else 16.0)
        if name == "report_to" and args.log_with in ("tensorboard", "all") and not args.logging_dir:
            applied.set(name, "logging_dir", f"{args.output_dir or '.'}/logs")
    _hf_schedule_name(applied)


_LENGTHS = ("warmup_ratio", "warmup_steps", "num_train_epochs", "max_steps")


class _Applied:
    """The namespace, its defaults and sources while aliases set values; remembers which alias set what, so that
    two aliases of one argument (--bf16 --fp16) are named together when they disagree."""

    def __init__(self, args: argparse.Namespace, defaults: argparse.Namespace,
                 sources: dict[str, str] | None) -> None:
        self.args, self.defaults, self.sources = args, defaults, sources
        self.set_by: dict[str, str] = {}

    def given(self, name: str) -> bool:
        from library.config_file import SOURCE_DEFAULT

        if self.sources is not None:
            return self.sources.get(name, SOURCE_DEFAULT) != SOURCE_DEFAULT
        return getattr(self.args, name) != getattr(self.defaults, name)

    def beats_config(self, alias: str, name: str) -> bool:
        """Whether ``alias`` was given on the command line and ``name`` only in the config file."""
        from library.config_file import SOURCE_CLI

        return bool(self.sources) and self.sources.get(alias) == SOURCE_CLI and self.sources.get(name) != SOURCE_CLI

    def set(self, alias: str, name: str, value: Any) -> None:
        current = getattr(self.args, name)
        by = f"--{self.set_by[name]} (sets --{name} {current})" if name in self.set_by else f"--{name} {current}"
        conflict = f"--{alias}{_show(getattr(self.args, alias))} means --{name} {value}, but {by} disagrees; keep one."
        if alias_wins(self.sources, alias, name, current, value, (getattr(self.defaults, name),), conflict):
            setattr(self.args, name, value)
            self.set_by[name] = alias
            if self.sources is not None:
                self.sources[name] = self.sources.get(alias, self.sources.get(name))

    def set_key(self, alias: str, name: str, key: str, text: str) -> None:
        """``key=text`` into the key=value list ``name`` (--optimizer_args, --network_args)."""
        items = list(getattr(self.args, name) or [])
        index = next((i for i, item in enumerate(items) if item.partition("=")[0].strip() == key), None)
        current = None if index is None else items[index].partition("=")[2].strip()
        conflict = (f"--{alias}{_show(getattr(self.args, alias))} means --{name} {key}={text}, but --{name} has "
                    f"{key}={current}; keep one.")
        if current is None or _literal(current) == _literal(text) or alias_wins(
                self.sources, alias, name, _literal(current), _literal(text), (), conflict):
            if index is None:
                items.append(f"{key}={text}")
            else:
                items[index] = f"{key}={text}"
            setattr(self.args, name, items)
            if self.sources is not None and not self.given(name):
                self.sources[name] = self.sources.get(alias, self.sources.get(name))


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _key_value(args: argparse.Namespace, name: str, value: Any) -> str:
    """The text after ``key=`` for an alias into a key=value list."""
    if name in ("adam_beta1", "adam_beta2"):  # one betas tuple; the other beta keeps the Adam default
        beta1, beta2 = getattr(args, "adam_beta1", None), getattr(args, "adam_beta2", None)
        return f"({0.9 if beta1 is None else beta1}, {0.999 if beta2 is None else beta2})"
    if isinstance(value, list):
        return ",".join(value)
    return repr(value)  # Python literals: parse_key_values and the network's flags both read True / 0.9


def _keep_last(args: argparse.Namespace, name: str, value: int) -> int:
    """Their limit counts checkpoints; --save_last_n_steps counts steps (sd-scripts: the files saved at the current
    step minus N or later stay), so K checkpoints are the last K x cadence - 1 steps."""
    if not args.save_every_n_steps:
        raise UserError(f"--{name} {value} limits step checkpoints, but none are saved: add --checkpointing_steps N "
                        "(or --save_steps N, --save_every_n_steps N).")
    return value * args.save_every_n_steps - 1


def _apply_lengths(applied: _Applied, given: dict[str, Any]) -> None:
    """Run length and warmup, where their scripts let one name win over another (steps over epochs, warmup steps
    over the warmup ratio) rather than call it a conflict."""
    if "max_steps" in given:
        applied.set("max_steps", "max_train_steps", given["max_steps"])
    epochs = given.get("num_train_epochs")
    if epochs is not None:
        if epochs != int(epochs) or epochs < 1:
            raise UserError(f"--num_train_epochs {epochs:g}: whole epochs only here; for part of an epoch give "
                            "--max_steps N (optimizer steps).")
        if applied.given("max_train_steps") and not applied.given("max_train_epochs") \
                and not applied.beats_config("num_train_epochs", "max_train_steps"):
            logger.warning("--num_train_epochs %d is set aside: --max_train_steps %d is given too, and the step "
                           "count wins (as in diffusers' scripts and the HF Trainer).", epochs,
                           applied.args.max_train_steps)
        else:
            applied.set("num_train_epochs", "max_train_epochs", int(epochs))
    ratio = given.get("warmup_ratio")
    if ratio is not None and not 0 <= ratio < 1:
        raise UserError(f"--warmup_ratio {ratio:g}: a ratio of the steps must be below 1 (0.1: the first tenth).")
    if "warmup_steps" in given:
        if ratio is not None:
            logger.warning("--warmup_ratio %g is set aside: --warmup_steps %g wins, as in the HF Trainer.", ratio,
                           given["warmup_steps"])
        applied.set("warmup_steps", "lr_warmup_steps", given["warmup_steps"])
    elif ratio is not None:
        applied.set("warmup_ratio", "lr_warmup_steps", ratio)


def _hf_schedule_name(applied: _Applied) -> None:
    """``--lr_scheduler_type cosine``: the HF Trainer's schedule name. Here --lr_scheduler_type names a scheduler
    class (sd-scripts), and no class is called ``cosine``, so such a value can only mean --lr_scheduler."""
    value = applied.args.lr_scheduler_type or ""
    if value.lower() in _HF_ONLY_SCHEDULES:
        raise UserError(f"--lr_scheduler_type {value} (the HF Trainer's schedule) has no counterpart here: "
                        f"{_HF_ONLY_SCHEDULES[value.lower()]}.")
    if value.lower() not in _HF_SCHEDULES:
        return
    applied.set("lr_scheduler_type", "lr_scheduler", value.lower())
    applied.args.lr_scheduler_type = ""
    logger.warning("--lr_scheduler_type %s: the HF Trainer's schedule name, used as --lr_scheduler %s (here "
                   "--lr_scheduler_type names a custom scheduler class, as in sd-scripts).", value, value.lower())


def _refuse(args: argparse.Namespace, given: dict[str, Any]) -> None:
    refused = [(name, arg) for name, arg in FOREIGN_ARGS.items() if arg.handling == "refused" and name in given]
    if not refused:
        return
    lines = [f"--{name}{_show(given[name]) if name != 'hub_token' else ''} ({arg.origin}): {arg.why}."
             for name, arg in refused]
    message = "These flags have no counterpart in this toolkit; write instead:\n  " + "\n  ".join(lines)
    if any(name in given for name in _DREAMBOOTH):
        message += "\n" + _dreambooth_toml(args)
    raise UserError(message)


def _dreambooth_toml(args: argparse.Namespace) -> str:
    """Their DreamBooth flags as a dataset TOML, filled with the values given."""
    def quoted(name: str, placeholder: str) -> str:
        return json.dumps(getattr(args, name, None) or placeholder)

    lines = ["A dataset TOML for these images (save it as data.toml, pass --dataset_config data.toml):",
             "  [[datasets]]", "    [[datasets.subsets]]",
             f"    image_dir = {quoted('instance_data_dir', 'path/to/instance images')}",
             f"    class_tokens = {quoted('instance_prompt', 'a photo of sks dog')}", "    num_repeats = 1"]
    if any(getattr(args, n, None) for n in ("class_data_dir", "class_prompt", "with_prior_preservation")):
        lines += ["    [[datasets.subsets]]", f"    image_dir = {quoted('class_data_dir', 'path/to/class images')}",
                  f"    class_tokens = {quoted('class_prompt', 'a photo of dog')}", "    is_reg = true"]
    return "\n".join(lines)


def foreign_notes(values: dict[str, Any]) -> list[str]:
    """One log line for each table name that was given (``values``: the arguments by name)."""
    notes = []
    for name, arg in FOREIGN_ARGS.items():
        value = values.get(name)
        if value is None or value in ("", []) or (arg.handling != "refused" and not _given(arg, value)):
            continue  # a refused name that is here at all asked for nothing: said, as it is accepted
        shown = "" if name == "hub_token" else _show(value)
        if arg.handling == "alias":
            notes.append(f"--{name}{shown} ({arg.origin} name): used as {arg.why}.")
        elif arg.handling == "ignored":
            notes.append(f"--{name}{shown} ({arg.origin} name): ignored, {arg.why}.")
        else:
            notes.append(f"--{name}{shown} ({arg.origin} name): no counterpart here; accepted because it asks for "
                         "nothing at this value.")
    return notes
