"""What a resumed run must share with the run that saved the state (CONTRACTS.md §4).

A fingerprint of every setting that changes the training trajectory is stored in the state
folder; on resume the current one is compared and differences are refused unless
``--resume_allow_changes``. Output names, logging, save cadence, sampling and the total
number of steps or epochs are free to change. The dataset settings include the resize filter
(resize_interpolation); ``--base_weights`` (file names and multipliers) is compared when set.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from library.errors import UserError

# Training arguments whose change alters the run (compared by value).
_COMPARED_ARGS = (
    "learning_rate", "unet_lr", "text_encoder_lr", "optimizer_type", "optimizer_args", "lr_scheduler",
    "lr_warmup_steps", "lr_scheduler_num_cycles", "lr_scheduler_power", "max_grad_norm", "network_module",
    "network_dim", "network_alpha", "network_dropout", "network_args", "network_train_unet_only",
    "network_train_text_encoder_only", "noise_offset", "min_snr_gamma", "min_timestep", "max_timestep",
    "loss_type", "huber_c", "prior_loss_weight", "clip_skip", "v_parameterization", "full_bf16",
    "pretrained_model_name_or_path",
)  # fmt: skip
# Added later: stored only when set (huber_schedule: only a non-constant one with a huber loss), so that
# states saved before these arguments existed still resume; a value set on one side only is a difference.
_COMPARED_WHEN_SET = (
    "scale_weight_norms", "stop_text_encoder_training", "ip_noise_gamma", "ip_noise_gamma_random_strength",
    "lr_scheduler_type", "lr_scheduler_args", "loraplus_lr_ratio", "loraplus_unet_lr_ratio",
    "loraplus_text_encoder_lr_ratio",
)  # fmt: skip


# Added later still, with defaults that are not "unset": stored only when changed from these defaults.
_COMPARED_WHEN_CHANGED = {
    "zero_terminal_snr": False, "multires_noise_iterations": None, "multires_noise_discount": 0.3,
    "noise_offset_random_strength": False, "debiased_estimation_loss": False,
    "scale_v_pred_loss_like_noise_pred": False, "max_token_length": None,
    "adaptive_noise_scale": None, "v_pred_like_loss": None, "masked_loss": False, "weighted_captions": False,
    "lr_scheduler_min_lr_ratio": None, "lr_decay_steps": None, "lr_scheduler_timescale": None,
}  # fmt: skip
# Keys a state saved before they existed does not hold: compared only when the saved fingerprint has them.
_NEWER_KEYS = ("dataset settings",)
_DERIVED = ("tag_frequency", "bucket_info")  # dataset metadata the fingerprint leaves out
# Only their product (the samples of one optimizer step) decides what a step trains (library/data/sampler.py).
_STEP_SPLIT = ("batch_size", "processes x accumulation")


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return value.name  # a moved folder is not a change; its content is compared by the data digest
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def dataset_settings(configs: Iterable[Any]) -> list[dict[str, Any]]:
    """Every option of each dataset config and its subsets (captions, augmentation, buckets, sequence layout),
    without the names used in messages and the per-process batch size (compared as samples per step)."""
    def fields(obj: Any, skip: set[str]) -> dict[str, Any]:
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name not in skip}

    return [{**fields(d, {"subsets", "batch_size", "name"}),
             "subsets": [fields(s, {"name"}) for s in d.subsets]} for d in configs]


def data_digest(records: list[tuple[str, int, str]]) -> str:
    """A digest of (image name, file size, caption) for every image, in order."""
    h = hashlib.sha256()
    for name, size, caption in records:
        h.update(f"{name}\0{size}\0{caption}\n".encode())
    return h.hexdigest()[:16]


def training_fingerprint(args: argparse.Namespace, *, seed: int, batch_size: int, num_processes: int,
                         accumulation: int, data: str, datasets: list[dict[str, Any]],
                         settings: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The settings a resume compares, as JSON-serialisable values (``settings``: :func:`dataset_settings`)."""
    fingerprint: dict[str, Any] = {name: getattr(args, name) for name in _COMPARED_ARGS}
    fingerprint.update({name: getattr(args, name) for name in _COMPARED_WHEN_SET if getattr(args, name)})
    fingerprint.update({name: getattr(args, name, default) for name, default in _COMPARED_WHEN_CHANGED.items()
                        if getattr(args, name, default) != default})
    if settings is not None:
        fingerprint["dataset settings"] = settings
    if getattr(args, "base_weights", None):  # the model trained on: which LoRAs were merged into it, and how much
        from library.base_weights import base_weights_metadata

        fingerprint["base_weights"] = base_weights_metadata(args.base_weights, args.base_weights_multiplier)
    if args.loss_type in ("huber", "smooth_l1") and args.huber_schedule != "constant":  # earlier runs: constant
        fingerprint["huber_schedule"] = args.huber_schedule
    if args.loss_type in ("huber", "smooth_l1") and args.huber_scale != 1.0:  # earlier runs: 1
        fingerprint["huber_scale"] = args.huber_scale
    # What the datasets' metadata reports, less what "dataset content" and "dataset settings" already cover (the
    # tag counts and buckets follow from captions, images and bucket options, and would bloat every state).
    datasets = [{k: v for k, v in entry.items() if k not in _DERIVED} for entry in datasets]
    fingerprint.update({
        "seed": seed, "batch_size": batch_size, "processes x accumulation": num_processes * accumulation,
        "dataset content": data, "datasets": datasets,
    })
    return fingerprint


