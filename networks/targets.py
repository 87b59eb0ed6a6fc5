"""Which modules get a LoRA, and what their kohya key names are: architecture differences as data.

kohya's rule: inside every module whose class name is in ``module_classes``, each ``Linear`` and
each 1x1 ``Conv2d`` gets a LoRA. With a ``conv_dim`` (LoCon) the modules in
``conv_module_classes`` are searched too, and their kxk ``Conv2d`` children are also targets.
The key name is ``prefix + "_" + path.replace(".", "_")``, where ``path`` is the module's path
in the model after the optional ``rename`` hook. An SDXL UNet (``text_time`` conditioning) is
named with the original SGM blocks (``input_blocks_4_1_...``, networks/sgm_names.py), as every
SDXL LoRA file and consumer expects.

Causal LMs (passed as ``unet``, CONTRACTS.md §5) use another rule, PEFT's "all-linear": every
``Linear`` of the model (bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` are ``Linear`` subclasses)
and every transformers ``Conv1D`` (GPT-2 style, networks/conv1d.py) except the output layer ``lm_head``.
Their names keep kohya's ``lora_unet`` prefix for the model passed as ``unet``, e.g.
``lora_unet_model_layers_0_self_attn_q_proj``. For any model, ``target_modules`` (PEFT semantics) keeps
only the modules whose path equals a listed name or ends with ``"." + name``; a listed ``lm_head`` is
then allowed too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from library.errors import UserError
from networks.conv1d import is_linear_like
from networks.sgm_names import SDXL_LAYOUT, UNetLayout, is_sdxl_unet, sgm_renamer


@dataclass(frozen=True)
class TargetSpec:
    """Where LoRAs go in one model and how they are named.

    prefix: key prefix, e.g. ``lora_unet`` or ``lora_te1``.
    module_classes: class names searched for Linear / 1x1 Conv2d children.
    conv_module_classes: class names searched as well when conv LoRAs (``conv_dim``) are on.
    rename: maps a module path of this model to the path used in key names (None = identity);
        used where the file format names modules differently from the in-memory model.
    all_linear / skip_output_layer / target_modules: the causal-LM rule of the module docstring.
    """

    prefix: str
    module_classes: tuple[str, ...]
    conv_module_classes: tuple[str, ...] = ()
    rename: Callable[[str], str] | None = None
    all_linear: bool = False  # every Linear of the model, not only those inside module_classes
    skip_output_layer: bool = False  # with all_linear: leave out the output embedding (lm_head)
    target_modules: tuple[str, ...] | None = None  # PEFT-style filter on module paths

    def lora_name(self, module_path: str) -> str:
        path = self.rename(module_path) if self.rename is not None else module_path
        return f"{self.prefix}_{path.replace('.', '_')}"

    def with_prefix(self, prefix: str) -> TargetSpec:
        return dataclasses.replace(self, prefix=prefix)


def _clip_text_model_path(path: str) -> str:
    # transformers 5 flattened CLIPTextModel (no ``text_model`` child), but every kohya file and
    # every consumer expects ``lora_te_text_model_encoder_...``; keep the old names either way.
    return path if path.startswith("text_model.") else f"text_model.{path}"


SD_UNET = TargetSpec("lora_unet", ("Transformer2DModel",), ("ResnetBlock2D", "Downsample2D", "Upsample2D"))
# SDXL: the same targets, named with the original SGM blocks that SDXL LoRA files use (sgm_names.py).
SDXL_UNET = dataclasses.replace(SD_UNET, rename=sgm_renamer(SDXL_LAYOUT))
CLIP_TEXT = TargetSpec("lora_te", ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"), rename=_clip_text_model_path)
CAUSAL_LM = TargetSpec("lora_unet", (), all_linear=True, skip_output_layer=True)


def is_causal_lm(model: object) -> bool:
    """A transformers model with an output embedding (a diffusers UNet has none)."""
    return callable(getattr(model, "get_output_embeddings", None)) and hasattr(model, "config")


def sdxl_unet_spec(unet: object) -> TargetSpec:
    """``SDXL_UNET`` with the SGM numbering derived from this UNet's own block layout."""
    return dataclasses.replace(SD_UNET, rename=sgm_renamer(UNetLayout.from_config(unet.config)))


def unet_spec_for(model: object, base: TargetSpec, target_modules: Sequence[str] | None = None,
                  from_weights: bool = False) -> TargetSpec:
    """The spec for the model passed as ``unet``: ``CAUSAL_LM`` for a causal LM, SGM names for an
    SDXL UNet given the SD spec (``sdxl_unet_spec``), else ``base``.

    ``target_modules`` narrows it (and admits ``lm_head`` when listed); ``from_weights``: a saved
    file decides which modules it holds, so the output layer is a candidate too.
    """
    spec = CAUSAL_LM if is_causal_lm(model) else base
    if spec == SD_UNET and is_sdxl_unet(model):
        spec = sdxl_unet_spec(model)
    if target_modules:
        spec = dataclasses.replace(spec, target_modules=tuple(target_modules), skip_output_layer=False)
    if from_weights:
        spec = dataclasses.replace(spec, skip_output_layer=False)
    return spec


