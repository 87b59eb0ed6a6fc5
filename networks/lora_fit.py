"""A LoRA state dict checked against the network it is about to load into (``LoRANetwork.load_weights``).

The errors name the file and say what differs (keys, or one shape with the fix) instead of torch's list.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch

from library.errors import UserError
from networks.targets import format_keys, shape_mismatch

logger = logging.getLogger(__name__)


def fit_to_network(file: str | os.PathLike, weights_sd: Mapping[str, torch.Tensor],
                   expected: Mapping[str, torch.Tensor], dropped: set[str],
                   block_lr: bool) -> dict[str, torch.Tensor]:
    """``weights_sd`` less the modules of ``dropped`` (the part this run does not train), after checking that
    the rest has exactly the keys and shapes of ``expected`` (the network's state dict); a UserError otherwise.
    ``block_lr``: the network has block learning-rate weights, which can leave blocks without modules."""
    # Parts the user chose not to train (--network_train_*_only) are skipped, as in sd-scripts.
    ignored = sorted({k.partition(".")[0] for k in weights_sd if k.partition(".")[0] in dropped})
    if ignored:
        # A warning, not a note: the files this run writes will not hold these modules, so a LoRA continued
        # for its UNet only loses its text-encoder half (the trigger word then works worse).
        logger.warning("%s: %d modules (e.g. %s) belong to the part this run does not train "
                       "(--network_train_unet_only / --network_train_text_encoder_only); they are left out of "
                       "the files this run writes. To keep them unchanged, train both parts and set that "
                       "part's learning rate to 0 (--text_encoder_lr 0 or --unet_lr 0) instead.",
                       file, len(ignored), ignored[0])
    kept = {k: v for k, v in weights_sd.items() if k.partition(".")[0] not in dropped}
    unexpected = sorted(set(kept) - set(expected))
    missing = sorted(set(expected) - set(kept))
    if unexpected or missing:
        raise UserError(
            f"{file} does not match this network: {len(unexpected)} unexpected keys {format_keys(unexpected)}, "
            f"{len(missing)} missing keys {format_keys(missing)}. "
            "Was it trained with another dim/conv_dim, model or --network_train_*_only setting?"
            " (--dim_from_weights takes the ranks from the file)"
            + (" With down/mid/up_lr_weight, blocks weighted at or below block_lr_zero_threshold get no"
               " LoRA modules, so a file that has them cannot load: raise those weights above the threshold."
               if block_lr and unexpected else "")
        )
    if wrong := shape_mismatch(kept, expected):  # one line with the fix, not torch's list
        raise UserError(f"{file} does not match this network: {wrong}")
    return kept
