"""What a run loads before its first step: the model family, then its data.

Everything that can be checked without the model is checked before it loads (the model type, the dataset TOML,
LoRA files' families, and for image runs the images and their captions), so a typo costs seconds, not a model
load (SDXL: a minute).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from library.base_weights import check_base_weights, check_lora_family, merge_base_weights
from library.errors import UserError
from library.families import DataRequest
from library.train_setup import dataset_defaults, noise_settings, weight_dtype_for


@dataclass(frozen=True)
class ModelChoice:
    """The model type and the --base_weights multipliers, decided and checked before the model loads."""

    model_type: str
    base_multipliers: list[float]


def checked_model_type(forced: str, model_path: str, allow_pickle: bool) -> str:
    """``forced`` (--model_type, or sdxl_train_network.py's), refused when the model's own files say otherwise:
    the wrong family fails much later, deep inside a forward, with a message that does not say why."""
    from library.families import detect_model_type

    try:
        detected = detect_model_type(model_path, allow_pickle=allow_pickle)
    except UserError:
        return forced  # undecided or unreadable: the family's loader reports it in its own terms
    if detected != forced:
        names = {"sd": "an SD 1.x/2.x model", "sdxl": "an SDXL model", "llm": "a causal language model"}
        how = " (sdxl_train_network.py sets it; use train_network.py)" if forced == "sdxl" else ""
        raise UserError(f"--model_type {forced}{how}, but {model_path} is {names.get(detected, detected)}: "
                        f"leave --model_type out (it is detected from the model) or give {names.get(forced, forced)}.")
    return forced


def choose_model(args: argparse.Namespace, sources: dict[str, str]) -> ModelChoice:
    """The model type (detected or --model_type, checked against the model's files) and every check that needs
    only it: the dataset TOML, the --base_weights and --network_weights files' families."""
    from library.families import check_dataset_config, detect_model_type

    model_path = args.pretrained_model_name_or_path
    model_type = (checked_model_type(args.model_type, model_path, args.allow_pickle) if args.model_type != "auto"
                  else detect_model_type(model_path, allow_pickle=args.allow_pickle))
    if args.dataset_config or args.train_data_dir:
        check_dataset_config(model_type, args.dataset_config, dataset_defaults(args, sources))
    base_multipliers = check_base_weights(args.base_weights, args.base_weights_multiplier, model_type)
    if args.network_weights and Path(args.network_weights).exists():  # a missing file: named where it is read
        check_lora_family("--network_weights", args.network_weights, model_type)
    if model_type == "sd":
        from library.families.sd import check_text_caching

        check_text_caching(args.cache_text_encoder_outputs)
    elif model_type == "sdxl":
        from library.families.sdxl import check_text_caching

        check_text_caching(args.cache_text_encoder_outputs, not args.network_train_unet_only)
    if model_type == "llm":  # arguments that do nothing for a causal LM
        from library.families.llm import IMAGE_ONLY_ARGUMENTS

        refuse_image_only_arguments(args, IMAGE_ONLY_ARGUMENTS, model_path)
    if args.base_weights and (args.load_in_4bit or args.load_in_8bit):
        raise UserError("--base_weights cannot be merged into a 4-bit or 8-bit model (--load_in_4bit / "
                        "--load_in_8bit): merge them first with tools/merge.py --llm_model and train on the result.")
    return ModelChoice(model_type, base_multipliers)


def build_family(args: argparse.Namespace, sources: dict[str, str], mixed_precision: str, seed: int,
                 choice: ModelChoice | None = None):
    """Load the model family (``choice``: from choose_model, made now when not given); its network defaults
    (LLMs: dim 16, alpha 16) replace argparse defaults only."""
    from library.config_file import SOURCE_DEFAULT
    from library.families import load_family

    choice = choice or choose_model(args, sources)
    model_type, model_path = choice.model_type, args.pretrained_model_name_or_path
    family = load_family(model_type, model_path, vae_path=args.vae, tokenizer_path=args.tokenizer_cache_dir,
                         v2=args.v2 or None, v_parameterization=args.v_parameterization or None,
                         noise=noise_settings(args), seed=seed, clip_skip=args.clip_skip,
                         max_token_length=args.max_token_length, weight_dtype=weight_dtype_for(mixed_precision),
                         load_in_4bit=args.load_in_4bit, load_in_8bit=args.load_in_8bit, allow_pickle=args.allow_pickle,
                         attn_implementation=args.attn_implementation,
                         model_config_dir=args.model_config_dir)
    if args.base_weights:  # into the frozen weights, before the network wraps them (and before fp8 / casting)
        from accelerate import PartialState

        merge_base_weights(family, model_type, model_path, args.base_weights, choice.base_multipliers,
                           print if PartialState().is_main_process else lambda _: None)
    if args.weighted_captions:
        family.weighted_captions = True
    for key, value in getattr(family, "network_defaults", {}).items():
        if sources.get(key) == SOURCE_DEFAULT:
            setattr(args, key, value)
    length_given = any(sources.get(key) != SOURCE_DEFAULT for key in ("max_train_steps", "max_train_epochs"))
    if getattr(family, "default_epochs", None) and not length_given:
        args.max_train_epochs = family.default_epochs
    return family


def refuse_image_only_arguments(args: argparse.Namespace, names: tuple[str, ...], model_path: str) -> None:
    """A UserError for every argument in ``names`` set away from its default: it would do nothing for this
    model (an LLM has no latents, noise schedule or captions) yet be recorded in the metadata as if used."""
    from library.args import build_parser

    defaults = {action.dest: action.default for action in build_parser()._actions}
    given = [f"--{name}" for name in names if getattr(args, name, None) != defaults.get(name)]
    if given:
        raise UserError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to diffusion models, not to "
                        f"the causal LM {model_path}; remove {'it' if len(given) == 1 else 'them'}.")


def data_request(args: argparse.Namespace, accelerator: Any, seed: int,
                 sources: dict[str, str] | None = None) -> DataRequest:
    """What the family's build_data needs, from the arguments and this process's place in the run."""
    return DataRequest(
        dataset_config=args.dataset_config, defaults=dataset_defaults(args, sources), seed=seed,
        on_bad_image=args.on_bad_image, num_processes=accelerator.num_processes, rank=accelerator.process_index,
        # On a CPU device, loader processes would only take cores from the step.
        num_workers=args.max_data_loader_n_workers if accelerator.device.type != "cpu" else 0,
        persistent_workers=args.persistent_data_loader_workers, cache_latents=args.cache_latents,
        cache_latents_to_disk=args.cache_latents_to_disk, barrier=accelerator.wait_for_everyone,
        vae_batch_size=args.vae_batch_size, device=accelerator.device,
        cache_text_encoder_outputs=args.cache_text_encoder_outputs,
        accumulation=accelerator.gradient_accumulation_steps, masked_loss=args.masked_loss)


def scan_data(model_type: str, request: DataRequest, model_path: str, tokenizer_path: str | None) -> DataRequest:
    """``request`` with its data read now, before the model loads, so that a missing caption file, an unreadable
    image or a bad JSONL row stops the run in seconds. Images are listed, captioned and probed; text rows are
    tokenised with the model's tokenizer (only its tokenizer and config.json are read). The family's build_data
    takes them from the request, so nothing is read twice."""
    if model_type == "llm":
        from library.families.llm import scan_before_load

        return dataclasses.replace(request, scanned=scan_before_load(request, model_path, tokenizer_path))
    from library.families.diffusion_parts import scan_images

    scanned = scan_images(request)
    if model_type == "sdxl":  # bucket sides: the config alone tells (SD's need its UNet's config)
        from library.families.sdxl import check_sides

        check_sides(scanned[0])
    return dataclasses.replace(request, scanned=scanned)


def build_data(args: argparse.Namespace, family: Any, request: DataRequest, seed: int,
               sources: dict[str, str] | None = None):
    """The family's data for this process (sampler, loader, optional validation loader)."""
    data = family.build_data(request)
    note_batch_size_override(args.train_batch_size, (sources or {}).get("train_batch_size"), data.batch_size,
                             args.dataset_config)
    # torch's DataLoader draws its workers' base seed from the global RNG each time an epoch's iterator
    # starts, unless it has a generator of its own. A resumed run starts one right after the state restore,
    # which would shift every later draw from that RNG (LoRA dropout) away from the uninterrupted run.
    for loader in (data.loader, getattr(data, "validation_loader", None)):
        if loader is not None and getattr(loader, "generator", None) is None:
            loader.generator = torch.Generator().manual_seed(seed)
    if args.weighted_captions:
        warn_weighted_tag_splits(getattr(data, "datasets", []))
    return data


def warn_weighted_tag_splits(datasets: list[Any]) -> None:
    """--weighted_captions with tag shuffling or dropout: tags are split at the separator before the weights are
    read, so a weighted group holding a comma, ``(red hair, blue eyes:1.2)``, would come apart silently."""
    split = [subset.name for dataset in datasets for subset in dataset.config.subsets
             if subset.shuffle_caption or subset.caption_tag_dropout_rate or subset.keep_tokens_separator]
    if split:
        logging.getLogger(__name__).warning(
            "--weighted_captions with shuffle_caption / caption_tag_dropout_rate / keep_tokens_separator (%s): tags "
            "are split at the caption separator first, so a weighted group must not hold one, e.g. write "
            "(red hair:1.2), (blue eyes:1.2) rather than (red hair, blue eyes:1.2)", ", ".join(split))


def note_batch_size_override(given: int, source: str | None, used: int, dataset_config: str | None) -> None:
    """A warning when a --train_batch_size the user gave loses to the dataset TOML's batch_size: the TOML wins (as
    in sd-scripts), and someone lowering the batch to fit memory would otherwise train at the larger one."""
    from library.config_file import SOURCE_DEFAULT

    if source in (None, SOURCE_DEFAULT) or given == used or not dataset_config:
        return
    logging.getLogger(__name__).warning(
        "--train_batch_size %d (%s) is not used: batch_size = %d in %s wins (the dataset TOML's values beat the "
        "command line's dataset defaults, as in sd-scripts); change batch_size there instead", given, source, used,
        dataset_config)

