"""Block-wise learning rates: sd-scripts' ``down_lr_weight``, ``mid_lr_weight``, ``up_lr_weight`` and
``block_lr_zero_threshold`` (``--network_args``) for the UNet LoRA modules of networks.lora.

Every UNet LoRA module learns at ``unet_lr × its block's weight`` (LoRA+ up matrices: × the ratio too);
text-encoder modules are unaffected. The blocks are those of block_dims (networks/block_dims.py), found
by each module's original SGM block number: ``down_lr_weight[k]`` is input block k (IN00 is conv_in,
which has no LoRA), ``mid_lr_weight`` the middle block, ``up_lr_weight[k]`` output block k.

* SD 1.x/2.x: 12 down, 1 middle, 12 up weights. This is exactly sd-scripts' assignment
  (``get_block_index``: ``down_blocks.i.{resnets,attentions}.j`` → down 3i+j+1, ``downsamplers`` →
  3i+3, ``up_blocks.i.{resnets,attentions}.j`` → up 3i+j, ``upsamplers`` → up 3i+2, mid_block → mid).
* SDXL: 9 down, 1 middle, 9 up (input_blocks.k → down k, output_blocks.k → up k, as sd-scripts).
* ``mid_lr_weight`` may also hold three numbers, one per middle_block.0 / .1 / .2 (sd-scripts' SDXL
  form); one number weights the whole middle block (sd-scripts on SDXL would pad it to ``w,1,1``).
* Other layouts (the tiny test UNets) follow the same SGM numbering, with their own block counts.

A down/up weight is comma-separated numbers, one number, or a preset ``name[+offset]`` computed over the n blocks
of that side with ``t = i / (n - 1)``, i = 0..n-1: ``linear`` t, ``reverse_linear`` the same reversed,
``sine`` sin(π·t/2), ``cosine`` the sine list reversed, ``zeros`` 0 — each plus the offset. Fewer numbers
than blocks: the rest are 1.0 and a warning says so (as sd-scripts). More numbers than blocks, or an
empty entry (sd-scripts reads it as 0, so a stray comma silently drops a block), are errors. A single
number is the weight of every block of that side (sd-scripts logs it as an unknown preset and uses 1.0).
A block whose weight is ≤ ``block_lr_zero_threshold`` (default 0, so 0 and negative weights too) gets
no LoRA modules at all, as in sd-scripts.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from library.errors import UserError, did_you_mean
from networks.block_dims import Rank, block_counts, block_rank_fn
from networks.sgm_names import UNetLayout, block_table, to_sgm
from networks.targets import Target

logger = logging.getLogger(__name__)

PRESETS = ("sine", "cosine", "linear", "reverse_linear", "zeros")
DIM_KEYS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")
LR_KEYS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold")
BLOCK_KEYS = DIM_KEYS + LR_KEYS


@dataclass(frozen=True)
class Preset:
    """A named weight curve over the blocks of one side, plus ``offset`` on every weight."""

    name: str
    offset: float = 0.0

    def weights(self, n: int) -> list[float]:
        return preset_weights(self.name, n, self.offset)


LrWeights = tuple[float, ...] | Preset | float  # per-block numbers, a preset, or one number for every block


def preset_weights(name: str, n: int, offset: float = 0.0) -> list[float]:
    """The n weights of a preset, in sd-scripts' arithmetic (so the numbers are the same to the last bit)."""
    ramp = [i / max(n - 1, 1) for i in range(n)]
    sine = [math.sin(math.pi * t / 2) for t in ramp]
    curves = {"linear": ramp, "reverse_linear": ramp[::-1], "sine": sine, "cosine": sine[::-1], "zeros": [0.0] * n}
    return [w + offset for w in curves[name]]


def _number(text: str, key: str, value: object) -> float:
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise UserError(f"--network_args {key}={value!r}: '{text.strip()}' is not a number")
    return number


def _numbers(value: object, key: str) -> tuple[float, ...]:
    entries = str(value).split(",")
    for position, entry in enumerate(entries, 1):
        if not entry.strip():
            raise UserError(f"--network_args {key}={value!r}: entry {position} is empty; write 0 for a block "
                            "without LoRA (sd-scripts reads an empty entry as 0)")
    return tuple(_number(entry, key, value) for entry in entries)


