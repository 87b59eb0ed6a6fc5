"""Real sd-scripts dataset configs: JSON files, every key of its schema, image_dir at the N_name
parent folder, skip_image_resolution, and bucket errors that name where each value was set."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from PIL import Image

from library.data.images import ImageCaptionDataset
from library.dataset_config import DatasetDefaults, config_from_train_data_dir, load_dataset_config
from library.errors import UserError


def write(tmp_path: Path, text: str, name: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path, **cli) -> str:
    with pytest.raises(UserError) as info:
        load_dataset_config(path, DatasetDefaults(**cli))
    return str(info.value)


def images(folder: Path, *sizes: tuple[int, int]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, size in enumerate(sizes):
        Image.new("RGB", size, (i * 40, 90, 200)).save(folder / f"im{i}.png")
        (folder / f"im{i}.txt").write_text(f"caption {i}", encoding="utf-8")
    return folder


# --- JSON dataset configs --------------------------------------------------------------------

JSON_CONFIG = """{"general": {"shuffle_caption": true, "caption_extension": ".txt"},
 "datasets": [{"resolution": [64, 48], "batch_size": 2,
   "subsets": [{"image_dir": "a", "num_repeats": 2},
               {"image_dir": "b", "is_reg": true}]}]}
"""


def test_json_dataset_config_reads_like_toml(tmp_path):
    group = load_dataset_config(write(tmp_path, JSON_CONFIG, "data.json"), DatasetDefaults())
    (dataset,) = group.datasets
    a, b = dataset.subsets
    assert (dataset.resolution, dataset.batch_size) == ((64, 48), 2)
    assert (a.image_dir, a.num_repeats, a.shuffle_caption, a.caption_extension) == (Path("a"), 2, True, ".txt")
    assert b.is_reg and b.num_repeats == 1


def test_json_syntax_error_names_line_and_column(tmp_path):
    message = error_of(write(tmp_path, '{"datasets": [\n  {"subsets": [}]\n}', "data.json"))
    assert "data.json: JSON syntax error at line 2, column" in message
    assert "TOML" not in message


def test_json_key_errors_name_key_path_and_line(tmp_path):
    text = JSON_CONFIG.replace('"num_repeats": 2}', '"num_repaets": 2}')
    message = error_of(write(tmp_path, text, "data.json"))
    assert "datasets[0].subsets[0].num_repaets (line 3)" in message and "did you mean 'num_repeats'?" in message
    text = JSON_CONFIG.replace('"is_reg": true', '"is_reg": "yes"')
    message = error_of(write(tmp_path, text, "data.json"))
    assert "datasets[0].subsets[1].is_reg (line 4)" in message and 'got "yes", expected true or false' in message
    message = error_of(write(tmp_path, JSON_CONFIG.replace('"batch_size": 2', '"batch_size": null'), "data.json"))
    assert "datasets[0].batch_size (line 2)" in message and "got null" in message


def test_json_in_a_toml_file_says_so(tmp_path):
    message = error_of(write(tmp_path, JSON_CONFIG, "data.toml"))
    assert "TOML syntax error" in message and "looks like JSON" in message


# --- sd-scripts' schema keys -------------------------------------------------------------------

MINIMAL = '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\n'
# Every key of sd-scripts' config_util.py schema (DreamBooth, fine-tuning, ControlNet) with a valid value.
SD_SCRIPTS_SUBSET_KEYS = {
    "color_aug": "true", "face_crop_aug_range": "[2.0, 4.0]", "flip_aug": "true", "num_repeats": "2",
    "random_crop": "true", "shuffle_caption": "true", "keep_tokens": "1", "keep_tokens_separator": '"|||"',
    "secondary_separator": '";;;"', "caption_separator": '";"', "enable_wildcard": "true", "token_warmup_min": "1",
    "token_warmup_step": "0", "caption_prefix": '"a"', "caption_suffix": '"b"', "custom_attributes": "{}",
    "resize_interpolation": '"lanczos"', "caption_dropout_every_n_epochs": "1", "caption_dropout_rate": "0.1",
    "caption_tag_dropout_rate": "0.1", "caption_extension": '".txt"', "class_tokens": '"sks"', "cache_info": "true",
    "is_reg": "false", "alpha_mask": "true", "conditioning_data_dir": '"masks"',
}  # fmt: skip
SD_SCRIPTS_DATASET_KEYS = {
    "batch_size": "1", "bucket_no_upscale": "true", "bucket_reso_steps": "64", "enable_bucket": "true",
    "max_bucket_reso": "1024", "min_bucket_reso": "256", "validation_seed": "1", "validation_split": "0.1",
    "resolution": "512", "network_multiplier": "1.0", "skip_image_resolution": "256", "debug_dataset": "false",
}  # fmt: skip


@pytest.mark.parametrize(("key", "value"), [*SD_SCRIPTS_SUBSET_KEYS.items(), *SD_SCRIPTS_DATASET_KEYS.items()])
def test_every_sd_scripts_key_is_supported_or_refused_by_name(tmp_path, key, value):
    if key in SD_SCRIPTS_SUBSET_KEYS:
        text = MINIMAL + f"{key} = {value}\n"
    else:
        text = f"[[datasets]]\n{key} = {value}\n[[datasets.subsets]]\nimage_dir = \"x\"\n"
    try:
        load_dataset_config(write(tmp_path, text, "d.toml"), DatasetDefaults())
    except UserError as error:
        assert "not supported by this toolkit" in str(error) and "did you mean" not in str(error)


def test_cache_info_is_accepted_with_a_note_and_still_type_checked(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        group = load_dataset_config(write(tmp_path, "[general]\ncache_info = true\n" + MINIMAL, "d.toml"),
                                    DatasetDefaults())
    assert group.datasets[0].subsets[0].image_dir == Path("x")
    assert any("general.cache_info (line 2)" in r.getMessage() and "ignored" in r.getMessage() for r in caplog.records)
    message = error_of(write(tmp_path, MINIMAL + "cache_info = 1\n", "d.toml"))
    assert "datasets[0].subsets[0].cache_info" in message and "true or false" in message


@pytest.mark.parametrize(("key", "hint"), [("prior_loss_weight", "--prior_loss_weight"),
                                           ("train_batch_size", "batch_size"), ("dataset_repeats", "num_repeats")])
def test_command_line_options_in_a_dataset_config_are_named(tmp_path, key, hint):
    message = error_of(write(tmp_path, f"[general]\n{key} = 1\n" + MINIMAL, "d.toml"))
    assert f"general.{key}" in message and "not a dataset config key" in message and hint in message


def test_skip_image_resolution_skips_images_of_at_most_that_area(tmp_path, caplog):
    folder = images(tmp_path / "imgs", (32, 32), (64, 16), (48, 48), (64, 64))  # areas 1024, 1024, 2304, 4096
    text = f'[general]\nskip_image_resolution = 32\ncaption_extension = ".txt"\nresolution = 64\n' \
           f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{folder.as_posix()}"\n'
    (dataset,) = load_dataset_config(write(tmp_path, text, "d.toml"), DatasetDefaults()).datasets
    assert dataset.skip_image_resolution == (32, 32)
    with caplog.at_level(logging.WARNING):
        data = ImageCaptionDataset(dataset, seed=1)
    assert [r.path.name for r in data.records] == ["im2.png", "im3.png"]
    assert any("skipped 2 image(s)" in r.getMessage() and "im0.png, im1.png" in r.getMessage() for r in caplog.records)
    (everything,) = load_dataset_config(write(tmp_path, text.replace("= 32", "= [64, 64]"), "d.toml"),
                                        DatasetDefaults()).datasets
    with pytest.raises(UserError, match=r"skip_image_resolution = \[64, 64\].*skips them all"):
        ImageCaptionDataset(everything, seed=1)


# --- image_dir at the N_name parent folder ------------------------------------------------------


def test_image_dir_at_the_kohya_parent_folder_says_which_folder_to_name(tmp_path):
    images(tmp_path / "img" / "10_sks dog", (32, 32), (32, 32))
    text = f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{(tmp_path / "img").as_posix()}"\n'
    (dataset,) = load_dataset_config(write(tmp_path, text, "d.toml"), DatasetDefaults()).datasets
    with pytest.raises(UserError) as info:
        ImageCaptionDataset(dataset, seed=1)
    message = str(info.value)
    assert "the folder is empty" not in message and "10_sks dog/ (2 images)" in message
    assert f'image_dir = "{(tmp_path / "img" / "10_sks dog").as_posix()}"' in message
    assert 'num_repeats = 10 and class_tokens = "sks dog"' in message and "--train_data_dir" in message


# --- where a bucket setting came from ----------------------------------------------------------


def test_bucket_error_of_the_folder_layout_names_each_value_source(tmp_path):
    (tmp_path / "train" / "1_x").mkdir(parents=True)
    defaults = DatasetDefaults(train_data_dir=tmp_path / "train", enable_bucket=True, resolution=(64, 64),
                               sources={"resolution": "config file gui.toml", "min_bucket_reso": "default",
                                        "max_bucket_reso": "command line"})
    with pytest.raises(UserError) as info:
        config_from_train_data_dir(defaults)
    message = str(info.value)
    assert message.startswith(f"--train_data_dir {tmp_path / 'train'}: resolution 64x64 is outside")
    assert "resolution is from resolution in the config file gui.toml" in message
    assert "min_bucket_reso from the default of --min_bucket_reso; set min_bucket_reso to 64 or less" in message
    defaults = DatasetDefaults(train_data_dir=tmp_path / "train", enable_bucket=True, min_bucket_reso=512,
                               max_bucket_reso=256, sources={"max_bucket_reso": "command line"})
    with pytest.raises(UserError) as info:
        config_from_train_data_dir(defaults)
    assert "max_bucket_reso from --max_bucket_reso on the command line" in str(info.value)

def test_bucket_error_of_a_dataset_config_names_key_and_line(tmp_path):
    text = "[general]\nenable_bucket = true\nmin_bucket_reso = 128\n" + MINIMAL
    message = error_of(write(tmp_path, text, "d.toml"), resolution=(64, 64))
    assert "resolution 64x64 is outside the bucket range min_bucket_reso=128 .. max_bucket_reso=1024" in message
    assert "resolution is from --resolution on the command line, in --config_file or its default" in message
    assert "min_bucket_reso from general.min_bucket_reso, line 3" in message


def test_the_trainer_passes_where_each_value_came_from(tmp_path, tiny_sd_dir, capsys):
    import train_network
    from library.tiny_models import write_synthetic_images

    write_synthetic_images(tmp_path / "train" / "1_x", count=1, size=64)
    argv = ["--pretrained_model_name_or_path", str(tiny_sd_dir), "--train_data_dir", str(tmp_path / "train"),
            "--caption_extension", ".caption", "--output_dir", str(tmp_path / "out"), "--enable_bucket",
            "--resolution", "64", "--min_bucket_reso", "128"]
    assert train_network.main(argv) == 2
    err = capsys.readouterr().err
    assert "min_bucket_reso from --min_bucket_reso on the command line" in err
    assert "resolution is from --resolution on the command line" in err
