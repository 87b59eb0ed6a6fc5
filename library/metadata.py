"""Metadata written into LoRA files: ``ss_*`` training keys, SAI ModelSpec keys, ``sshs`` hashes.

Every value is a string (safetensors metadata is ``dict[str, str]``). The key names and the hash
definitions are the ones A1111/Forge, ComfyUI and civitai read (KOHYA_COMPAT.md §4).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import struct
from collections.abc import Mapping
from pathlib import Path

import torch

from library.errors import UserError, did_you_mean

# sd-scripts' base model versions → ModelSpec architecture names (without the adapter suffix).
MODELSPEC_ARCHITECTURES: dict[str, str] = {
    "sd_v1": "stable-diffusion-v1",
    "sd_v2": "stable-diffusion-v2-512",
    "sd_v2_v": "stable-diffusion-v2-768-v",
    "sdxl_base_v1-0": "stable-diffusion-xl-v1-base",
}
MODELSPEC_VERSION = "1.0.1"
PREDICTION_TYPES = ("epsilon", "v")

# The legacy hash reads 64 KiB at 1 MiB into the serialised file (A1111's old "short hash").
_LEGACY_OFFSET = 0x100000
_LEGACY_LENGTH = 0x10000


def _serialise_for_hash(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> bytes:
    from safetensors.torch import save

    # The hashes are defined on the file as serialised with only the ss_* keys, so adding
    # modelspec keys or the hashes themselves afterwards does not change them.
    ss_only = {k: str(v) for k, v in (metadata or {}).items() if k.startswith("ss_")}
    return save(dict(tensors), metadata=ss_only)


def compute_sshs_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> tuple[str, str]:
    """(``sshs_model_hash``, ``sshs_legacy_hash``) of ``tensors`` saved with the ``ss_*`` metadata.

    model hash: SHA-256 hex of everything after the 8-byte little-endian header length and the
    JSON header, i.e. of the tensor bytes alone. legacy hash: the first 8 hex characters of the
    SHA-256 of the 0x10000 bytes at offset 0x100000 of the serialisation; for files smaller than
    that the slice is short or empty (an empty slice hashes to ``e3b0c442``), as in the definition.
    """
    data = _serialise_for_hash(tensors, metadata)
    (header_len,) = struct.unpack("<Q", data[:8])
    model_hash = hashlib.sha256(data[8 + header_len :]).hexdigest()
    legacy_hash = hashlib.sha256(data[_LEGACY_OFFSET : _LEGACY_OFFSET + _LEGACY_LENGTH]).hexdigest()[:8]
    return model_hash, legacy_hash


def add_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``metadata`` with ``sshs_model_hash`` and ``sshs_legacy_hash`` added."""
    model_hash, legacy_hash = compute_sshs_hashes(tensors, metadata)
    return {**metadata, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash}


def rehash_file(path: str | Path) -> bool:
    """Set a LoRA file's ``sshs_*`` hashes to the ones defined above when they differ (another package's network
    writes its own, e.g. LyCORIS's ``0x``-prefixed hash of other bytes); True when the file was rewritten."""
    from safetensors import safe_open

    from library.fileio import atomic_save_safetensors

    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    fixed = add_hashes(tensors, metadata)
    if fixed == metadata:
        return False
    atomic_save_safetensors(tensors, path, fixed)
    return True


def checkpoint_hashes(path: str | Path) -> tuple[str, str]:
    """(A1111's legacy model hash, the file's full SHA-256) of a checkpoint file, as sd-scripts records them in
    ``ss_sd_model_hash`` / ``ss_new_sd_model_hash`` (and the VAE's): the legacy one is the first 8 hex digits of
    the SHA-256 of the 64 KiB at offset 1 MiB, the new one the whole file's, read in 1 MiB blocks."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        legacy = hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
        f.seek(0)
        full = hashlib.sha256()
        for block in iter(lambda: f.read(1 << 20), b""):
            full.update(block)
    return legacy, full.hexdigest()


def to_metadata_value(value: object) -> str:
    """A metadata string: JSON for dicts/lists, ``str`` for scalars, "None" for None (as sd-scripts)."""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    return str(value)


def stringify(metadata: Mapping[str, object]) -> dict[str, str]:
    """All values converted with :func:`to_metadata_value`."""
    return {k: to_metadata_value(v) for k, v in metadata.items()}


def modelspec_architecture(base_model_version: str, adapter: str | None = "lora") -> str:
    """``sd_v1`` → ``stable-diffusion-v1/lora`` (``adapter=None`` gives the bare model name)."""
    try:
        arch = MODELSPEC_ARCHITECTURES[base_model_version]
    except KeyError:
        hint = did_you_mean(base_model_version, MODELSPEC_ARCHITECTURES)
        raise UserError(
            f"unknown base model version '{base_model_version}'{hint}; "
            f"expected one of {', '.join(MODELSPEC_ARCHITECTURES)}"
        ) from None
    return f"{arch}/{adapter}" if adapter else arch


SGM_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"


def modelspec_metadata(
    architecture: str,
    title: str,
    resolution: tuple[int, int],
    prediction_type: str | None,
    implementation: str | None = None,
    date: str | None = None,
    description: str | None = None,
    author: str | None = None,
    license: str | None = None,
    tags: str | None = None,
) -> dict[str, str]:
    """The SAI ModelSpec keys. ``resolution`` is (width, height); ``date`` defaults to now (UTC, ISO)."""
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise UserError(f"prediction type must be one of {PREDICTION_TYPES}, not '{prediction_type}'")
    width, height = resolution
    if date is None:
        date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    spec = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": architecture,
        # as sd-scripts: SDXL files name Stability's reference code, the others diffusers
        "modelspec.implementation": implementation or (
            SGM_IMPLEMENTATION if architecture.startswith("stable-diffusion-xl") else "diffusers"),
        "modelspec.title": title,
        "modelspec.resolution": f"{int(width)}x{int(height)}",
        "modelspec.date": date,
    }
    if prediction_type is not None:  # None: a model without a diffusion target (an LLM)
        spec["modelspec.prediction_type"] = prediction_type
    optional = {"description": description, "author": author, "license": license, "tags": tags}
    spec.update({f"modelspec.{k}": v for k, v in optional.items() if v is not None})
    return spec


def minimal_metadata(
    base_model_version: str,
    network_module: str,
    network_dim: int,
    network_alpha: float,
    network_args: Mapping[str, object] | None = None,
    *,
    v2: bool | None = None,
) -> dict[str, str]:
    """The keys kept with ``--no_metadata`` (sd-scripts' minimum): v2, model version, module, dim, alpha, args.

    ``ss_v2`` is among them because A1111/Forge take a file for SD2 only when it is "True". ``v2=None``
    derives it from ``base_model_version``, which must then be a known SD version (a typo in a tool's
    argument is caught here); a trainer passes the ``v2`` of the model it loaded, so its own version
    names (an LLM's "llm") need no entry in MODELSPEC_ARCHITECTURES.
    """
    if v2 is None:
        if base_model_version not in MODELSPEC_ARCHITECTURES:
            modelspec_architecture(base_model_version)  # raises the helpful error
        v2 = base_model_version.startswith("sd_v2")
    return {
        "ss_v2": str(bool(v2)),
        "ss_base_model_version": base_model_version,
        "ss_network_module": network_module,
        "ss_network_dim": str(network_dim),
        "ss_network_alpha": str(network_alpha),
        "ss_network_args": json.dumps({k: str(v) for k, v in (network_args or {}).items()}),
    }