def parse_lr_weights(value: object, key: str) -> LrWeights:
    """``down_lr_weight`` / ``up_lr_weight``: numbers (one per block), one number (all) or ``preset[+offset]``."""
    text = str(value).strip()
    if "," in text:
        return _numbers(text, key)
    try:
        float(text)
    except ValueError:
        pass
    else:  # one number: every block of that side (sd-scripts logs it as an unknown preset and uses 1.0)
        return _number(text, key, value)
    name, plus, offset = text.partition("+")
    if name.strip() not in PRESETS:
        raise UserError(f"--network_args {key}={value!r}: unknown preset '{name.strip()}'"
                        f"{did_you_mean(name.strip(), PRESETS)}; expected comma-separated numbers or one of "
                        f"{', '.join(PRESETS)}, optionally followed by +number (e.g. cosine+0.5)")
    return Preset(name.strip(), _number(offset, key, value) if plus else 0.0)


def parse_mid_lr_weight(value: object, key: str = "mid_lr_weight") -> tuple[float, ...]:
    """``mid_lr_weight``: one number, or three (middle_block.0, .1, .2)."""
    numbers = _numbers(str(value).strip(), key)
    if len(numbers) not in (1, 3):
        raise UserError(f"--network_args {key}={value!r}: expected one number for the middle block "
                        f"(or three, one per middle_block.0/.1/.2 as sd-scripts' SDXL form), got {len(numbers)}")
    return numbers


def _resolve(weights: LrWeights | None, n: int, key: str, layout_text: str) -> list[float]:
    if weights is None:
        return [1.0] * n
    if isinstance(weights, float):
        return [weights] * n
    if isinstance(weights, Preset):
        return weights.weights(n)
    values = list(weights)
    if len(values) > n:
        side = "input" if key.startswith("down") else "output"
        raise UserError(f"--network_args {key}: {len(values)} weights given, this UNet has {n} {side} blocks "
                        f"({layout_text}; the first weight is for {side} block 00)")
    if len(values) < n:
        logger.warning("--network_args %s: %d weights for %d blocks; the last %d blocks get 1.0 (as sd-scripts)",
                       key, len(values), n, n - len(values))
        values += [1.0] * (n - len(values))
    return values


class BlockRanks:
    """The ``block_ranks`` hook of LoRANetwork: (dim, alpha) per UNet target, None to leave it out.

    ``include_conv``: whether ResNet / resampler blocks are searched at all (conv_dim or
    conv_block_dims given). As in sd-scripts, block settings alone do not add LoRA to the ResNets'
    ``time_emb_proj`` / ``conv_shortcut``: the module set stays that of the plain network.
    """

    def __init__(self, ranks: Callable[[Target], Rank | None], include_conv: bool) -> None:
        self._ranks, self.include_conv = ranks, include_conv

    def __call__(self, target: Target) -> Rank | None:
        return self._ranks(target)


class BlockLr(BlockRanks):
    """The ``block_ranks`` hook of a network with block learning rates (see the module docstring).

    It leaves out the modules of blocks whose weight is at or below the threshold and records, for
    every module it lets through, its block label and weight in ``lr_blocks`` (read by param_groups).
    """

    def __init__(self, layout: UNetLayout, ranks: BlockRanks, down: Sequence[float],
                 mid: Sequence[float], up: Sequence[float], threshold: float) -> None:
        super().__init__(ranks, ranks.include_conv)
        self._table = block_table(layout)
        self.down, self.mid, self.up, self.threshold = list(down), list(mid), list(up), threshold
        self.lr_blocks: dict[str, tuple[str, float]] = {}  # lora_name -> (block label, weight)

    def block(self, sgm_path: str) -> tuple[str, float]:
        """(label, weight) of a module by its SGM path; ("", 1.0) outside the numbered blocks."""
        head, _, rest = sgm_path.partition(".")
        number = rest.split(".")[0]
        if head == "input_blocks":
            return f"IN{int(number):02d}", self.down[int(number)]
        if head == "output_blocks":
            return f"OUT{int(number):02d}", self.up[int(number)]
        if head == "middle_block":
            return ("MID", self.mid[0]) if len(self.mid) == 1 else (f"MID{number}", self.mid[int(number)])
        return "", 1.0

    def __call__(self, target: Target) -> Rank | None:
        rank = self._ranks(target)
        if rank is None:
            return None
        label, weight = self.block(to_sgm(target.path, self._table))
        if label and weight <= self.threshold:
            return None
        self.lr_blocks[target.lora_name] = (label or "other", weight)
        return rank


