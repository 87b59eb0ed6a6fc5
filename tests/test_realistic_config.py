"""A realistic sd-scripts-style setup trains unchanged: several datasets, class_tokens-only and
regularisation subsets, a fine-tuning subset with a metadata JSON, mixed aspect ratios."""

from __future__ import annotations

import json

from PIL import Image

import train_network


def _images(folder, sizes, captions: bool, colour: int):
    folder.mkdir(parents=True)
    for i, size in enumerate(sizes):
        Image.new("RGB", size, (colour, 20 * i % 255, 90)).save(folder / f"{folder.name}_{i}.png")
        if captions:
            (folder / f"{folder.name}_{i}.txt").write_text(f"sks, character, pose {i}")
    return folder


def test_sd_scripts_style_toml_trains_and_reports_buckets(tmp_path, tiny_sd_dir, capsys):
    char = _images(tmp_path / "char", [(64, 64), (96, 64), (64, 96)] * 2, captions=True, colour=200)
    style = _images(tmp_path / "style", [(96, 64)] * 3, captions=False, colour=40)
    reg = _images(tmp_path / "reg", [(64, 64)] * 4, captions=False, colour=120)
    ft = _images(tmp_path / "ft", [(64, 96), (96, 64)], captions=False, colour=10)
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"ft_0": {"caption": "a photo", "tags": "red, blue"}, "ft_1": {"tags": "green"}}))
    data = tmp_path / "dataset.toml"
    data.write_text(f"""
[general]
enable_bucket = true
min_bucket_reso = 32
max_bucket_reso = 128
bucket_reso_steps = 16
caption_extension = ".txt"
shuffle_caption = true
keep_tokens = 1

[[datasets]]
resolution = 64
batch_size = 2

  [[datasets.subsets]]
  image_dir = "{char}"
  num_repeats = 2

  [[datasets.subsets]]
  image_dir = "{style}"
  class_tokens = "sks style"

  [[datasets.subsets]]
  image_dir = "{reg}"
  class_tokens = "a person"
  is_reg = true

[[datasets]]
resolution = [64, 64]
batch_size = 2

  [[datasets.subsets]]
  image_dir = "{ft}"
  metadata_file = "{meta}"
  num_repeats = 3
""")
    train = tmp_path / "train.toml"
    train.write_text(f"""
[model]
pretrained_model_name_or_path = "{tiny_sd_dir}"
[network]
network_module = "networks.lora"
network_dim = 4
network_alpha = 1
[optimisation]
optimizer_type = "AdamW8bit"
learning_rate = 1e-3
lr_scheduler = "cosine_with_restarts"
lr_warmup_steps = 0.1
max_train_epochs = 1
prior_loss_weight = 0.5
seed = 11
[saving]
output_dir = "{tmp_path / 'out'}"
output_name = "realistic"
save_model_as = "safetensors"
""")
    assert train_network.main(["--config_file", str(train), "--dataset_config", str(data)]) == 0
    out = capsys.readouterr().out
    # aspect-ratio buckets within the 64x64 area: portrait, square and landscape images apart
    assert "bucket 48x80: 4 samples" in out and "bucket 64x64: 19 samples" in out and "bucket 80x48: 7 samples" in out
    assert "4 regularisation images" in out and "class_tokens 'sks style'" in out
    assert "2 training images x 3 repeats" in out  # the fine-tuning subset from the metadata JSON
    assert (tmp_path / "out" / "realistic.safetensors").is_file()
