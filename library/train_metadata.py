"""The ``ss_*`` training metadata stored in every LoRA file (KOHYA_COMPAT.md §4).

Values are all strings, as safetensors metadata requires and as kohya tools read them.
The sshs_* hashes and modelspec.* keys are added by library/metadata.py.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from library.metadata import minimal_metadata


@dataclass
class RunInfo:
    """Facts about the run that the metadata records; filled once at start-up."""

    network_module: str
    network_dim: int | str  # "Dynamic" when the modules' ranks differ (sd-scripts' resize writes the same)
    network_alpha: float | str
    network_args: dict[str, str]
    base_model_version: str
    output_name: str
    learning_rate: float
    unet_lr: float | None
    text_encoder_lr: float | None
    num_train_images: int
    num_reg_images: int
    num_batches_per_epoch: int
    num_epochs: int
    max_train_steps: int
    lr_scheduler: str
    lr_warmup_steps: int
    optimizer: str
    mixed_precision: str
    seed: int
    gradient_accumulation_steps: int
    total_batch_size: int
    noise_offset: float | None
    min_snr_gamma: float | None
    clip_skip: int | None
    prior_loss_weight: float
    v2: bool
    v_parameterization: bool
    resolution: tuple[int, int]
    model_name: str
    training_comment: str | None
    model_card: dict[str, str] = field(default_factory=dict)  # --metadata_title etc., set ones only
    file_hashes: dict[str, str] = field(default_factory=dict)  # ss_sd_model_hash ... of single-file model / VAE
    datasets: list[dict[str, Any]] = field(default_factory=list)
    switches: dict[str, Any] = field(default_factory=dict)  # SWITCHES: argument name -> value
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)
    # --base_weights merged before training: [{"name", "multiplier"}]; sd-scripts records none, so a LoRA trained
    # on top of them would not say what it needs underneath
    base_weights: list[dict[str, Any]] = field(default_factory=list)
    session_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    training_started_at: float = field(default_factory=time.time)


# Training switches sd-scripts records as ``ss_<argument name>`` (one renamed), so tools that show a LoRA's
# training settings (A1111 / Forge's metadata view, Civitai) find them where they look. Those this toolkit
# has no argument for (face_crop_aug_range) read as None, i.e. "None": not used.
_RECORDED = ("max_grad_norm", "network_dropout", "multires_noise_iterations", "multires_noise_discount",
             "zero_terminal_snr", "debiased_estimation_loss", "noise_offset_random_strength", "ip_noise_gamma",
             "ip_noise_gamma_random_strength", "loss_type", "huber_schedule", "huber_scale", "huber_c",
             "scale_weight_norms", "max_token_length", "cache_latents", "gradient_checkpointing", "full_bf16",
             "full_fp16", "fp8_base", "max_train_epochs", "min_timestep", "max_timestep",
             "scale_v_pred_loss_like_noise_pred", "adaptive_noise_scale", "face_crop_aug_range", "masked_loss")
# Arguments read but never written as given: they are paths, and metadata holds no absolute paths.
# vae becomes ss_vae_name (its basename, as sd-scripts); train_data_dir marks sd-scripts' legacy layout.
_PATH_ARGUMENTS = ("vae", "train_data_dir")
SWITCHES = _RECORDED + _PATH_ARGUMENTS  # the arguments run_info reads into RunInfo.switches
_SWITCH_KEYS = {"debiased_estimation_loss": "ss_debiased_estimation"}
# Caption settings sd-scripts records as flat keys (the command line's; here the subsets' own values).
_CAPTION_KEYS = ("caption_dropout_rate", "caption_tag_dropout_rate", "caption_dropout_every_n_epochs")
# The legacy layout's flat keys that sd-scripts takes from the command line: one value for every subset.
_LEGACY_SUBSET_KEYS = ("color_aug", "flip_aug", "random_crop", "shuffle_caption", "keep_tokens")


# Keys of diffusion training that say nothing about an LLM run (base_model_version "llm"): its image-only
# arguments are refused, so these would only record defaults of settings that do not exist for it.
_DIFFUSION_ONLY_KEYS = frozenset({
    "ss_v2", "ss_v_parameterization", "ss_text_encoder_lr", "ss_num_reg_images", "ss_noise_offset",
    "ss_min_snr_gamma", "ss_clip_skip", "ss_prior_loss_weight", "ss_tag_frequency", "ss_multires_noise_iterations",
    "ss_multires_noise_discount", "ss_zero_terminal_snr", "ss_debiased_estimation", "ss_noise_offset_random_strength",
    "ss_ip_noise_gamma", "ss_ip_noise_gamma_random_strength", "ss_huber_schedule", "ss_huber_scale", "ss_huber_c",
    "ss_max_token_length", "ss_cache_latents", "ss_min_timestep", "ss_max_timestep",
    "ss_scale_v_pred_loss_like_noise_pred", "ss_adaptive_noise_scale", "ss_face_crop_aug_range", "ss_masked_loss",
})


def _s(value: Any) -> str:
    return "None" if value is None else str(value)


def ranks_of_modules(loras: list[Any]) -> tuple[int | str, float | str, dict[str, str]] | None:
    """(dim, alpha, conv network_args) of a network as its modules are, or None when they carry no ranks.

    For a network shaped by a file (``--dim_from_weights``) the command line's ``--network_dim`` /
    ``--network_alpha`` say nothing; sd-scripts records them anyway. A value that differs between modules is
    "Dynamic", as sd-scripts' resize records ranks it chose per module. kxk conv modules give ``conv_dim`` /
    ``conv_alpha``, which is where a kohya network keeps them.
    """
    linear: list[tuple[int, float]] = []
    conv: list[tuple[int, float]] = []
    for lora in loras:
        dim, alpha = getattr(lora, "lora_dim", None), getattr(lora, "alpha", None)
        if not isinstance(dim, int) or alpha is None:
            return None  # another package's module: its own attributes, nothing to read here
        kernel = getattr(getattr(lora, "lora_down", None), "kernel_size", (1, 1))
        (conv if tuple(kernel) != (1, 1) else linear).append((dim, float(alpha)))

    def one(values: set) -> Any:
        return next(iter(values)) if len(values) == 1 else "Dynamic"

    if not linear:
        return None
    dim, alpha = one({d for d, _ in linear}), one({a for _, a in linear})
    conv_args = {"conv_dim": str(one({d for d, _ in conv})), "conv_alpha": str(one({a for _, a in conv}))} \
        if conv else {}
    return dim, alpha, conv_args


def training_metadata(info: RunInfo, epoch: int, step: int) -> dict[str, str]:
    """All ss_* keys for a file saved at ``epoch`` / ``step`` (an LLM's without the diffusion-only ones)."""
    metadata = {
        "ss_session_id": info.session_id,
        "ss_training_started_at": _s(info.training_started_at),
        "ss_training_finished_at": _s(time.time()),
        "ss_output_name": info.output_name,
        "ss_network_module": info.network_module,
        "ss_network_dim": _s(info.network_dim),
        "ss_network_alpha": _s(info.network_alpha),
        "ss_network_args": json.dumps(info.network_args),
        "ss_base_model_version": info.base_model_version,
        "ss_sd_model_name": info.model_name,
        "ss_v2": _s(info.v2),
        "ss_v_parameterization": _s(info.v_parameterization),
        "ss_learning_rate": _s(info.learning_rate),
        "ss_unet_lr": _s(info.unet_lr),
        "ss_text_encoder_lr": _s(info.text_encoder_lr),
        "ss_num_train_images": _s(info.num_train_images),
        "ss_num_reg_images": _s(info.num_reg_images),
        "ss_num_batches_per_epoch": _s(info.num_batches_per_epoch),
        "ss_num_epochs": _s(info.num_epochs),
        "ss_epoch": _s(epoch),
        "ss_steps": _s(step),
        "ss_max_train_steps": _s(info.max_train_steps),
        "ss_lr_scheduler": info.lr_scheduler,
        "ss_lr_warmup_steps": _s(info.lr_warmup_steps),
        "ss_optimizer": info.optimizer,
        "ss_mixed_precision": info.mixed_precision,
        "ss_seed": _s(info.seed),
        "ss_gradient_accumulation_steps": _s(info.gradient_accumulation_steps),
        "ss_total_batch_size": _s(info.total_batch_size),
        "ss_noise_offset": _s(info.noise_offset),
        "ss_min_snr_gamma": _s(info.min_snr_gamma),
        "ss_clip_skip": _s(info.clip_skip),
        "ss_prior_loss_weight": _s(info.prior_loss_weight),
        "ss_resolution": f"({info.resolution[0]}, {info.resolution[1]})",
        "ss_datasets": json.dumps(info.datasets),
        "ss_tag_frequency": json.dumps(info.tag_frequency),
        "ss_training_comment": _s(info.training_comment),
        **{_SWITCH_KEYS.get(name, f"ss_{name}"): _s(value) for name, value in info.switches.items()
           if name not in _PATH_ARGUMENTS},
        **_vae_name(info.switches.get("vae")),
        **dataset_keys(info.datasets, legacy=info.switches.get("train_data_dir") is not None),
        **({"ss_base_weights": json.dumps(info.base_weights)} if info.base_weights else {}),
        **info.file_hashes,
    }
    if info.base_model_version == "llm":
        metadata = {k: v for k, v in metadata.items() if k not in _DIFFUSION_ONLY_KEYS}
    return metadata


def file_hashes(model: str, vae: str | None) -> dict[str, str]:
    """``ss_sd_model_hash`` / ``ss_new_sd_model_hash`` (and ``ss_vae_hash`` / ``ss_new_vae_hash``) for a model
    (VAE) given as one file, as sd-scripts writes them: tools that find a LoRA's base model by its hash (A1111's
    model hash, Civitai) look there. A diffusers folder has no file hash, so nothing is written for one."""
    from library.metadata import checkpoint_hashes

    hashes: dict[str, str] = {}
    for path, name in ((model, "sd_model"), (vae, "vae")):
        if path and Path(path).is_file():
            hashes[f"ss_{name}_hash"], hashes[f"ss_new_{name}_hash"] = checkpoint_hashes(path)
    return hashes


def _vae_name(vae: Any) -> dict[str, str]:
    # only when a separate VAE was given, as sd-scripts; its folder or file name, never its path (split on
    # both separators, so a Windows path stays out even when read on Linux)
    return {} if vae is None else {"ss_vae_name": re.split(r"[\\/]", str(vae).rstrip("/\\"))[-1]}


def _common(subsets: list[dict[str, Any]], key: str) -> tuple[bool, Any]:
    """(True, value) when every subset has the same ``key``, (False, None) when they differ."""
    values = {json.dumps(s.get(key)) for s in subsets}
    return (True, subsets[0].get(key)) if len(values) == 1 else (False, None)


def dataset_dirs(datasets: list[dict[str, Any]]) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    """(ss_dataset_dirs, ss_reg_dataset_dirs): folder (or metadata file) name -> {"n_repeats", "img_count"}.

    A1111 sums ``img_count`` for a LoRA's "Dataset size". A name used twice gets " (2)", " (3)", ... as in
    sd-scripts, so no subset's count is lost.
    """
    dirs: dict[str, dict[str, int]] = {}
    reg_dirs: dict[str, dict[str, int]] = {}
    for dataset in datasets:
        for subset in dataset.get("subsets", []):
            name = subset.get("metadata_file") or subset.get("image_dir")
            if "img_count" not in subset or not name:
                continue  # a text subset, or a fine-tuning subset with neither name
            target = reg_dirs if subset.get("is_reg") else dirs
            key, n = name, 2
            while key in target:
                key, n = f"{name} ({n})", n + 1
            target[key] = {"n_repeats": subset["num_repeats"], "img_count": subset["img_count"]}
    return dirs, reg_dirs


def dataset_keys(datasets: list[dict[str, Any]], legacy: bool) -> dict[str, str]:
    """The keys sd-scripts derives from the image datasets: dataset folders, caption dropout and, for the
    legacy ``--train_data_dir`` layout (one dataset), its settings as flat keys. None for text runs."""
    images = [d for d in datasets if "bucket_info" in d]
    if not images:
        return {}
    dirs, reg_dirs = dataset_dirs(images)
    subsets = [s for d in images for s in d["subsets"]]
    out = {"ss_dataset_dirs": json.dumps(dirs), "ss_reg_dataset_dirs": json.dumps(reg_dirs)}
    for key in _CAPTION_KEYS:
        same, value = _common(subsets, key)
        if same:  # subsets of a TOML that differ have no one value to record; ss_datasets lists theirs
            out[f"ss_{key}"] = _s(value)
    if legacy and len(images) == 1:
        (dataset,) = images
        out.update({
            "ss_batch_size_per_device": _s(dataset["batch_size_per_device"]),
            "ss_enable_bucket": _s(dataset["enable_bucket"]),
            "ss_bucket_no_upscale": _s(dataset["bucket_no_upscale"]),
            "ss_min_bucket_reso": _s(dataset["min_bucket_reso"]),
            "ss_max_bucket_reso": _s(dataset["max_bucket_reso"]),
            "ss_bucket_info": json.dumps(dataset["bucket_info"]),
        })
        for key in _LEGACY_SUBSET_KEYS:
            same, value = _common(subsets, key)
            if same:  # always: the legacy layout builds every subset from the same command line
                out[f"ss_{key}"] = _s(value)
    return out


def minimal_training_metadata(info: RunInfo) -> dict[str, str]:
    """--no_metadata: only what a loader needs to interpret the file (sd-scripts' minimum keys)."""
    return minimal_metadata(info.base_model_version, info.network_module, info.network_dim, info.network_alpha,
                            info.network_args, v2=info.v2)
