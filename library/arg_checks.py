"""Checks of train_network.py's arguments that argparse cannot express: ranges, combinations, no-op switches.

They run right after parsing, so a bad value stops the run before anything loads (library/args.py defines the
arguments themselves).
"""

from __future__ import annotations

import argparse

from library.accelerator import check_trackers_installed, effective_log_with
from library.args import NO_OP_ARGUMENTS, NOT_IMPLEMENTED_YET
from library.errors import UserError


def no_op_notes(values: dict[str, object]) -> list[str]:
    """One log line for each accepted no-op switch that is on (``values``: the arguments by name)."""
    notes = [f"--{name}: accepted for sd-scripts compatibility; {what}." for name, what in NO_OP_ARGUMENTS.items()
             if values.get(name)]
    if values.get("log_prefix") and not values.get("logging_dir"):
        notes.append(f"--log_prefix {values['log_prefix']}: ignored without --logging_dir (it only prefixes the "
                     "tracker run folder there).")
    return notes


# name → (smallest allowed value, what it means): caught here, before a model loads, instead of an error from
# deep inside the sampler or the optimizer after it.
_AT_LEAST: dict[str, tuple[float, str]] = {
    "train_batch_size": (1, "images per process and step"), "gradient_accumulation_steps": (1, "micro-batches"),
    "max_train_steps": (1, "optimizer steps"), "max_train_epochs": (1, "epochs"), "network_dim": (1, "the rank"),
    "learning_rate": (0, "a learning rate"), "unet_lr": (0, "a learning rate"), "network_alpha": (0, "alpha"),
}


def check_ranges(args: argparse.Namespace) -> None:
    """Numbers outside their meaningful range stop the run before anything loads."""
    for name, (low, what) in _AT_LEAST.items():
        value = getattr(args, name, None)
        if value is not None and value < low:
            raise UserError(f"--{name} {value}: {what} must be at least {low:g}.")
    lrs = args.text_encoder_lr if isinstance(args.text_encoder_lr, list) else [args.text_encoder_lr]
    if any(lr is not None and lr < 0 for lr in lrs):
        raise UserError(f"--text_encoder_lr {args.text_encoder_lr}: a learning rate must be at least 0.")


def check_data_sources(args: argparse.Namespace) -> None:
    """--dataset_config / --train_data_dir / --in_json together (tools/check_dataset.py applies the same rules)."""
    if args.dataset_config and args.train_data_dir:
        raise UserError("Give either --dataset_config or --train_data_dir, not both.")
    if args.in_json and not args.train_data_dir:
        raise UserError("--in_json needs --train_data_dir (the folder its image names refer to); with a dataset "
                        "TOML, set metadata_file in the subset instead.")


def check_combinations(args: argparse.Namespace, defaults: argparse.Namespace) -> None:
    """Reject arguments that are not implemented yet or that contradict each other (and normalise a few)."""
    if isinstance(args.text_encoder_lr, list):  # nargs="*", as sd-scripts: one value is a plain number
        lrs = args.text_encoder_lr
        args.text_encoder_lr = None if not lrs else lrs[0] if len(lrs) == 1 else lrs
    for name, why in NOT_IMPLEMENTED_YET.items():
        if getattr(args, name) != getattr(defaults, name):
            raise UserError(f"--{name} is not supported in this version: {why}.")
    if args.network_train_unet_only and args.network_train_text_encoder_only:
        raise UserError("--network_train_unet_only and --network_train_text_encoder_only exclude each other.")
    if args.load_in_4bit and args.load_in_8bit:
        raise UserError("--load_in_4bit and --load_in_8bit exclude each other; choose one.")
    if args.full_bf16 and args.full_fp16:
        raise UserError("--full_bf16 and --full_fp16 exclude each other.")
    if args.full_bf16 and args.mixed_precision in ("no", "fp16"):  # sd-scripts refuses it too
        raise UserError(f"--full_bf16 keeps the LoRA in bf16, which needs --mixed_precision bf16 (it is "
                        f"{args.mixed_precision}).")
    check_ranges(args)
    if args.lr_scheduler_args and not args.lr_scheduler_type:
        raise UserError("--lr_scheduler_args are the arguments of --lr_scheduler_type, which is not given (the "
                        "named --lr_scheduler schedules take --lr_scheduler_num_cycles / --lr_scheduler_power).")
    if args.scale_weight_norms is not None and args.scale_weight_norms < 0:
        raise UserError(f"--scale_weight_norms {args.scale_weight_norms}: the largest norm must be > 0 "
                        "(0 or unset: off).")
    if args.loss_type in ("huber", "smooth_l1") and not args.huber_c > 0:
        raise UserError(f"--huber_c {args.huber_c}: the {args.loss_type} loss needs a value > 0 (e.g. 0.1).")
    if args.loss_type in ("huber", "smooth_l1") and not args.huber_scale > 0:
        raise UserError(f"--huber_scale {args.huber_scale}: the {args.loss_type} loss needs a value > 0 (default 1).")
    for name in ("sample_every_n_steps", "sample_every_n_epochs"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} {getattr(args, name)}: expected a positive number (leave it out for none).")
    check_data_sources(args)
    if args.output_dir is None and not args.output_config:
        raise UserError("--output_dir is required: the folder where LoRA files are written.")
    if args.pretrained_model_name_or_path is None and not args.output_config:
        raise UserError("--pretrained_model_name_or_path is required.")
    if args.log_with in ("tensorboard", "all") and not args.logging_dir:
        raise UserError(f"--log_with {args.log_with} needs --logging_dir (where the tensorboard logs go).")
    check_trackers_installed(effective_log_with(args.log_with, args.logging_dir))
