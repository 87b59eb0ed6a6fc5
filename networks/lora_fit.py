"""A LoRA state dict checked against the network it is about to load into (``LoRANetwork.load_weights``).

The errors name the file and say what differs (keys, or one shape with the fix) instead of torch's list.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from library.errors import UserError
from networks.targets import TargetSpec, find_targets, format_keys, shape_mismatch

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


def check_all_found(modules_dim: Mapping[str, int], present: Mapping[str, object],
                    roots: Sequence[tuple[nn.Module, TargetSpec]]) -> None:
    """Every module of a file (``modules_dim``) found among the network's (``present``), or a UserError that says
    why not: a target_modules network_arg that leaves them out, or weights of another architecture."""
    # A file for another architecture would otherwise load as a silent no-op.
    prefixes = tuple(spec.prefix + "_" for _, spec in roots)
    missing = [n for n in modules_dim if n not in present and n.startswith(prefixes)]
    if not missing:
        return
    # A target_modules network_arg that leaves out modules of the weights is the user's choice to revisit,
    # not another architecture: the layers are there, the filter excludes them.
    narrowed = [(root, spec) for root, spec in roots if spec.target_modules]
    if narrowed:
        unfiltered = {t.lora_name: t.path for root, spec in narrowed
                      for t in find_targets(root, dataclasses.replace(spec, target_modules=None), True)}
        excluded = [n for n in missing if n in unfiltered]
        if excluded:
            given = ",".join(dict.fromkeys(m for _, spec in narrowed for m in spec.target_modules))
            leaves = sorted({unfiltered[n].rsplit(".", 1)[-1] for n in excluded})
            raise UserError(
                f"--network_args target_modules={given} leaves out {len(excluded)} LoRA modules the weights "
                f"contain ({', '.join(leaves[:6])}{', ...' if len(leaves) > 6 else ''}), e.g. "
                f"{', '.join(excluded[:3])}; leave target_modules out (the weights decide the modules when "
                f"they are loaded with --dim_from_weights) or list those too "
                f"(target_modules={','.join(dict.fromkeys([*given.split(','), *leaves]))})."
            )
    raise UserError(
        f"{len(missing)} LoRA modules in the weights have no matching layer in the model, e.g. "
        f"{', '.join(missing[:5])}; were these weights trained for another model architecture?"
    )