def block_plan(unet: nn.Module | None, alpha_of: Callable[[float | None, int], float | None], dim: int,
               alpha: float | None, conv_dim: int | None, conv_alpha: float | None,
               block_dims: Sequence[int] | None, block_alphas: Sequence[float] | None,
               conv_block_dims: Sequence[int] | None, conv_block_alphas: Sequence[float] | None,
               down_lr_weight: LrWeights | None, mid_lr_weight: Sequence[float] | None, up_lr_weight: LrWeights | None,
               block_lr_zero_threshold: float | None) -> BlockRanks | None:
    """The ``block_ranks`` hook for these block settings (values in BLOCK_KEYS order), or None without any.

    ``alpha_of(alpha, dim)`` is the alpha to store for a module (rsLoRA folds its sqrt into it).
    """
    given = dict(zip(BLOCK_KEYS, (block_dims, block_alphas, conv_block_dims, conv_block_alphas, down_lr_weight,
                                  mid_lr_weight, up_lr_weight, block_lr_zero_threshold), strict=True))
    lr_given = any(given[k] is not None for k in LR_KEYS[:3])
    if block_lr_zero_threshold is not None and not lr_given:
        logger.warning("--network_args block_lr_zero_threshold does nothing without down/mid/up_lr_weight")
    if unet is None or not (lr_given or any(given[k] is not None for k in DIM_KEYS)):
        return None
    layout = _unet_layout(unet, [k for k, v in given.items() if v is not None])
    if alpha is None:
        from networks.lora import DEFAULT_ALPHA  # lora imports this module: import at call time

        alpha = DEFAULT_ALPHA
    ranks = BlockRanks(block_rank_fn(unet, dim, alpha, conv_dim, conv_alpha, block_dims, block_alphas,
                                     conv_block_dims, conv_block_alphas, alpha_of),
                       include_conv=bool(conv_dim) or conv_block_dims is not None)
    if not lr_given:
        return ranks
    n_in, n_out = block_counts(layout)
    text = f"{n_in} input, 1 middle, {n_out} output blocks"
    down = _resolve(down_lr_weight, n_in, "down_lr_weight", text)
    up = _resolve(up_lr_weight, n_out, "up_lr_weight", text)
    mid = list(mid_lr_weight) if mid_lr_weight is not None else [1.0]
    threshold = block_lr_zero_threshold or 0.0
    dropped = [f"IN{i:02d}" for i, w in enumerate(down) if w <= threshold] + \
        [f"MID{i if len(mid) > 1 else ''}" for i, w in enumerate(mid) if w <= threshold] + \
        [f"OUT{i:02d}" for i, w in enumerate(up) if w <= threshold]
    logger.info("block lr weights: down %s, mid %s, up %s%s", down, mid, up,
                f"; no LoRA in {', '.join(dropped)} (weight <= {threshold})" if dropped else "")
    return BlockLr(layout, ranks, down, mid, up, threshold)


def _unet_layout(unet: nn.Module, keys: Sequence[str]) -> UNetLayout:
    config = getattr(unet, "config", None)
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    if config is None or get("down_block_types") is None:
        raise UserError(f"--network_args {', '.join(keys)}: block settings apply to a diffusion UNet "
                        f"(SD 1.x/2.x, SDXL), not to {type(unet).__name__}")
    return UNetLayout.from_config(config)


def reject_for_weights(*values: object) -> None:
    """create_network_from_weights (values in LR_KEYS order): block learning rates are refused, not ignored."""
    keys = [key for key, value in zip(LR_KEYS[:3], values[:3], strict=True) if value is not None]
    if keys:
        raise UserError(f"--network_args {', '.join(keys)}: not supported with --dim_from_weights (the file "
                        "decides the modules); leave --dim_from_weights out to train with block learning rates")


def block_lr_groups(network: Any) -> list[tuple[str, float, list[Any]]] | None:
    """The UNet modules grouped by block, ``(label, weight, loras)`` in module order; None without block lr."""
    lr_blocks = getattr(getattr(network, "_block_ranks", None), "lr_blocks", None)
    if lr_blocks is None:
        return None
    groups: dict[str, tuple[float, list[Any]]] = {}
    for lora in network.unet_loras:
        label, weight = lr_blocks.get(lora.lora_name, ("other", 1.0))
        groups.setdefault(label, (weight, []))[1].append(lora)
    return [(label, weight, loras) for label, (weight, loras) in groups.items()]
