"""LoRA file metadata: sshs hashes checked against the written bytes, ModelSpec and minimal keys."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import safetensors
import safetensors.torch
import torch

from library import metadata as md
from library.errors import UserError
from library.tiny_models import tiny_unet
from networks import lora

EMPTY_SHA256_PREFIX = "e3b0c442"  # sha256 of zero bytes


def tensor_bytes_of_file(path) -> bytes:
    """Everything after the 8-byte little-endian header length and the JSON header, read independently."""
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    json.loads(data[8 : 8 + header_len])  # really is the header
    return data[8 + header_len :]


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


def test_stored_model_hash_matches_file_bytes(unet, tmp_path):
    network = lora.create_network(1.0, 4, 1.0, None, None, unet)
    meta = {"ss_network_dim": "4", "ss_output_name": "x"}
    meta.update(md.modelspec_metadata("stable-diffusion-v1/lora", "x", (512, 512), "epsilon", date="2024-01-01"))
    path = tmp_path / "x.safetensors"
    network.save_weights(path, torch.float16, meta)

    with safetensors.safe_open(path, "pt") as f:
        stored = f.metadata()
    assert stored["sshs_model_hash"] == hashlib.sha256(tensor_bytes_of_file(path)).hexdigest()
    # A LoRA this small ends before 0x100000: the legacy slice is empty by definition.
    assert stored["sshs_legacy_hash"] == EMPTY_SHA256_PREFIX
    assert stored["modelspec.title"] == "x" and stored["ss_network_dim"] == "4"


def test_hashes_ignore_non_ss_metadata():
    tensors = {"a": torch.arange(10, dtype=torch.float32)}
    base = md.compute_sshs_hashes(tensors, {"ss_x": "1"})
    assert md.compute_sshs_hashes(tensors, {"ss_x": "1", "modelspec.title": "t"}) == base
    # The model hash covers the tensor bytes only; changing the tensors changes it.
    assert md.compute_sshs_hashes(tensors, {"ss_x": "2"})[0] == base[0]
    assert md.compute_sshs_hashes({"a": torch.arange(1, 11, dtype=torch.float32)}, {"ss_x": "1"})[0] != base[0]


def test_legacy_hash_on_large_tensor_dict(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {"big": torch.randn(400_000, generator=gen), "small": torch.randn(3, generator=gen)}
    meta = {"ss_network_dim": "8", "modelspec.title": "ignored"}
    model_hash, legacy_hash = md.compute_sshs_hashes(tensors, meta)

    # Independent: the file written with only the ss_* keys, read back as bytes.
    path = tmp_path / "big.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata={"ss_network_dim": "8"})
    data = path.read_bytes()
    assert len(data) > 0x110000
    assert legacy_hash == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert legacy_hash != EMPTY_SHA256_PREFIX
    (header_len,) = struct.unpack("<Q", data[:8])
    assert model_hash == hashlib.sha256(data[8 + header_len :]).hexdigest()


def test_add_hashes_returns_a_new_dict():
    meta = {"ss_a": "1"}
    out = md.add_hashes({"t": torch.ones(2)}, meta)
    assert meta == {"ss_a": "1"}
    assert set(out) == {"ss_a", "sshs_model_hash", "sshs_legacy_hash"}
    assert len(out["sshs_model_hash"]) == 64 and len(out["sshs_legacy_hash"]) == 8


def test_modelspec_keys_and_values():
    spec = md.modelspec_metadata(
        md.modelspec_architecture("sd_v2_v"), "my lora", (768, 512), "v", date="2024-05-06T07:08:09", author="me"
    )
    assert spec == {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": "stable-diffusion-v2-768-v/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": "my lora",
        "modelspec.resolution": "768x512",
        "modelspec.date": "2024-05-06T07:08:09",
        "modelspec.prediction_type": "v",
        "modelspec.author": "me",
    }
    assert all(isinstance(v, str) for v in md.modelspec_metadata("a", "t", (1, 1), "epsilon").values())
    with pytest.raises(UserError):
        md.modelspec_metadata("a", "t", (1, 1), "sample")


@pytest.mark.parametrize(
    "version, expected",
    [
        ("sd_v1", "stable-diffusion-v1/lora"),
        ("sd_v2", "stable-diffusion-v2-512/lora"),
        ("sd_v2_v", "stable-diffusion-v2-768-v/lora"),
        ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"),
    ],
)
def test_modelspec_architecture(version, expected):
    assert md.modelspec_architecture(version) == expected


def test_unknown_base_model_version_suggests():
    with pytest.raises(UserError, match="did you mean 'sd_v1'"):
        md.modelspec_architecture("sd_v1.5")


def test_minimal_metadata():
    meta = md.minimal_metadata("sd_v2", "networks.lora", 8, 4.0, {"conv_dim": "4"})
    assert meta == {
        "ss_v2": "True",
        "ss_base_model_version": "sd_v2",
        "ss_network_module": "networks.lora",
        "ss_network_dim": "8",
        "ss_network_alpha": "4.0",
        "ss_network_args": '{"conv_dim": "4"}',
    }


def test_stringify():
    assert md.stringify({"a": 1, "b": None, "c": {"x": [1]}, "d": "s"}) == {
        "a": "1", "b": "None", "c": '{"x": [1]}', "d": "s",
    }  # fmt: skip
