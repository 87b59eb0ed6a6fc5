"""SD 1.x/2.x and SDXL models for the tools (merge, extract): loading, and LoRA targets by kohya name.

Diffusers folders, and for extract single-file checkpoints too (read as the trainer reads them,
library/single_file.py).

The targets and their names are exactly those networks.lora creates for the same models: text
encoders ``lora_te_`` (one) or ``lora_te1_`` / ``lora_te2_`` (SDXL), the UNet ``lora_unet_`` with
diffusers paths (SD 1.x/2.x) or the original SGM block names (SDXL, networks/sgm_names.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from library.errors import UserError
from library.lora_formats import FAMILIES, Family, Namer, UNetLayout
from networks.targets import CLIP_TEXT, SD_UNET, Target, find_targets, text_encoder_specs, unet_spec_for

SDXL_VERSION = "sdxl_base_v1-0"


def is_sdxl_folder(root: Path) -> bool:
    """A diffusers folder with SDXL's second text encoder."""
    return (root / "text_encoder_2").is_dir()


def check_folder(folder: str, option: str) -> Path:
    """The folder of ``--<option>`` if it is a diffusers SD / SDXL base model folder, else a UserError."""
    root = Path(folder)
    if root.is_file():
        raise UserError(f"--{option} {folder}: single-file checkpoints are not supported; give a diffusers folder")
    if not (root / "unet" / "config.json").is_file():
        raise UserError(f"--{option} {folder}: not a diffusers SD/SDXL folder (no unet/config.json)")
    if is_sdxl_folder(root) and not (root / "text_encoder").is_dir():
        raise UserError(f"--{option} {folder}: an SDXL model without the first text encoder (the refiner?) "
                        "is not supported; give an SDXL base model")  # fmt: skip
    return root


def load_pipeline(folder: str, option: str = "sd_model") -> Any:
    """The whole pipeline of a diffusers folder: ``StableDiffusionXLPipeline`` for SDXL, else SD's."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    root = check_folder(folder, option)
    if not (root / "model_index.json").is_file():
        raise UserError(f"--{option} {folder}: not a diffusers pipeline folder (no model_index.json)")
    try:
        if is_sdxl_folder(root):
            return StableDiffusionXLPipeline.from_pretrained(str(root), add_watermarker=False)
        return StableDiffusionPipeline.from_pretrained(str(root), safety_checker=None, requires_safety_checker=False)
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"--{option} {folder}: cannot load the pipeline ({e})") from None


def pipeline_text_encoders(pipe: Any) -> list[torch.nn.Module]:
    """The pipeline's text encoders in kohya order (te1, te2 for SDXL)."""
    return [te for te in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if te is not None]


@dataclass
class DiffusionModels:
    """The parts of a diffusers folder a LoRA touches, in float32."""

    unet: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    scheduler: dict  # the scheduler config (prediction_type), {} when absent

    @property
    def is_sdxl(self) -> bool:
        return len(self.text_encoders) == 2

    @property
    def is_v2(self) -> bool:
        """SD 2.x: its UNet projects attention in and out with Linear layers, SD 1.x with 1x1 convs.

        That flag follows the weights' shapes (a Linear proj_in is [out, in], a conv one [out, in, 1, 1]), so
        it holds at any size, tiny test models included. The text encoder's width (1024 for OpenCLIP ViT-H)
        holds only at full size, and the scheduler's prediction_type tells SD 2.x 768-v from 512-base, not
        SD 2 from SD 1.
        """
        return not self.is_sdxl and bool(self.unet.config.get("use_linear_projection"))

    def base_model_version(self, v2: bool = False, v_prediction: bool = False) -> str:
        """kohya's ``ss_base_model_version``: sd_v1, sd_v2, sd_v2_v or sdxl_base_v1-0; ``v2`` and
        ``v_prediction`` force what the configs would otherwise decide."""
        if self.is_sdxl:
            return SDXL_VERSION
        if not (v2 or self.is_v2):
            return "sd_v1"
        return "sd_v2_v" if v_prediction or self.v_prediction else "sd_v2"

    @property
    def v_prediction(self) -> bool:
        return self.scheduler.get("prediction_type") == "v_prediction"


@dataclass(frozen=True)
class ModelKind:
    """What a model is, told from its configs or key names before any weight loads."""

    sdxl: bool
    v2: bool

    @property
    def label(self) -> str:
        return "SDXL" if self.sdxl else "SD 2.x" if self.v2 else "SD 1.x"


def model_kind(path: str, option: str, allow_pickle: bool = False) -> ModelKind:
    """The kind of a diffusers folder (SD 2.x: the UNet's linear projections) or of a single-file checkpoint
    (its key names; of a .safetensors only the header and one small tensor are read)."""
    if Path(path).is_file():
        from library.single_file import detect_checkpoint

        kind = detect_checkpoint(path, allow_pickle)
        return ModelKind(kind.family == "sdxl", kind.name == "sd_v2")
    root = check_folder(path, option)
    unet = json.loads((root / "unet" / "config.json").read_text(encoding="utf-8"))
    sdxl = is_sdxl_folder(root)
    return ModelKind(sdxl, not sdxl and bool(unet.get("use_linear_projection")))


