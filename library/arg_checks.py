"""Checks of train_network.py's arguments that argparse cannot express: ranges, combinations, no-op switches.

They run right after parsing, so a bad value stops the run before anything loads (library/args.py defines the
arguments themselves). ``check_sd_sides`` is the exception: the image sides an SD 1.x/2.x model can take depend
on its VAE and UNet, so the family calls it once they are loaded, as SDXL's ``check_sides``.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from library.accelerator import check_trackers_installed, effective_log_with
from library.args import NOT_IMPLEMENTED_YET
from library.config_file import IGNORED_KEYS_ATTR
from library.dataset_config import DatasetGroupConfig, parse_resolution
from library.errors import UserError
from library.foreign_args import apply_foreign_args, foreign_notes
from library.sd_scripts_args import GUI_ONLY_KEYS, apply_sd_scripts_args, sd_scripts_notes

logger = logging.getLogger(__name__)


# kohya switches that ask for something this project always does (or has no need of): accepted, so that
# sd-scripts configs run, and each one given is named in the log with what happens instead.
NO_OP_ARGUMENTS: dict[str, str] = {
    "xformers": "PyTorch SDPA attention (flash / memory-efficient kernels) is always used instead",
    "mem_eff_attn": "PyTorch SDPA attention (flash / memory-efficient kernels) is always used instead",
    "lowram": "models are always read with low RAM use (memory-mapped safetensors, no second copy) and then "
              "moved to the device; there is no other low-RAM mode",
    "highvram": "there is no low-VRAM mode to disable (the CUDA cache is not cleared while caching latents)",
}


def no_op_notes(values: dict[str, object]) -> list[str]:
    """One log line for each accepted no-op switch that is on (``values``: the arguments by name)."""
    notes = [f"--{name}: accepted for sd-scripts compatibility; {what}." for name, what in NO_OP_ARGUMENTS.items()
             if values.get(name)]
    if values.get("log_prefix") and not values.get("logging_dir"):
        notes.append(f"--log_prefix {values['log_prefix']}: ignored without --logging_dir (it only prefixes the "
                     "tracker run folder there).")
    notes += sd_scripts_notes(values) + foreign_notes(values)
    ignored = values.get(IGNORED_KEYS_ATTR) or []
    if ignored:  # one note for all of them: a GUI export holds several in every file
        keys = "; ".join(f"{key} = {value!r} ({GUI_ONLY_KEYS[key]})" for _, key, value in ignored)
        notes.append(f"{ignored[0][0]}: kohya_ss GUI keys ignored (they are no training arguments; sd-scripts "
                     f"ignores them too): {keys}.")
    return notes


# name → (smallest allowed value, what it means): caught here, before a model loads, instead of an error from
# deep inside the sampler or the optimizer after it.
_AT_LEAST: dict[str, tuple[float, str]] = {
    "train_batch_size": (1, "images per process and step"), "gradient_accumulation_steps": (1, "micro-batches"),
    "max_train_steps": (1, "optimizer steps"), "max_train_epochs": (1, "epochs"), "network_dim": (1, "the rank"),
    "learning_rate": (0, "a learning rate"), "unet_lr": (0, "a learning rate"), "network_alpha": (0, "alpha"),
    "prior_loss_weight": (0, "a loss weight"), "keep_tokens": (0, "a number of tags"),
    "caption_dropout_every_n_epochs": (0, "a number of epochs"), "clip_skip": (1, "a layer count from the end"),
    "max_grad_norm": (0, "a gradient norm (0: no clipping)"), "min_timestep": (0, "a timestep"),
    "max_timestep": (1, "a timestep (exclusive)"),
}
# name → (lowest, highest, whether the highest itself is allowed, what it means)
_FRACTIONS: dict[str, tuple[float, float, bool, str]] = {
    "caption_dropout_rate": (0, 1, True, "a probability"), "caption_tag_dropout_rate": (0, 1, True, "a probability"),
    "network_dropout": (0, 1, False, "a dropout probability"),
}


def check_ranges(args: argparse.Namespace) -> None:
    """Numbers outside their meaningful range stop the run before anything loads."""
    for name, (low, what) in _AT_LEAST.items():
        value = getattr(args, name, None)
        if value is not None and value < low:
            raise UserError(f"--{name} {value}: {what} must be at least {low:g}.")
    for name, (low, high, inclusive, what) in _FRACTIONS.items():
        value = getattr(args, name, None)
        if value is not None and not (low <= value <= high if inclusive else low <= value < high):
            upper = f"{high:g}" if inclusive else f"below {high:g}"
            raise UserError(f"--{name} {value}: {what} must be from {low:g} to {upper}.")
    if getattr(args, "min_snr_gamma", None) is not None and args.min_snr_gamma <= 0:  # <= 0: gradient ascent
        raise UserError(f"--min_snr_gamma {args.min_snr_gamma}: gamma must be above 0 (5 is the usual value).")
    low, high = getattr(args, "min_timestep", None), getattr(args, "max_timestep", None)
    if (low or 0) >= (1000 if high is None else high) or (high is not None and high > 1000):
        raise UserError(f"--min_timestep {low} / --max_timestep {high}: training draws timesteps from min "
                        "(included, default 0) to max (excluded, default 1000), so 0 <= min < max <= 1000.")
    lrs = args.text_encoder_lr if isinstance(args.text_encoder_lr, list) else [args.text_encoder_lr]
    if any(lr is not None and lr < 0 for lr in lrs):
        raise UserError(f"--text_encoder_lr {args.text_encoder_lr}: a learning rate must be at least 0.")
    _check_llm_learning_rate(args)
    if args.resolution is not None:  # "abc" or "512,x": said now, not after the model has loaded
        parse_resolution(args.resolution)
    if not 0 <= args.validation_split < 1:  # the dataset TOML's own value is checked with the same range
        raise UserError(f"--validation_split {args.validation_split}: expected a fraction from 0 up to (not "
                        "including) 1, e.g. 0.1 to hold out a tenth of each subset's images (rows, for LLM data).")


def _is_llm(args: argparse.Namespace) -> bool:
    """Whether the model is a causal LM, from --model_type or the folder's config.json alone (nothing loads);
    False when that cannot be told cheaply (the model-type check later says what is wrong with the path)."""
    model_type = getattr(args, "model_type", "auto")
    if model_type != "auto" or not getattr(args, "pretrained_model_name_or_path", None):
        return model_type == "llm"
    from library.families import detect_model_type

    path = Path(args.pretrained_model_name_or_path)
    if not (path / "config.json").is_file():  # a diffusers folder, a single file or no model: not an LLM here
        return False
    try:
        return detect_model_type(path) == "llm"
    except UserError:
        return False


def _check_llm_learning_rate(args: argparse.Namespace) -> None:
    """An LLM's LoRA has one learning rate (--unet_lr, else --learning_rate); 0 leaves nothing to train. Said
    here, before the model loads, without the diffusion models' --text_encoder_lr (refused for an LLM)."""
    lr = args.unet_lr if getattr(args, "unet_lr", None) is not None else args.learning_rate
    if lr != 0 or not _is_llm(args):
        return
    given = f"--unet_lr {args.unet_lr:g}" if getattr(args, "unet_lr", None) is not None else \
        f"--learning_rate {args.learning_rate:g}"
    raise UserError(f"{given}: the LLM's LoRA would train nothing (it takes --unet_lr when given, else "
                    "--learning_rate; --text_encoder_lr is for diffusion models); give a rate above 0, e.g. "
                    "--learning_rate 1e-4.")


