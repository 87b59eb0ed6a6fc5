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


# --- what the trainer writes (library/train_metadata.py, library/run_saver.py) ---------------------------


def _run_info(**changes):
    from library.train_metadata import RunInfo

    values = dict(
        network_module="networks.lora", network_dim=4, network_alpha=1.0, network_args={}, base_model_version="sd_v1",
        output_name="lora", learning_rate=1e-4, unet_lr=None, text_encoder_lr=None, num_train_images=1,
        num_reg_images=0, num_batches_per_epoch=1, num_epochs=1, max_train_steps=1, lr_scheduler="constant",
        lr_warmup_steps=0, optimizer="AdamW", mixed_precision="no", seed=0, gradient_accumulation_steps=1,
        total_batch_size=1, noise_offset=None, min_snr_gamma=None, clip_skip=None, prior_loss_weight=1.0, v2=False,
        v_parameterization=False, resolution=(64, 64), model_name="m", training_comment=None,
    )
    return RunInfo(**{**values, **changes})


def test_minimal_training_metadata_is_sd_scripts_minimum():
    from library.train_metadata import minimal_training_metadata

    meta = minimal_training_metadata(_run_info(v2=True, base_model_version="sd_v2_v", network_args={"a": "1"}))
    # sd-scripts' SS_METADATA_MINIMUM_KEYS; A1111/Forge load a file as SD2 only when ss_v2 is "True"
    assert meta == md.minimal_metadata("sd_v2_v", "networks.lora", 4, 1.0, {"a": "1"})
    assert meta["ss_v2"] == "True"
    # the trainer's own version names need no ModelSpec entry
    assert minimal_training_metadata(_run_info(base_model_version="llm"))["ss_v2"] == "False"


def _images(folder, sizes: list[tuple[int, int]], caption: str = "sks, red, square"):
    from PIL import Image

    folder.mkdir(parents=True)
    for i, size in enumerate(sizes):
        Image.new("RGB", size, (200, 40, 40)).save(folder / f"img_{i}.png")
        (folder / f"img_{i}.caption").write_text(caption, encoding="utf-8")
    return folder


def _train(model, out, *args: str) -> dict[str, str]:
    import train_network

    argv = ["--pretrained_model_name_or_path", str(model), "--output_dir", str(out), "--output_name", "lora",
            "--network_dim", "4", "--max_train_steps", "1", "--seed", "1", "--network_train_unet_only", *args]
    assert train_network.main(argv) == 0
    with safetensors.safe_open(str(out / "lora.safetensors"), "pt") as f:
        return f.metadata()


def test_no_metadata_keeps_ss_v2_and_the_modelspec(tmp_path, tiny_sd_dir, tiny_images):
    data = tmp_path / "data.toml"
    data.write_text(f'[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n  image_dir = "{tiny_images}"\n')
    meta = _train(tiny_sd_dir, tmp_path / "out", "--dataset_config", str(data), "--v2", "--no_metadata")
    assert {k: v for k, v in meta.items() if k.startswith("ss_")} == md.minimal_metadata(
        "sd_v2", "networks.lora", 4, 1.0)
    # as sd-scripts, the ModelSpec keys stay: they describe the file, not the training
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-512/lora"
    assert meta["modelspec.prediction_type"] == "epsilon" and meta["modelspec.resolution"] == "64x64"
    assert meta["modelspec.title"] == "lora" and "sshs_model_hash" in meta


def test_legacy_layout_writes_sd_scripts_flat_keys(tmp_path, tiny_sd_dir):
    train, reg = tmp_path / "train", tmp_path / "reg"
    _images(train / "2_sks", [(64, 64)] * 3 + [(128, 32)])
    _images(train / "1_red", [(64, 64)] * 2)
    _images(reg / "1_thing", [(64, 64)] * 5)
    meta = _train(tiny_sd_dir, tmp_path / "out", "--train_data_dir", str(train), "--reg_data_dir", str(reg),
                  "--resolution", "64", "--train_batch_size", "2", "--enable_bucket", "--min_bucket_reso", "32",
                  "--max_bucket_reso", "128", "--bucket_reso_steps", "32", "--flip_aug", "--shuffle_caption",
                  "--keep_tokens", "1", "--caption_dropout_rate", "0.25", "--vae", str(tiny_sd_dir / "vae"))
    # A1111 sums img_count for "Dataset size"; reg folders are listed apart, as sd-scripts
    assert json.loads(meta["ss_dataset_dirs"]) == {"2_sks": {"n_repeats": 2, "img_count": 4},
                                                   "1_red": {"n_repeats": 1, "img_count": 2}}
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"1_thing": {"n_repeats": 1, "img_count": 5}}
    assert meta["ss_optimizer"] == "torch.optim.adamw.AdamW"  # sd-scripts' form: module path and class
    # the buckets training used: 10 training samples, the reg images balanced to 10 as well
    buckets = json.loads(meta["ss_bucket_info"])["buckets"]
    counts = {tuple(b["resolution"]): b["count"] for b in buckets.values()}
    assert sum(counts.values()) == 20 and counts[(128, 32)] == 2
    expected = {"ss_batch_size_per_device": "2", "ss_enable_bucket": "True", "ss_bucket_no_upscale": "False",
                "ss_min_bucket_reso": "32", "ss_max_bucket_reso": "128", "ss_flip_aug": "True",
                "ss_color_aug": "False", "ss_random_crop": "False", "ss_shuffle_caption": "True",
                "ss_keep_tokens": "1", "ss_caption_dropout_rate": "0.25", "ss_caption_tag_dropout_rate": "0.0",
                "ss_caption_dropout_every_n_epochs": "0", "ss_full_fp16": "False", "ss_face_crop_aug_range": "None",
                "ss_adaptive_noise_scale": "None", "ss_vae_name": "vae"}
    assert {k: meta.get(k) for k in expected} == expected
    assert not any(str(tmp_path) in v for v in meta.values()), "an absolute path is in the metadata"
    assert "ss_vae" not in meta and "ss_train_data_dir" not in meta and "ss_sd_scripts_commit_hash" not in meta


