"""sd-scripts' ``--base_weights`` / ``--base_weights_multiplier``: LoRAs baked into the frozen model first.

The files are merged after the model loads and before the trained network is created, so the new
LoRA learns on top of ``W + Σ multiplier_i · ΔW_i``. The merge is tools/merge.py's (its ``bake``:
float32 arithmetic, shape checks, DoRA magnitudes), reading the files through library/lora_files.py,
so a file the merge tool bakes into a model is baked here the same way, and one for another model is
refused in the same terms.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from library.errors import UserError


def base_weight_multipliers(paths: list[str] | None, multipliers: list[float] | None) -> list[float]:
    """One multiplier per file: none given is 1.0 each, one given applies to every file.

    sd-scripts gives files past the end of a shorter list 1.0; a list of another length than 1 or the number
    of files is refused here, since which file gets which value would then be a guess.
    """
    paths = paths or []
    if multipliers and not paths:
        raise UserError(f"--base_weights_multiplier {' '.join(map(str, multipliers))} without --base_weights: "
                        "give the LoRA files to merge, or remove it.")
    if not multipliers:
        return [1.0] * len(paths)
    if len(multipliers) == 1:
        return multipliers * len(paths)
    if len(multipliers) != len(paths):
        raise UserError(f"{len(paths)} --base_weights files but {len(multipliers)} --base_weights_multiplier values; "
                        "give one value per file, or one for all of them.")
    return list(multipliers)


# The LoRA family (library/lora_files.py) each model type takes.
_FAMILY_OF_MODEL_TYPE = {"sd": "sd1", "sdxl": "sdxl", "llm": "llm"}


def check_base_weights(paths: list[str] | None, multipliers: list[float] | None,
                       model_type: str | None = None) -> list[float]:
    """The multipliers, after checking that every file exists and, where its key names tell (the header
    only: no tensor is read), that it is a LoRA for ``model_type``: called before the model loads."""
    chosen = base_weight_multipliers(paths, multipliers)
    for path in paths or []:
        p = Path(path)
        if not p.exists():
            raise UserError(f"--base_weights {path}: file not found; give a LoRA file (.safetensors, .ckpt/.pt) "
                            "or a PEFT adapter folder to merge into the model before training.")
        check_lora_family("--base_weights", path, model_type)
    return chosen


def check_lora_family(flag: str, path: str, model_type: str | None) -> None:
    """Refuse a LoRA file or PEFT folder whose key names (read from the header: no tensor is loaded) tell another
    model family than ``model_type``'s, before the model loads; files that do not tell pass."""
    from library.lora_files import file_family

    p = Path(path)
    expected = _FAMILY_OF_MODEL_TYPE.get(model_type or "")
    if expected is None or not (p.is_dir() or p.suffix.lower() == ".safetensors"):
        return
    try:
        family, why = file_family(path)
    except UserError:  # not a readable LoRA: reading it later says so in its own terms (e.g. what a folder lacks)
        return
    if family is not None and family != expected:
        raise UserError(f"{flag} {path} is a LoRA for {family} ({why}), but the model is --model_type "
                        f"{model_type}; give LoRAs made for this model.")


def base_weights_metadata(paths: list[str] | None, multipliers: list[float] | None) -> list[dict[str, Any]]:
    """[{"name": file name, "multiplier": m}, ...]: what ``ss_base_weights`` and the resume check record (the file
    names, never their paths, as for every path in the metadata)."""
    return [{"name": Path(path).name, "multiplier": m}
            for path, m in zip(paths or [], base_weight_multipliers(paths, multipliers), strict=True)]


def merge_base_weights(family: Any, model_type: str, model_path: str, paths: list[str], multipliers: list[float],
                       log: Callable[[str], Any] = print) -> None:
    """Bake each file into the family's frozen model (text encoders and UNet, or the causal LM)."""
    from library.lora_files import check_same_family, load_lora
    from tools.merge import bake, untie_adapted

    if getattr(family, "quantized", None):
        raise UserError("--base_weights cannot be merged into a 4-bit or 8-bit model (--load_in_4bit / "
                        "--load_in_8bit): merge them first with tools/merge.py --llm_model and train on the result.")
    _, text_encoders, model = family.network_inputs()
    if model_type == "llm":
        modules = {"lora_unet_" + name.replace(".", "_"): m for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear)}
        namer, family_name = None, "llm"
    else:
        from library.diffusion_models import lora_namer, target_modules

        encoders = text_encoders if isinstance(text_encoders, list) else [text_encoders]
        modules = target_modules(model, encoders)
        namer = lora_namer(model, encoders)  # diffusers / ComfyUI files read into this model's kohya names
        family_name = namer.family.name
    files = [load_lora(path, namer, allow_dora=True) for path in paths]
    check_same_family(paths, files, (f"--pretrained_model_name_or_path {model_path}", family_name))
    if model_type == "llm":
        untie_adapted(model, modules, {name for lora in files for name in lora.state})
    for path, multiplier, lora in zip(paths, multipliers, files, strict=True):
        n = bake(modules, lora.state, multiplier, path, "cpu", torch.float32, lora.magnitudes)
        log(f"--base_weights: merged {path} ({n} {'DoRA ' if lora.is_dora else ''}modules) with multiplier "
            f"{multiplier}")