def check_data_sources(args: argparse.Namespace) -> None:
    """--dataset_config / --train_data_dir / --in_json together (tools/check_dataset.py applies the same rules).

    With a dataset TOML the folder options are ignored with one warning and cleared, as sd-scripts does: the
    kohya_ss GUI writes train_data_dir whenever its image-folder field is filled, dataset TOML or not.
    """
    if args.dataset_config:
        given = [name for name in ("train_data_dir", "reg_data_dir", "in_json") if getattr(args, name, None)]
        if given:
            logger.warning("--dataset_config %s gives the datasets, so %s %s ignored (as in sd-scripts); set folders "
                           "in that TOML's subsets.", args.dataset_config, ", ".join(f"--{n}" for n in given),
                           "is" if len(given) == 1 else "are")
            for name in given:
                setattr(args, name, None)
        return
    if args.in_json and not args.train_data_dir:
        raise UserError("--in_json needs --train_data_dir (the folder its image names refer to); with a dataset "
                        "TOML, set metadata_file in the subset instead.")


def check_combinations(args: argparse.Namespace, defaults: argparse.Namespace,
                       sources: dict[str, str] | None = None) -> None:
    """Reject arguments that are not implemented yet or that contradict each other (and normalise a few);
    ``sources`` (where each value came from) lets the command line win over a config file's alias."""
    apply_sd_scripts_args(args, sources)  # first: an alias such as --use_8bit_adam sets what the checks below look at
    apply_foreign_args(args, defaults, sources)  # likewise diffusers' and TRL's names (--rank, --max_steps, --bf16)
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