def test_ss_datasets_has_sd_scripts_fields(tmp_path):
    from library.data.image_data import build_image_data
    from library.dataset_config import DatasetConfig, DatasetGroupConfig, SubsetConfig
    from library.train_metadata import training_metadata

    a = _images(tmp_path / "one" / "pics", [(64, 64), (64, 64), (128, 32)])
    b = _images(tmp_path / "two" / "pics", [(64, 64)] * 2, caption="sks, blue")
    subsets = (SubsetConfig(a, num_repeats=3, flip_aug=True, keep_tokens=1, caption_prefix="p",
                            caption_dropout_rate=0.1),
               SubsetConfig(b, shuffle_caption=True, caption_suffix="s", caption_dropout_rate=0.2))
    group = DatasetGroupConfig((DatasetConfig(subsets, resolution=(64, 64), batch_size=1, enable_bucket=True,
                                              min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32),))
    data = build_image_data(group, seed=0, on_bad_image="error", num_processes=1, rank=0, num_workers=0,
                            persistent_workers=False)
    (dataset,) = json.loads(json.dumps(data.metadata()))
    assert dataset["min_bucket_reso"] == 32 and dataset["max_bucket_reso"] == 128 and dataset["is_dreambooth"]
    assert dataset["tag_frequency"] == {"pics": {"sks": 5, "red": 3, "square": 3, "blue": 2}}
    buckets = {tuple(b["resolution"]): b["count"] for b in dataset["bucket_info"]["buckets"].values()}
    assert buckets == {(64, 64): 8, (128, 32): 3}  # samples, repeats included
    assert dataset["bucket_info"]["mean_img_ar_error"] == 0.0
    first, second = dataset["subsets"]
    assert (first["img_count"], first["flip_aug"], first["keep_tokens"], first["caption_prefix"]) == (3, True, 1, "p")
    assert (second["img_count"], second["shuffle_caption"], second["caption_suffix"], second["color_aug"],
            second["random_crop"]) == (2, True, "s", False, False)

    meta = training_metadata(_run_info(datasets=data.metadata()), 1, 1)
    # two folders of one name both count, as sd-scripts numbers them
    assert json.loads(meta["ss_dataset_dirs"]) == {"pics": {"n_repeats": 3, "img_count": 3},
                                                   "pics (2)": {"n_repeats": 1, "img_count": 2}}
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {}
    # the subsets dropped captions at different rates: no single value to record; an agreed one is kept
    assert "ss_caption_dropout_rate" not in meta and meta["ss_caption_tag_dropout_rate"] == "0.0"
    # the flat dataset keys belong to the legacy layout only (sd-scripts writes ss_datasets instead)
    assert "ss_bucket_info" not in meta and "ss_flip_aug" not in meta
    assert json.loads(meta["ss_datasets"])[0]["subsets"][0]["img_count"] == 3


def test_text_runs_get_no_image_dataset_keys():
    from library.train_metadata import training_metadata

    meta = training_metadata(_run_info(datasets=[{"max_seq_length": 8, "subsets": [{"file": "a.jsonl"}]}]), 1, 1)
    assert "ss_dataset_dirs" not in meta and "ss_caption_dropout_rate" not in meta
    assert all(isinstance(v, str) for v in meta.values())


def test_model_card_arguments_fill_the_modelspec(tmp_path, tiny_sd_dir, tiny_images):
    data = tmp_path / "data.toml"
    data.write_text(f'[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n  image_dir = "{tiny_images}"\n')
    card = ["--metadata_title", "Blue Cat", "--metadata_author", "me", "--metadata_description", "a cat, in blue",
            "--metadata_license", "CC-BY-4.0", "--metadata_tags", "cat,blue"]
    for extra in ((), ("--no_metadata",)):  # as sd-scripts, the card is kept with --no_metadata too
        meta = _train(tiny_sd_dir, tmp_path / f"out{len(extra)}", "--dataset_config", str(data), *card, *extra)
        assert (meta["modelspec.title"], meta["modelspec.author"], meta["modelspec.description"]) == (
            "Blue Cat", "me", "a cat, in blue")
        assert (meta["modelspec.license"], meta["modelspec.tags"]) == ("CC-BY-4.0", "cat,blue")
    # empty strings (what the kohya_ss GUI writes for unset fields) mean "not set"
    meta = _train(tiny_sd_dir, tmp_path / "empty", "--dataset_config", str(data), "--metadata_title", "",
                  "--metadata_author", "")
    assert meta["modelspec.title"] == "lora" and "modelspec.author" not in meta


def test_ss_optimizer_names_the_class_path_and_its_arguments_as_sd_scripts():
    import torch

    from library.optim import optimizer_label

    adamw = torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
    assert optimizer_label(adamw, None) == "torch.optim.adamw.AdamW"
    assert optimizer_label(adamw, ["weight_decay=0.05", " betas=0.9,0.99"]) == (
        "torch.optim.adamw.AdamW(weight_decay=0.05,betas=0.9,0.99)")
