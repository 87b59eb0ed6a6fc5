"""diffusers UNet module paths → the original SGM/LDM names that SDXL LoRA files use.

kohya trains SDXL on a UNet with the original Stability (SGM) layout, so every SDXL LoRA in the
wild, and every consumer (ComfyUI, A1111/Forge, diffusers' ``load_lora_weights``), names the UNet
modules that way. The two layouts differ only in how blocks are numbered and in a few names
inside ResNet and resampling blocks:

=====================================  =========================================
diffusers                              SGM
=====================================  =========================================
conv_in                                input_blocks.0.0
down_blocks.i.resnets.j                input_blocks.k.0   (k counts layers)
down_blocks.i.attentions.j             input_blocks.k.1
down_blocks.i.downsamplers.0           input_blocks.k.0   (its ``conv`` is ``op``)
mid_block.resnets.0 / attentions.0     middle_block.0 / middle_block.1
mid_block.resnets.1                    middle_block.2
up_blocks.i.resnets.j                  output_blocks.k.0
up_blocks.i.attentions.j               output_blocks.k.1
up_blocks.i.upsamplers.0               output_blocks.k.2 (k.1 without attention)
resnet conv1 / conv2                   in_layers.2 / out_layers.3
resnet time_emb_proj / conv_shortcut   emb_layers.1 / skip_connection
=====================================  =========================================

``k`` runs over the layers of all down (up) blocks in order: a down block contributes one index
per ResNet and one for its downsampler; an up block one per ResNet, its upsampler sharing the
last one. Inside transformer blocks the names agree (``transformer_blocks.0.attn1.to_q``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# Names inside one block that differ between the layouts (diffusers → SGM).
RESNET_NAMES: dict[str, str] = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
DOWNSAMPLER_NAMES: dict[str, str] = {"conv": "op"}
TOP_LEVEL_NAMES: dict[str, str] = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


@dataclass(frozen=True)
class UNetLayout:
    """The block structure that decides SGM numbering.

    down_layers: ResNets per down block; down_attention / up_attention: whether each down / up
    block has transformer blocks; mid_attention: whether the middle block has one.
    """

    down_layers: tuple[int, ...]
    down_attention: tuple[bool, ...]
    up_attention: tuple[bool, ...]
    mid_attention: bool = True

    @staticmethod
    def from_config(config: Mapping[str, Any] | Any) -> UNetLayout:
        """The layout of a diffusers ``UNet2DConditionModel`` config (a dict or the config object)."""
        get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
        down_types = tuple(get("down_block_types"))
        layers = get("layers_per_block", 2)
        down_layers = tuple(layers) if isinstance(layers, Sequence) else (int(layers),) * len(down_types)
        mid_type = get("mid_block_type", "UNetMidBlock2DCrossAttn") or ""
        return UNetLayout(
            down_layers=down_layers,
            down_attention=tuple("CrossAttn" in t for t in down_types),
            up_attention=tuple("CrossAttn" in t for t in get("up_block_types")),
            mid_attention="CrossAttn" in mid_type,
        )


# SDXL base 1.0 (and the tiny test model, which keeps its numbering for its two levels).
SDXL_LAYOUT = UNetLayout(down_layers=(2, 2, 2), down_attention=(False, True, True), up_attention=(True, True, False))


def block_table(layout: UNetLayout) -> dict[str, tuple[str, Mapping[str, str]]]:
    """diffusers block path → (SGM block path, renames of the names inside that block)."""
    table: dict[str, tuple[str, Mapping[str, str]]] = {}
    index = 1  # input_blocks.0 is conv_in
    last_down = len(layout.down_layers) - 1
    for i, (count, attention) in enumerate(zip(layout.down_layers, layout.down_attention, strict=True)):
        for j in range(count):
            table[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{index}.0", RESNET_NAMES)
            if attention:
                table[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{index}.1", {})
            index += 1
        if i != last_down:
            table[f"down_blocks.{i}.downsamplers.0"] = (f"input_blocks.{index}.0", DOWNSAMPLER_NAMES)
            index += 1
    table["mid_block.resnets.0"] = ("middle_block.0", RESNET_NAMES)
    if layout.mid_attention:
        table["mid_block.attentions.0"] = ("middle_block.1", {})
    table["mid_block.resnets.1"] = (f"middle_block.{2 if layout.mid_attention else 1}", RESNET_NAMES)
    index = 0
    up_layers = [n + 1 for n in reversed(layout.down_layers)]
    last_up = len(up_layers) - 1
    for i, (count, attention) in enumerate(zip(up_layers, layout.up_attention, strict=True)):
        for j in range(count):
            table[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{index}.0", RESNET_NAMES)
            if attention:
                table[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{index}.1", {})
            index += 1
        if i != last_up:  # the upsampler follows the ResNet (and attention) of the block's last layer
            table[f"up_blocks.{i}.upsamplers.0"] = (f"output_blocks.{index - 1}.{2 if attention else 1}", {})
    return table


def _rename_inner(rest: str, names: Mapping[str, str]) -> str:
    head, dot, tail = rest.partition(".")
    return names.get(head, head) + dot + tail if head else rest


def to_sgm(path: str, table: Mapping[str, tuple[str, Mapping[str, str]]]) -> str:
    """The SGM path of a diffusers module path; a path outside the mapped blocks is an error."""
    for top, sgm in TOP_LEVEL_NAMES.items():
        if path == top or path.startswith(top + "."):
            return sgm + path[len(top):]
    parts = path.split(".")
    for length in (4, 3):  # "down_blocks.1.attentions.0" / "mid_block.resnets.0"
        block = ".".join(parts[:length])
        if block in table:
            sgm, names = table[block]
            rest = ".".join(parts[length:])
            return f"{sgm}.{_rename_inner(rest, names)}" if rest else sgm
    raise ValueError(f"no SGM name for the UNet module path '{path}'")


def sgm_renamer(layout: UNetLayout = SDXL_LAYOUT) -> Callable[[str], str]:
    """A ``TargetSpec.rename`` hook: diffusers path → SGM path for a UNet of ``layout``."""
    table = block_table(layout)
    return lambda path: to_sgm(path, table)


def is_sdxl_unet(model: object) -> bool:
    """A diffusers UNet with SDXL's size and pooled-text conditioning (``addition_embed_type = text_time``)."""
    config = getattr(model, "config", None)
    return getattr(config, "addition_embed_type", None) == "text_time" and hasattr(config, "down_block_types")


def from_sgm(path: str, table: Mapping[str, tuple[str, Mapping[str, str]]]) -> str:
    """The inverse of :func:`to_sgm`: an SGM module path back to the diffusers one (unknown paths unchanged)."""
    for top, sgm in TOP_LEVEL_NAMES.items():
        if path == sgm or path.startswith(sgm + "."):
            return top + path[len(sgm):]
    inverse = {sgm: (block, names) for block, (sgm, names) in table.items()}
    parts = path.split(".")
    for length in (3, 2):  # "input_blocks.4.1" / "middle_block.1"
        sgm = ".".join(parts[:length])
        if sgm in inverse:
            block, names = inverse[sgm]
            rest = ".".join(parts[length:])
            for diffusers_name, sgm_name in names.items():
                if rest == sgm_name or rest.startswith(sgm_name + "."):
                    rest = diffusers_name + rest[len(sgm_name):]
                    break
            return f"{block}.{rest}" if rest else block
    return path