def load_single_file_models(path: str, model_config_dir: str | None = None,
                            allow_pickle: bool = False) -> DiffusionModels:  # fmt: skip
    """UNet and text encoder(s) of a single-file checkpoint, as the trainer reads one (no VAE, no tokenizer)."""
    from library import single_file as sf

    state = sf.read_checkpoint(path, allow_pickle)
    kind = sf.detect_kind(state, state.__getitem__, str(path))
    configs = sf.config_folder(kind, model_config_dir)
    v_prediction, _ = sf.detect_v_prediction(kind, state, state.__getitem__)
    encoders = [sf.load_text_encoder(state, prefix, style, configs, sub) for prefix, style, sub in kind.text_encoders]
    unet = sf.load_unet(state, configs)
    return DiffusionModels(unet, encoders, {"prediction_type": "v_prediction" if v_prediction else "epsilon"})


def load_models(folder: str, option: str, model_config_dir: str | None = None,
                allow_pickle: bool = False) -> DiffusionModels:  # fmt: skip
    """UNet and text encoder(s) of an SD 1.x/2.x or SDXL diffusers folder or single file (no VAE, no tokenizer)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if Path(folder).is_file():
        return load_single_file_models(folder, model_config_dir, allow_pickle)
    root = check_folder(folder, option)
    parts = [("text_encoder", CLIPTextModel)]
    if is_sdxl_folder(root):
        parts.append(("text_encoder_2", CLIPTextModelWithProjection))
    try:
        unet = UNet2DConditionModel.from_pretrained(str(root), subfolder="unet", torch_dtype=torch.float32)
        tes = [cls.from_pretrained(str(root), subfolder=sub, torch_dtype=torch.float32) for sub, cls in parts]
    except (OSError, ValueError) as e:
        raise UserError(f"--{option} {folder}: cannot load the model ({e})") from None
    sched = root / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(sched.read_text(encoding="utf-8")) if sched.is_file() else {}
    return DiffusionModels(unet, tes, scheduler)


def lora_targets(unet: torch.nn.Module, text_encoders: Sequence[torch.nn.Module], include_conv: bool) -> list[Target]:
    """Every module networks.lora would adapt in these models, text encoders first, with its kohya name."""
    specs = text_encoder_specs(len(text_encoders), CLIP_TEXT)
    targets = [t for te, spec in zip(text_encoders, specs, strict=True) for t in find_targets(te, spec, include_conv)]
    return targets + find_targets(unet, unet_spec_for(unet, SD_UNET), include_conv)


def target_modules(unet: torch.nn.Module, text_encoders: Sequence[torch.nn.Module],
                   include_conv: bool = True) -> dict[str, torch.nn.Module]:  # fmt: skip
    """kohya name → module for every target (conv included by default)."""
    return {t.lora_name: t.module for t in lora_targets(unet, text_encoders, include_conv)}


def every_layer(unet: torch.nn.Module, text_encoders: Sequence[torch.nn.Module]) -> dict[str, torch.nn.Module]:
    """kohya name → every Linear / Conv2d of the models, named as ``target_modules`` names its targets.

    What a file may hold beyond networks.lora's targets: a LyCORIS preset also adapts the time and label
    embeddings (``time_embed_0``, ``label_emb_0_0`` in SDXL's SGM names)."""
    specs = [*text_encoder_specs(len(text_encoders), CLIP_TEXT), unet_spec_for(unet, SD_UNET)]
    layers: dict[str, torch.nn.Module] = {}
    for root, spec in zip([*text_encoders, unet], specs, strict=True):
        for path, module in root.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                layers.setdefault(spec.lora_name(path), module)
    return layers


def matched_targets(org: DiffusionModels, tuned: DiffusionModels,
                    include_conv: bool) -> Iterator[tuple[str, bool, torch.nn.Module, torch.nn.Module]]:  # fmt: skip
    """(lora_name, is_kxk, base module, tuned module) for every target; the two must be the same architecture."""
    if org.is_sdxl != tuned.is_sdxl:
        kinds = ["SDXL" if m.is_sdxl else "SD 1.x/2.x" for m in (org, tuned)]
        raise UserError(f"the base model is {kinds[0]} but the tuned one {kinds[1]}; extract needs the same model type")
    tuned_targets = {t.lora_name: t for t in lora_targets(tuned.unet, tuned.text_encoders, include_conv)}
    org_targets = lora_targets(org.unet, org.text_encoders, include_conv)
    if len(org_targets) != len(tuned_targets):
        raise UserError("the two models differ in architecture; extract needs the same model type")
    for t in org_targets:
        other = tuned_targets.get(t.lora_name)
        if other is None or other.module.weight.shape != t.module.weight.shape:
            raise UserError(f"{t.lora_name}: the two models differ in architecture; extract needs the same model type")
        yield t.lora_name, t.is_kxk_conv, t.module, other.module


def lora_namer(unet: torch.nn.Module, text_encoders: Sequence[torch.nn.Module]) -> Namer:
    """How diffusers / ComfyUI LoRA files name this model's modules, for reading them into kohya names."""
    family = FAMILIES["sdxl" if len(text_encoders) == 2 else "sd1"]
    config = dict(unet.config)
    if not isinstance(config.get("layers_per_block", 2), int):
        return Namer(family)  # per-block layer counts: the family's default numbering
    return Namer(Family(family.name, family.components, UNetLayout.from_config(config)))