def _drop_newer_fields(saved: list[Any], current: list[Any], only_unset: bool = False) -> None:
    """A state saved by an earlier version reports fewer fields per dataset and subset: compare the shared ones.

    ``only_unset``: drop a newer field only where it is off (False, None, "", 0, []), the default every dataset
    option gets when it is added; one that is on is a real change from the saved run, which could not have it.
    """
    for then, now in zip(saved, current, strict=False):
        if not (isinstance(then, dict) and isinstance(now, dict)):
            continue
        for key in [k for k in now if k not in then and k != "subsets"]:
            if not only_unset or not now[key]:
                now.pop(key)
        if isinstance(then.get("subsets"), list) and isinstance(now.get("subsets"), list):
            _drop_newer_fields(then["subsets"], now["subsets"], only_unset)


def _differences(path: str, then: Any, now: Any) -> list[str]:
    """One line per changed value, named by its place (``dataset settings[0].subsets[1].image_dir``), so a
    changed dataset reads as the field that changed, not as two whole structures."""
    if isinstance(then, dict) and isinstance(now, dict):
        keys = [*now, *(key for key in then if key not in now)]  # a setting only the saved run had too
        return [line for key in keys
                for line in _differences(f"{path}.{key}" if path else str(key), then.get(key), now.get(key))]
    if isinstance(then, list) and isinstance(now, list) and len(then) == len(now) and \
            any(isinstance(v, (dict, list)) for v in [*then, *now]):
        return [line for i, (a, b) in enumerate(zip(then, now, strict=True))
                for line in _differences(f"{path}[{i}]", a, b)]
    return [] if then == now else [f"  {path}: saved {then!r}, now {now!r}"]


def check_resume_compatible(saved: dict[str, Any] | None, current: dict[str, Any], allow_changes: bool,
                            state_dir: str) -> list[str]:
    """Differences as lines; raises UserError for any unless ``allow_changes``."""
    if saved is None:
        return []
    saved, current = copy.deepcopy(saved), copy.deepcopy(current)
    for key in _NEWER_KEYS:
        if key not in saved:
            current.pop(key, None)
    if isinstance(saved.get("datasets"), list) and isinstance(current.get("datasets"), list):
        _drop_newer_fields(saved["datasets"], current["datasets"])
    if isinstance(saved.get("dataset settings"), list) and isinstance(current.get("dataset settings"), list):
        _drop_newer_fields(saved["dataset settings"], current["dataset settings"], only_unset=True)
    if all(key in saved for key in _STEP_SPLIT):
        step_then, step_now = (fp["batch_size"] * fp["processes x accumulation"] for fp in (saved, current))
        if step_then == step_now:  # batch, processes and accumulation may trade places (README, "Steps")
            for fp in (saved, current):
                for key in _STEP_SPLIT:
                    fp.pop(key)
                for entry in fp.get("datasets") or []:
                    entry.pop("batch_size_per_device", None)
    for fp in (saved, current):  # the same model by another path (relative, moved) is no change, as for datasets
        model = fp.get("pretrained_model_name_or_path")
        if isinstance(model, str):
            fp["pretrained_model_name_or_path"] = Path(model).name or model
    lines = _differences("", saved, current)
    if lines and not allow_changes:
        raise UserError(f"--resume {state_dir}: these settings differ from the saved run and would change "
                        "training:\n" + "\n".join(lines) + "\nRestore them, or pass --resume_allow_changes.")
    return lines