def text_encoder_specs(count: int, base: TargetSpec = CLIP_TEXT) -> list[TargetSpec]:
    """One encoder keeps ``lora_te``; two (SDXL) become ``lora_te1`` and ``lora_te2``."""
    if count <= 1:
        return [base] * count
    return [base.with_prefix(f"{base.prefix}{i + 1}") for i in range(count)]


@dataclass(frozen=True)
class Target:
    """One module that gets a LoRA."""

    lora_name: str
    path: str
    module: nn.Module
    is_kxk_conv: bool  # a conv LoRA (conv_dim / conv_alpha) rather than a plain one


def _is_kxk_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


def _matches(path: str, names: tuple[str, ...]) -> bool:
    return any(path == name or path.endswith("." + name) for name in names)


def _all_linear(root: nn.Module, skip_output_layer: bool) -> Iterator[tuple[str, nn.Module]]:
    output = root.get_output_embeddings() if skip_output_layer and is_causal_lm(root) else None
    for path, module in root.named_modules():
        if is_linear_like(module) and module is not output:
            yield path, module


def _candidates(root: nn.Module, classes: tuple[str, ...]) -> Iterator[tuple[str, nn.Module]]:
    for path, module in root.named_modules():
        if type(module).__name__ not in classes:
            continue
        for child_path, child in module.named_modules():
            if isinstance(child, nn.Linear) or (isinstance(child, nn.Conv2d) and child.groups == 1):
                yield (f"{path}.{child_path}" if path else child_path).strip("."), child


def find_targets(root: nn.Module, spec: TargetSpec, include_conv: bool) -> list[Target]:
    """Every LoRA target of ``root`` under ``spec``, in module order.

    ``include_conv``: also search ``conv_module_classes`` and take kxk convs (LoCon). A module
    reached twice (nested target classes) is listed once; two different modules whose names
    collide after ``.`` → ``_`` are an error, since their keys would overwrite each other.
    """
    classes = spec.module_classes + (spec.conv_module_classes if include_conv else ())
    by_name: dict[str, Target] = {}
    found = _all_linear(root, spec.skip_output_layer) if spec.all_linear else _candidates(root, classes)
    for path, module in found:
        if spec.target_modules is not None and not _matches(path, spec.target_modules):
            continue
        is_kxk = _is_kxk_conv(module)
        if is_kxk and not include_conv:
            continue
        name = spec.lora_name(path)
        seen = by_name.get(name)
        if seen is not None:
            if seen.module is module:
                continue
            raise ValueError(f"two modules share the LoRA name {name}: '{seen.path}' and '{path}'")
        by_name[name] = Target(name, path, module, is_kxk)
    return list(by_name.values())


# --- the kohya file format: <lora_name>.lora_down.weight / .lora_up.weight / .alpha ------------


def format_keys(keys: Sequence[str], limit: int = 5) -> str:
    """A short bracketed list of keys for error messages."""
    shown = ", ".join(keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}]"


def ranks_from_weights(weights_sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, int], dict[str, float]]:
    """(lora_name → dim, lora_name → alpha) read from a kohya state dict; other key kinds are refused."""
    dims: dict[str, int] = {}
    alphas: dict[str, float] = {}
    unknown = []
    for key, value in weights_sd.items():
        name, _, kind = key.partition(".")
        if kind == "lora_down.weight":
            dims[name] = value.shape[0]
        elif kind == "alpha":
            alphas[name] = float(value)
        elif kind != "lora_up.weight":
            unknown.append(key)
    if unknown:
        raise UserError(
            f"not a kohya LoRA file: unexpected keys {format_keys(sorted(unknown))} "
            "(LyCORIS/LoHa/DoRA files need their own --network_module)"
        )
    return dims, alphas


def shape_mismatch(loaded: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> str | None:
    """What differs in shape between a loaded kohya state dict and a network's (same keys), with the fix."""
    wrong = [k for k, v in loaded.items() if tuple(v.shape) != tuple(own[k].shape)]
    if not wrong:
        return None
    ranks = sorted({int(loaded[k].shape[0]) for k in wrong if k.endswith(".lora_down.weight")})
    mine = sorted({int(own[k].shape[0]) for k in wrong if k.endswith(".lora_down.weight")})
    rank_note = (f" The file has rank {', '.join(map(str, ranks))} where this network has "
                 f"{', '.join(map(str, mine))}: pass --dim_from_weights (or the file's --network_dim / conv_dim)."
                 if ranks and ranks != mine else
                 " The ranks agree, so the layers themselves differ: the file is for a model of another "
                 "architecture or size (SD 2.x's linear projections against SD 1.x's 1x1 convolutions, or other "
                 "widths); give the model it was trained on." if ranks else "")
    return (f"{len(wrong)} tensors have other shapes, e.g. {wrong[0]} {tuple(loaded[wrong[0]].shape)} vs "
            f"{tuple(own[wrong[0]].shape)}." + rank_note)


def input_embedding_weight(root: nn.Module) -> torch.Tensor | None:
    """The input embedding matrix of a transformers model (None for anything else)."""
    get = getattr(root, "get_input_embeddings", None)
    try:
        embedding = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None
    return getattr(embedding, "weight", None)
