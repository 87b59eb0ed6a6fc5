"""``--network_args`` of networks.lora: "key=value" strings from the command line, typed and checked."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial

from library.errors import UserError, did_you_mean
from networks.block_lr import parse_lr_weights, parse_mid_lr_weight


def _positive_int(value: str) -> int:
    if int(value) < 1:
        raise ValueError("must be at least 1")
    return int(value)


def _positive_float(value: str) -> float:
    if float(value) <= 0:
        raise ValueError("must be > 0")
    return float(value)


def _int_list(value: str) -> list[int]:
    values = [int(v) for v in str(value).split(",") if v.strip()]
    if any(v < 0 for v in values):
        raise ValueError("dims must be >= 0")
    return values


def _float_list(value: str) -> list[float]:
    return [float(v) for v in str(value).split(",") if v.strip()]


def _non_negative_float(value: str) -> float:
    if not 0.0 <= float(value) < float("inf"):
        raise ValueError("must be >= 0")
    return float(value)


def _probability(value: str) -> float:
    if not 0.0 <= float(value) < 1.0:
        raise ValueError("must be in [0, 1)")
    return float(value)


def _flag(value: str) -> bool:
    text = str(value).strip().lower()
    if text not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError("must be true or false")
    return text in ("true", "1", "yes")


def _names(value: str) -> tuple[str, ...] | None:
    # PEFT's list spelling "[q_proj, v_proj]" and quotes are accepted; "all-linear" (PEFT's) is the default anyway
    names = tuple(n.strip().strip("'\"") for n in str(value).strip().strip("[]").split(",") if n.strip())
    if not names:
        raise ValueError("must name at least one module")
    if names == ("all-linear",):
        return None
    return names


_LR_WEIGHTS = ("comma-separated numbers, one per UNet %s block (12 for SD 1.x/2.x, 9 for SDXL), one number for "
               "all of them, or a preset sine, cosine, linear, reverse_linear or zeros, optionally +number")

# key → (parser, what it expects). A later option (block_dims, loraplus_lr_ratio, ...) is one more row.
NETWORK_ARGS: dict[str, tuple[Callable[[str], object], str]] = {
    "conv_dim": (_positive_int, "an integer >= 1"),
    "conv_alpha": (float, "a number"),
    "rank_dropout": (_probability, "a probability in [0, 1)"),
    "module_dropout": (_probability, "a probability in [0, 1)"),
    "target_modules": (_names, "comma-separated module names, e.g. q_proj,k_proj,v_proj,o_proj"),
    "use_rslora": (_flag, "true or false (scale = alpha / sqrt(dim) instead of alpha / dim)"),
    "use_dora": (_flag, "true or false (weight-decomposed LoRA)"),
    "block_dims": (_int_list, "comma-separated integers, one per UNet block (25 for SD1/2, 19 for SDXL)"),
    "block_alphas": (_float_list, "comma-separated numbers, one per UNet block"),
    "conv_block_dims": (_int_list, "comma-separated integers, one per UNet block"),
    "conv_block_alphas": (_float_list, "comma-separated numbers, one per UNet block"),
    "loraplus_lr_ratio": (_positive_float, "a number > 0 (LoRA+: lora_up learns this many times faster)"),
    "loraplus_unet_lr_ratio": (_positive_float, "a number > 0 (LoRA+ ratio for the UNet / model only)"),
    "loraplus_text_encoder_lr_ratio": (_positive_float, "a number > 0 (LoRA+ ratio for the text encoders only)"),
    # block learning rates (networks/block_lr.py); these parsers raise their own, more precise UserErrors
    "down_lr_weight": (partial(parse_lr_weights, key="down_lr_weight"), _LR_WEIGHTS % "input"),
    "mid_lr_weight": (parse_mid_lr_weight, "one number (the middle block's weight), or three (middle_block.0/.1/.2)"),
    "up_lr_weight": (partial(parse_lr_weights, key="up_lr_weight"), _LR_WEIGHTS % "output"),
    "block_lr_zero_threshold": (_non_negative_float, "a number >= 0 (blocks weighted at or below it get no LoRA)"),
}


# PEFT LoraConfig names users bring, and where the same setting lives here.
PEFT_NAMES = {
    "lora_dropout": "PEFT's name; here the dropout on the LoRA's hidden state is --network_dropout 0.05 (what PEFT "
                    "export writes as lora_dropout), rank_dropout / module_dropout drop whole ranks / modules",
    "r": "PEFT's name; the rank here is --network_dim",
    "lora_alpha": "PEFT's name; alpha here is --network_alpha",
}


def parse_network_args(network_args: Mapping[str, object]) -> dict[str, object]:
    """Typed values of ``--network_args``; unknown keys and unparsable values raise UserError."""
    parsed: dict[str, object] = {}
    for key, value in network_args.items():
        if key in PEFT_NAMES:
            raise UserError(f"--network_args {key}: {PEFT_NAMES[key]}")
        if key not in NETWORK_ARGS:
            raise UserError(
                f"unknown --network_args key '{key}'{did_you_mean(key, NETWORK_ARGS)}; "
                f"networks.lora accepts: {', '.join(NETWORK_ARGS)}"
            )
        parser, expected = NETWORK_ARGS[key]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
            parsed[key] = None
            continue
        try:
            parsed[key] = parser(value.strip() if isinstance(value, str) else value)
        except (TypeError, ValueError):
            raise UserError(f"--network_args {key}={value!r}: expected {expected}") from None
    return parsed