def check_sd_sides(config: DatasetGroupConfig, unet_config: Mapping[str, Any], pixels_per_latent: int) -> None:
    """SD 1.x/2.x: refuse image sides the VAE and UNet cannot take; warn of a resolution far below the native one.

    A side must be a whole number of latents (the VAE turns ``pixels_per_latent`` pixels into one: 8 for the
    released models), and at least one latent must be left after the UNet's last downsampling (each down block
    but the last halves the latents: 64 px for SD 1.5). A side off the VAE's grid would be rounded by the VAE,
    so the latents no longer line up with the pixels and crop/size bookkeeping; whole latents that are not a
    multiple of 64 px train, as in sd-scripts (diffusers' UNet sizes its upsampling to the skip connections).
    ``unet_config``: the loaded UNet's config.
    """
    factor = pixels_per_latent
    smallest = factor * 2 ** (len(unet_config["down_block_types"]) - 1)
    sample = unet_config.get("sample_size")
    native = factor * (sample if isinstance(sample, int) else min(sample)) if sample else None
    for dataset in config.datasets:
        where = dataset.name if dataset.name == config.source else f"{config.source}: {dataset.name}"
        (w, h), fix = dataset.resolution, "resolution in the dataset TOML, else --resolution"
        if w % factor or h % factor:
            down, up = (f"{w // factor * factor or factor}x{h // factor * factor or factor}",
                        f"{-(-w // factor) * factor}x{-(-h // factor) * factor}")
            raise UserError(f"{where}: resolution {w}x{h} is not a multiple of {factor} on both sides (the VAE "
                            f"encodes {factor}x{factor} pixels into one latent); use e.g. {down} or {up} ({fix}).")
        if min(w, h) < smallest:
            raise UserError(f"{where}: resolution {w}x{h} is below {smallest} px, the smallest side this model's "
                            f"UNet can downsample ({factor} px per latent, times 2 for each of its "
                            f"{len(unet_config['down_block_types']) - 1} downsampling steps); use {smallest} or more "
                            f"({fix}).")
        if dataset.enable_bucket:
            check_bucket_sides(dataset, where, factor, smallest)
        if native and w * h * 4 < native * native:
            logger.warning("%s: resolution %dx%d is less than half this model's native %d px per side; it can "
                           "train at that size, but learns little detail there (usual: %d).", where, w, h, native,
                           native)


def check_bucket_sides(dataset: Any, where: str, factor: int, smallest: int) -> None:
    """Bucket sides count up from min_bucket_reso in bucket_reso_steps and stop at max_bucket_reso, so all three
    must be whole latents; the smallest bucket side is min_bucket_reso (one step with bucket_no_upscale)."""
    keys = ("bucket_reso_steps", "max_bucket_reso") + (() if dataset.bucket_no_upscale else ("min_bucket_reso",))
    for key in keys:  # bucket_no_upscale ignores min_bucket_reso
        if getattr(dataset, key) % factor:
            raise UserError(f"{where}: {key} = {getattr(dataset, key)} is not a multiple of {factor}, so buckets "
                            f"would have sides the VAE cannot encode (it turns {factor} pixels into one latent); "
                            f"use a multiple of {factor} (64 is usual), in the dataset TOML or as --{key}.")
    key = "bucket_reso_steps" if dataset.bucket_no_upscale else "min_bucket_reso"
    if getattr(dataset, key) < smallest:
        raise UserError(f"{where}: {key} = {getattr(dataset, key)} allows buckets with sides below {smallest} px, "
                        f"the smallest this model's UNet can downsample; use {smallest} or more, in the dataset "
                        f"TOML or as --{key}.")
