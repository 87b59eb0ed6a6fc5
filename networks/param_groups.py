"""Optimizer parameter groups of a LoRA network: per-part learning rates, freezing and LoRA+."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from library.errors import UserError
from networks.block_lr import block_lr_groups

logger = logging.getLogger(__name__)


def param_groups(network: Any, text_encoder_lr: float | Sequence[float] | None, unet_lr: float | None,
                 default_lr: float | None) -> tuple[list[dict], list[str]]:
    """Parameter groups ``{"params", "lr"}`` and their descriptions ("textencoder", "unet").

    A None rate falls back to ``default_lr``; a rate of 0 freezes that part and leaves its
    group out. ``text_encoder_lr`` may be a sequence (one rate per encoder, SDXL). With a LoRA+
    ratio for a part, its up matrices get their own group at ``lr * ratio``. With block learning
    rates, the UNet gets a group per block ("unet IN01", "unet MID", ...) at ``lr * weight`` (LoRA+
    up matrices: ``lr * weight * ratio``).
    """
    groups: list[dict] = []
    descriptions: list[str] = []
    network._frozen.clear()

    def add(loras: list[Any], lr: float | None, description: str) -> None:
        lr = default_lr if lr is None else lr
        if not loras:
            return
        if lr == 0:
            network._frozen.update(lora.lora_name for lora in loras)
            for lora in loras:
                lora.requires_grad_(False)
            return
        for lora in loras:
            lora.requires_grad_(True)
        ratio = network.loraplus_ratios.get(description.split(" ")[0])
        if not ratio:
            groups.append({"params": [p for lora in loras for p in lora.parameters()], "lr": lr})
            descriptions.append(description)
            return
        # LoRA+ (Hayou et al. 2024): the up (B) matrices learn `ratio` times faster than the rest
        ups = [lora.lora_up.weight for lora in loras]
        up_ids = {id(p) for p in ups}
        groups.extend([{"params": [p for lo in loras for p in lo.parameters() if id(p) not in up_ids], "lr": lr},
                       {"params": ups, "lr": lr * ratio}])
        descriptions.extend([description, f"{description} plus"])

    if isinstance(text_encoder_lr, Sequence):
        text_encoder_lr = _per_encoder(list(text_encoder_lr), len(network._te_prefixes))
    if isinstance(text_encoder_lr, Sequence) and len(text_encoder_lr) > 1:
        for i, (lr, prefix) in enumerate(zip(text_encoder_lr, network._te_prefixes, strict=True)):
            te_loras = [lo for lo in network.text_encoder_loras if lo.lora_name.startswith(prefix)]
            add(te_loras, lr, f"textencoder {i + 1}")
    else:
        if isinstance(text_encoder_lr, Sequence):
            text_encoder_lr = text_encoder_lr[0] if text_encoder_lr else None
        add(network.text_encoder_loras, text_encoder_lr, "textencoder")
    blocks = block_lr_groups(network)
    if blocks is None:
        add(network.unet_loras, unet_lr, "unet")
        return groups, descriptions
    # block learning rates (networks/block_lr.py): one group (LoRA+: two) per UNet block, at lr × its weight
    lr = default_lr if unet_lr is None else unet_lr
    if lr is None and blocks:
        raise UserError("down_lr_weight / mid_lr_weight / up_lr_weight scale the UNet learning rate: "
                        "set --unet_lr or --learning_rate")
    for label, weight, loras in blocks:
        add(loras, lr * weight, f"unet {label}")
    return groups, descriptions


def _per_encoder(lrs: list[float], encoders: int) -> list[float]:
    """``--text_encoder_lr`` values cut to the model's encoders (one value: every encoder).

    kohya_ss GUI v25 writes two values for every model, SD 1.x included; sd-scripts then uses the
    first, so extra values are dropped, with a warning only when they differ from the first.
    """
    if len(lrs) <= 1 or len(lrs) == encoders:
        return lrs
    if len(lrs) < encoders:
        raise UserError(f"--text_encoder_lr {' '.join(map(str, lrs))}: {len(lrs)} learning rates for {encoders} "
                        "text encoders; give one for all or one per encoder.")
    used, extra = lrs[:max(encoders, 1)], lrs[max(encoders, 1):]
    if any(lr != lrs[0] for lr in extra):
        logger.warning("--text_encoder_lr %s: this model has %d text encoder(s); using %s, not %s (as sd-scripts).",
                       " ".join(map(str, lrs)), encoders, " ".join(map(str, used)), " ".join(map(str, extra)))
    return used
