"""Which modules get a LoRA, and what their kohya key names are: architecture differences as data.

kohya's rule: inside every module whose class name is in ``module_classes``, each ``Linear`` and
each 1x1 ``Conv2d`` gets a LoRA. With a ``conv_dim`` (LoCon) the modules in
``conv_module_classes`` are searched too, and their kxk ``Conv2d`` children are also targets.
The key name is ``prefix + "_" + path.replace(".", "_")``, where ``path`` is the module's path
in the model after the optional ``rename`` hook.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from library.errors import UserError


@dataclass(frozen=True)
class TargetSpec:
    """Where LoRAs go in one model and how they are named.

    prefix: key prefix, e.g. ``lora_unet`` or ``lora_te1``.
    module_classes: class names searched for Linear / 1x1 Conv2d children.
    conv_module_classes: class names searched as well when conv LoRAs (``conv_dim``) are on.
    rename: maps a module path of this model to the path used in key names (None = identity);
        used where the file format names modules differently from the in-memory model.
    """

    prefix: str
    module_classes: tuple[str, ...]
    conv_module_classes: tuple[str, ...] = ()
    rename: Callable[[str], str] | None = None

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
CLIP_TEXT = TargetSpec("lora_te", ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"), rename=_clip_text_model_path)


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
    for path, module in _candidates(root, classes):
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
