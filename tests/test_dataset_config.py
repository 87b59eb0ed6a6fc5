"""The dataset TOML schema: precedence, every error message, and the legacy folder layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from library.dataset_config import (
    DatasetDefaults,
    SubsetConfig,
    config_from_train_data_dir,
    load_dataset_config,
    parse_resolution,
)
from library.errors import UserError


def write(tmp_path: Path, text: str, name: str = "dataset.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load(tmp_path: Path, text: str, **cli):
    return load_dataset_config(write(tmp_path, text), DatasetDefaults(**cli))


def error_of(tmp_path: Path, text: str, **cli) -> str:
    with pytest.raises(UserError) as info:
        load(tmp_path, text, **cli)
    return str(info.value)


# --- precedence --------------------------------------------------------------------------

PRECEDENCE = """
[general]
num_repeats = 2
flip_aug = true
resolution = 768
batch_size = 3

[[datasets]]
num_repeats = 3

  [[datasets.subsets]]
  image_dir = "a"
  num_repeats = 4
  flip_aug = false

  [[datasets.subsets]]
  image_dir = "b"

[[datasets]]
resolution = [640, 384]
batch_size = 5

  [[datasets.subsets]]
  image_dir = "c"
"""


def test_subset_beats_dataset_beats_general_beats_cli(tmp_path):
    cli = dict(num_repeats=7, caption_extension=".txt", shuffle_caption=True, resolution=(512, 512), batch_size=1)
    group = load(tmp_path, PRECEDENCE, **cli)
    first, second = group.datasets
    a, b = first.subsets
    (c,) = second.subsets
    assert a.num_repeats == 4  # subset
    assert b.num_repeats == 3  # dataset
    assert c.num_repeats == 2  # general
    assert a.flip_aug is False and b.flip_aug is True  # subset false beats general true
    assert (a.caption_extension, a.shuffle_caption) == (".txt", True)  # from the command line
    assert a.keep_tokens == 0 and a.caption_separator == ","  # built-in defaults
    assert first.resolution == (768, 768) and first.batch_size == 3  # general, int resolution
    assert second.resolution == (640, 384) and second.batch_size == 5  # dataset, [w, h]
    assert a.image_dir == Path("a") and a.name == "datasets[0].subsets[0]"
    assert group.source.endswith("dataset.toml")


def test_cli_values_apply_when_toml_is_silent(tmp_path):
    group = load(
        tmp_path,
        '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\n',
        resolution=(1024, 768),
        enable_bucket=True,
        min_bucket_reso=320,
        flip_aug=True,
    )
    dataset = group.datasets[0]
    assert dataset.resolution == (1024, 768)
    assert dataset.enable_bucket and dataset.min_bucket_reso == 320
    assert dataset.subsets[0].flip_aug is True


def test_caption_extension_gets_its_dot(tmp_path):
    group = load(tmp_path, '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\ncaption_extension = "txt"\n')
    assert group.datasets[0].subsets[0].caption_extension == ".txt"
    assert SubsetConfig(image_dir=Path("x"), caption_extension="caption").caption_extension == ".caption"


def test_caption_options_carry_the_subset_values(tmp_path):
    text = (
        "[general]\nshuffle_caption = true\nkeep_tokens = 2\ncaption_tag_dropout_rate = 0.25\n"
        '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\ncaption_prefix = "photo of"\n'
    )
    options = load(tmp_path, text).datasets[0].subsets[0].caption_options
    assert (options.shuffle, options.keep_tokens, options.tag_dropout_rate, options.prefix) == (
        True,
        2,
        0.25,
        "photo of",
    )


# --- a realistic sd-scripts file ----------------------------------------------------------

SD_SCRIPTS_EXAMPLE = """
[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1

# This is a DreamBooth-style dataset
[[datasets]]
resolution = 512
batch_size = 4
keep_tokens = 2

  [[datasets.subsets]]
  image_dir = 'C:\\hoge'
  class_tokens = 'hoge girl'
  # This subset has keep_tokens = 2 (using the value of the parent datasets)

  [[datasets.subsets]]
  image_dir = 'C:\\fuga'
  class_tokens = 'fuga boy'
  keep_tokens = 3

  [[datasets.subsets]]
  is_reg = true
  image_dir = 'C:\\reg'
  class_tokens = 'human'
  keep_tokens = 1

# This is a fine-tuning dataset
[[datasets]]
resolution = [768, 768]
batch_size = 2
enable_bucket = true
min_bucket_reso = 256
max_bucket_reso = 1024
bucket_reso_steps = 64
bucket_no_upscale = false

  [[datasets.subsets]]
  image_dir = 'C:\\piyo'
  metadata_file = 'C:\\piyo\\piyo_md.json'
  # This subset has keep_tokens = 1 (using [general] value)
"""


def test_sd_scripts_documentation_example(tmp_path):
    dreambooth, finetune = load(tmp_path, SD_SCRIPTS_EXAMPLE).datasets
    assert [s.keep_tokens for s in dreambooth.subsets] == [2, 3, 1]
    assert [s.class_tokens for s in dreambooth.subsets] == ["hoge girl", "fuga boy", "human"]
    assert [s.is_reg for s in dreambooth.subsets] == [False, False, True]
    assert all(s.shuffle_caption and s.caption_extension == ".txt" for s in dreambooth.subsets)
    assert (dreambooth.resolution, dreambooth.batch_size, dreambooth.enable_bucket) == ((512, 512), 4, False)
    assert (finetune.resolution, finetune.batch_size, finetune.enable_bucket) == ((768, 768), 2, True)
    assert finetune.subsets[0].keep_tokens == 1
    assert finetune.subsets[0].metadata_file == Path("C:\\piyo\\piyo_md.json")


def test_every_documented_key_is_accepted(tmp_path):
    text = """
[general]
resolution = [512, 512]
batch_size = 1
enable_bucket = true
min_bucket_reso = 256
max_bucket_reso = 1024
bucket_reso_steps = 64
bucket_no_upscale = true
validation_split = 0.1
validation_seed = 42
[[datasets]]
[[datasets.subsets]]
image_dir = "x"
is_reg = false
num_repeats = 2
shuffle_caption = true
keep_tokens = 1
keep_tokens_separator = "|||"
caption_separator = ";"
caption_prefix = "pre"
caption_suffix = "suf"
caption_extension = ".txt"
caption_dropout_rate = 0.1
caption_tag_dropout_rate = 0.2
caption_dropout_every_n_epochs = 3
flip_aug = true
color_aug = true
random_crop = true
class_tokens = "sks"
"""
    dataset = load(tmp_path, text).datasets[0]
    subset = dataset.subsets[0]
    assert (dataset.validation_split, dataset.validation_seed, dataset.bucket_no_upscale) == (0.1, 42, True)
    assert (subset.keep_tokens_separator, subset.caption_separator, subset.caption_suffix) == ("|||", ";", "suf")
    assert (subset.caption_dropout_every_n_epochs, subset.color_aug, subset.random_crop) == (3, True, True)


# --- errors --------------------------------------------------------------------------------

MINIMAL = '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\n'


def test_unknown_key_names_path_line_and_closest_key(tmp_path):
    message = error_of(tmp_path, MINIMAL + "num_repaets = 3\n")
    assert "dataset.toml" in message
    assert "datasets[0].subsets[0].num_repaets" in message
    assert "(line 4)" in message
    assert "did you mean 'num_repeats'?" in message


def test_unknown_key_in_general_and_dataset(tmp_path):
    assert "general.shufle_caption" in error_of(tmp_path, "[general]\nshufle_caption = true\n" + MINIMAL)
    message = error_of(tmp_path, '[[datasets]]\nresolutoin = 512\n[[datasets.subsets]]\nimage_dir = "x"\n')
    assert "datasets[0].resolutoin" in message and "did you mean 'resolution'?" in message


def test_dataset_level_key_in_a_subset_is_refused_with_where_to_put_it(tmp_path):
    message = error_of(tmp_path, MINIMAL + "resolution = 512\n")
    assert "datasets[0].subsets[0].resolution" in message
    assert "not allowed in a subset table" in message and "[general] or [[datasets]]" in message
    message = error_of(tmp_path, '[general]\nimage_dir = "x"\n' + MINIMAL)
    assert "general.image_dir" in message and "[[datasets.subsets]]" in message


def test_unsupported_sd_scripts_key_is_refused(tmp_path):
    message = error_of(tmp_path, MINIMAL + "token_warmup_step = 2\n")
    assert "token_warmup_step" in message and "not supported" in message


def test_toml_syntax_error_names_file_and_line(tmp_path):
    message = error_of(tmp_path, '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x\n')
    assert "dataset.toml" in message and "TOML syntax error" in message and "line 3" in message


@pytest.mark.parametrize(
    ("line", "path", "shown", "expected"),
    [
        ('num_repeats = "3"', "datasets[0].subsets[0].num_repeats", 'got "3"', "an integer >= 1"),
        ("num_repeats = 0", "datasets[0].subsets[0].num_repeats", "got 0", "an integer >= 1"),
        ("num_repeats = true", "datasets[0].subsets[0].num_repeats", "got true", "an integer >= 1"),
        ('flip_aug = "yes"', "datasets[0].subsets[0].flip_aug", 'got "yes"', "true or false"),
        ("caption_dropout_rate = 1.5", "datasets[0].subsets[0].caption_dropout_rate", "got 1.5", "a number from 0"),
        ("keep_tokens = 1.0", "datasets[0].subsets[0].keep_tokens", "got 1.0", "an integer >= 0"),
        ('caption_separator = ""', "datasets[0].subsets[0].caption_separator", 'got ""', "a non-empty string"),
        ("class_tokens = 5", "datasets[0].subsets[0].class_tokens", "got 5", "a string"),
    ],
)
def test_wrong_type_or_range_in_subset(tmp_path, line, path, shown, expected):
    message = error_of(tmp_path, MINIMAL + line + "\n")
    assert path in message and shown in message and f"expected {expected}" in message


@pytest.mark.parametrize(
    ("line", "path", "expected"),
    [
        ("resolution = [512]", "general.resolution", "[width, height]"),
        ('resolution = "512"', "general.resolution", "a positive integer or [width, height]"),
        ("batch_size = 0", "general.batch_size", "an integer >= 1"),
        ("validation_split = 1.0", "general.validation_split", "(1 excluded)"),
        ("enable_bucket = 1", "general.enable_bucket", "true or false"),
    ],
)
def test_wrong_type_in_general(tmp_path, line, path, expected):
    message = error_of(tmp_path, "[general]\n" + line + "\n" + MINIMAL)
    assert path in message and expected in message


def test_subset_without_image_dir(tmp_path):
    message = error_of(tmp_path, "[[datasets]]\n[[datasets.subsets]]\nnum_repeats = 2\n")
    assert "datasets[0].subsets[0]" in message and "missing image_dir" in message


def test_dataset_without_subsets_and_file_without_datasets(tmp_path):
    assert "no [[datasets.subsets]]" in error_of(tmp_path, "[[datasets]]\nresolution = 512\n")
    assert "no [[datasets]]" in error_of(tmp_path, "[general]\nflip_aug = true\n")


def test_unknown_top_level_table(tmp_path):
    message = error_of(tmp_path, "[genral]\nflip_aug = true\n" + MINIMAL)
    assert "unknown top-level key 'genral'" in message and "did you mean 'general'?" in message


def test_mixing_dreambooth_and_fine_tuning_subsets(tmp_path):
    text = MINIMAL + '[[datasets.subsets]]\nimage_dir = "y"\nmetadata_file = "y.json"\n'
    message = error_of(tmp_path, text)
    assert "datasets[0]" in message and "mixes DreamBooth" in message
    assert "datasets[0].subsets[0]" in message and "datasets[0].subsets[1]" in message


def test_is_reg_in_fine_tuning_subset(tmp_path):
    text = '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "y"\nmetadata_file = "y.json"\nis_reg = true\n'
    assert "datasets[0].subsets[0].is_reg" in error_of(tmp_path, text)


def test_bucket_range_must_contain_resolution(tmp_path):
    text = "[general]\nenable_bucket = true\nresolution = 128\n" + MINIMAL
    message = error_of(tmp_path, text)
    assert "128x128" in message and "min_bucket_reso=256" in message
    # the same resolution is fine once the range allows it
    assert load(tmp_path, text.replace("resolution = 128", "resolution = 128\nmin_bucket_reso = 64")).datasets


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        load_dataset_config(tmp_path / "nope.toml", DatasetDefaults())


# --- legacy --train_data_dir ----------------------------------------------------------------


def test_legacy_folders(tmp_path):
    for name in ("10_sks dog", "3_cat", ".cache"):
        (tmp_path / "train" / name).mkdir(parents=True)
    (tmp_path / "train" / "notes.txt").write_text("ignored: not a folder")
    (tmp_path / "reg" / "1_dog").mkdir(parents=True)
    defaults = DatasetDefaults(
        train_data_dir=tmp_path / "train",
        reg_data_dir=tmp_path / "reg",
        resolution=(768, 512),
        batch_size=2,
        caption_extension=".txt",
        flip_aug=True,
    )
    (dataset,) = config_from_train_data_dir(defaults).datasets
    summary = [(s.image_dir.name, s.num_repeats, s.class_tokens, s.is_reg) for s in dataset.subsets]
    assert summary == [("10_sks dog", 10, "sks dog", False), ("3_cat", 3, "cat", False), ("1_dog", 1, "dog", True)]
    assert dataset.resolution == (768, 512) and dataset.batch_size == 2
    assert all(s.caption_extension == ".txt" and s.flip_aug for s in dataset.subsets)


def test_legacy_folders_without_repeats_are_skipped_with_one_warning(tmp_path, caplog):
    # sd-scripts: "ignore directory without repeats" (sample/, logs/) and folders with 0 repeats
    for name in ("5_ok", "my images", "sample", "0_disabled"):
        (tmp_path / "train" / name).mkdir(parents=True)
    with caplog.at_level("WARNING"):
        (dataset,) = config_from_train_data_dir(DatasetDefaults(train_data_dir=tmp_path / "train")).datasets
    assert [s.image_dir.name for s in dataset.subsets] == ["5_ok"]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "skipped 3 subfolder(s)" in warning and "0_disabled (0 repeats), my images, sample" in warning


def test_in_json_layout_and_its_bad_inputs(tmp_path):
    (tmp_path / "train").mkdir()
    meta = tmp_path / "md.json"
    (dataset,) = config_from_train_data_dir(DatasetDefaults(train_data_dir=tmp_path / "train", in_json=meta,
                                                            dataset_repeats=3)).datasets
    (subset,) = dataset.subsets
    assert (subset.image_dir, subset.metadata_file, subset.num_repeats) == (tmp_path / "train", meta, 3)
    with pytest.raises(UserError, match="--dataset_repeats 0"):
        config_from_train_data_dir(DatasetDefaults(train_data_dir=tmp_path / "train", in_json=meta,
                                                   dataset_repeats=0))
    with pytest.raises(UserError, match="--reg_data_dir"):
        config_from_train_data_dir(DatasetDefaults(train_data_dir=tmp_path / "train", in_json=meta,
                                                   reg_data_dir=tmp_path / "train"))
    with pytest.raises(UserError, match="folder not found"):
        config_from_train_data_dir(DatasetDefaults(train_data_dir=tmp_path / "nope", in_json=meta))


def test_legacy_zero_repeats_missing_dir_and_empty_dir(tmp_path):
    (tmp_path / "train" / "0_x").mkdir(parents=True)
    (tmp_path / "train" / "logs").mkdir()
    with pytest.raises(UserError) as info:
        config_from_train_data_dir(DatasetDefaults(train_data_dir=tmp_path / "train"))
    assert "no N_name subfolder" in str(info.value) and "found only 0_x (0 repeats), logs" in str(info.value)
    with pytest.raises(UserError, match="folder not found"):
        config_from_train_data_dir(DatasetDefaults(train_data_dir=tmp_path / "missing"))
    (tmp_path / "flat").mkdir()
    with pytest.raises(UserError, match="no subfolders"):
        config_from_train_data_dir(DatasetDefaults(train_data_dir=tmp_path / "flat"))
    with pytest.raises(UserError, match="--train_data_dir"):
        config_from_train_data_dir(DatasetDefaults())


def test_parse_resolution():
    assert parse_resolution("512") == (512, 512)
    assert parse_resolution("768,512") == (768, 512)
    assert parse_resolution(" 640 , 384 ") == (640, 384)
    for bad in ("", "0", "a,b", "1,2,3", "-64"):
        with pytest.raises(UserError, match="--resolution"):
            parse_resolution(bad)
