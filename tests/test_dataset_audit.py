"""Dataset audit fixes: oversized images, TOML line numbers, fine-tuning subsets, bucket notes."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest
from PIL import Image

from library.data.buckets import closest_bucket, make_bucket_resolutions
from library.data.images import ImageCaptionDataset
from library.dataset_config import DatasetConfig, DatasetDefaults, SubsetConfig, load_dataset_config
from library.errors import UserError
from library.tiny_models import write_synthetic_images

ROOT = Path(__file__).resolve().parent.parent


def load(tmp_path: Path, text: str):
    path = tmp_path / "dataset.toml"
    path.write_text(text, encoding="utf-8")
    return load_dataset_config(path, DatasetDefaults())


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(UserError) as info:
        load(tmp_path, text)
    return str(info.value)


def line_of(text: str, needle: str, occurrence: int) -> int:
    """1-based line of the ``occurrence``-th (0-based) line that starts with ``needle``."""
    numbers = [n for n, line in enumerate(text.splitlines(), start=1) if line.strip().startswith(needle)]
    return numbers[occurrence]


# --- 1. oversized (decompression-bomb) images ---------------------------------------------


def test_oversized_image_is_listed_like_a_corrupt_one(tmp_path, monkeypatch):
    folder = write_synthetic_images(tmp_path / "d", count=2, size=32)
    Image.new("RGB", (64, 64)).save(folder / "img_big.png")
    (folder / "img_big.caption").write_text("big", encoding="utf-8")
    # 64x64 = 4096 pixels: over this limit but under twice it, where PIL only warns (as for a
    # real 144-Mpx photo under the default limit of about 89 Mpx).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)
    config = DatasetConfig(subsets=(SubsetConfig(image_dir=folder),), resolution=(32, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # PIL's own, nameless warning
        with pytest.raises(UserError) as info:
            ImageCaptionDataset(config, seed=0)
        message = str(info.value)
        assert "1 unreadable image(s)" in message and "img_big.png" in message
        assert "oversized image: 64x64 = 4096 pixels" in message and "--on_bad_image skip" in message
        ds = ImageCaptionDataset(config, seed=0, on_bad_image="skip")
    assert len(ds) == 2 and [p.name for p, _ in ds.skipped] == ["img_big.png"]
    assert any("skipped unreadable image" in line and "img_big.png" in line for line in ds.summary())


# --- 2. line numbers when a key is written in several tables --------------------------------

TWO_SUBSETS = """\
[general]
batch_size = 2

[[datasets]]
batch_size = 1

  [[datasets.subsets]]
  image_dir = "a"
  num_repeats = 2
  caption_prefix = '''
num_repeats = 9
'''

  [[datasets.subsets]]
  image_dir = "b"
  num_repeats = 3
"""


def test_error_names_the_line_of_the_right_occurrence(tmp_path):
    text = TWO_SUBSETS.replace("num_repeats = 3", 'num_repeats = "5"')
    message = error_of(tmp_path, text)
    # occurrence 0 is the first subset's, 1 is inside the multi-line string, 2 is the culprit
    assert f'datasets[0].subsets[1].num_repeats (line {line_of(text, "num_repeats", 2)}): got "5"' in message

    text = TWO_SUBSETS.replace("batch_size = 1", "batch_size = 0")
    assert f"datasets[0].batch_size (line {line_of(text, 'batch_size', 1)})" in error_of(tmp_path, text)


def test_unknown_or_misplaced_key_in_the_second_subset_names_its_line(tmp_path):
    text = TWO_SUBSETS + "  num_repaets = 4\n"
    message = error_of(tmp_path, text)
    assert f"datasets[0].subsets[1].num_repaets (line {line_of(text, 'num_repaets', 0)})" in message
    # `batch_size` is legal in [general] and [[datasets]] but not in a subset
    text = TWO_SUBSETS + "  batch_size = 4\n"
    message = error_of(tmp_path, text)
    assert f"datasets[0].subsets[1].batch_size (line {line_of(text, 'batch_size', 2)})" in message
    assert "not allowed in a subset table" in message


def test_table_level_errors_name_the_table_header(tmp_path):
    text = TWO_SUBSETS.replace('image_dir = "b"', "flip_aug = true")
    message = error_of(tmp_path, text)
    assert f"datasets[0].subsets[1] (line {line_of(text, '[[datasets.subsets]]', 1)}): missing image_dir" in message
    dataset = '[[datasets]]\nresolution = {}\n[[datasets.subsets]]\nimage_dir = "a"\n'
    text = "[general]\nenable_bucket = true\n" + dataset.format(512) + dataset.format(64)
    message = error_of(tmp_path, text)
    assert f"datasets[1] (line {line_of(text, '[[datasets]]', 1)}): resolution 64x64 is outside" in message


# --- 3. fine-tuning subsets: image_dir optional, DreamBooth-only keys refused --------------


def test_metadata_subset_without_image_dir_uses_absolute_paths(tmp_path):
    folder = write_synthetic_images(tmp_path / "imgs", count=2, size=32)
    metadata = {str(folder / "img_001.png"): {"tags": "dog"}, str(folder / "img_000.png"): {"caption": "a cat"}}
    (tmp_path / "meta.json").write_text(json.dumps(metadata), encoding="utf-8")
    meta = (tmp_path / "meta.json").as_posix()
    toml = f"[[datasets]]\nresolution = 32\n[[datasets.subsets]]\nmetadata_file = '{meta}'\n"
    config = load(tmp_path, toml)
    (dataset,) = config.datasets
    assert dataset.subsets[0].image_dir is None and dataset.subsets[0].metadata_file == tmp_path / "meta.json"
    ds = ImageCaptionDataset(dataset, seed=0)
    assert [(Path(ds[i]["image_path"]).name, ds[i]["caption"]) for i in range(len(ds))] == [
        ("img_000.png", "a cat"),
        ("img_001.png", "dog"),
    ]
    assert ds.tag_frequency() == {"meta.json": {"a cat": 1, "dog": 1}}  # named by the metadata file, as sd-scripts
    assert any("meta.json" in line for line in ds.summary())
    # the trainer's ss_datasets metadata and check_dataset's survey read such a subset too
    from library.data.image_data import build_image_data
    from tools.check_dataset import survey_subset

    data = build_image_data(config, seed=0, on_bad_image="error", num_processes=1, rank=0, num_workers=0,
                            persistent_workers=False)
    assert data.metadata()[0]["subsets"][0]["metadata_file"] == "meta.json"
    assert "from " + str(tmp_path / "meta.json") in "\n".join(survey_subset(dataset.subsets[0]))


def test_metadata_keys_relative_to_image_dir_only_when_given(tmp_path):
    folder = write_synthetic_images(tmp_path / "imgs", count=2, size=32)
    metadata = {"img_000": {"caption": "a"}, str(folder / "img_001.png"): {"caption": "b"}}
    (tmp_path / "meta.json").write_text(json.dumps(metadata), encoding="utf-8")
    with_dir = SubsetConfig(image_dir=folder, metadata_file=tmp_path / "meta.json")
    ds = ImageCaptionDataset(DatasetConfig(subsets=(with_dir,), resolution=(32, 32)), seed=0)
    assert sorted(Path(r.path).name for r in ds.records) == ["img_000.png", "img_001.png"]
    without = SubsetConfig(image_dir=None, metadata_file=tmp_path / "meta.json")
    with pytest.raises(UserError, match=r"1 entries name no image \(without image_dir.*img_000"):
        ImageCaptionDataset(DatasetConfig(subsets=(without,), resolution=(32, 32)), seed=0)


@pytest.mark.parametrize("line", ['class_tokens = "sks"', 'caption_extension = ".txt"', "is_reg = true"])
def test_dreambooth_only_keys_in_a_metadata_subset_are_refused(tmp_path, line):
    text = f'[[datasets]]\n[[datasets.subsets]]\nmetadata_file = "m.json"\n{line}\n'
    key = line.split()[0]
    message = error_of(tmp_path, text)
    assert f"datasets[0].subsets[0].{key} (line 4)" in message and "not to metadata_file subsets" in message



def test_dreambooth_only_values_inherited_by_a_metadata_subset_are_fine(tmp_path):
    text = '[general]\nclass_tokens = "sks"\ncaption_extension = ".txt"\n'
    text += '[[datasets]]\n[[datasets.subsets]]\nmetadata_file = "m.json"\n'
    assert load(tmp_path, text).datasets[0].subsets[0].image_dir is None  # they simply do not apply


def test_dreambooth_subset_still_needs_image_dir(tmp_path):
    message = error_of(tmp_path, "[[datasets]]\n[[datasets.subsets]]\nclass_tokens = 'x'\n")
    assert "datasets[0].subsets[0] (line 2): missing image_dir" in message


# --- 4. bucket notes ---------------------------------------------------------------------


def test_no_upscale_warns_about_images_smaller_than_one_step(tmp_path, caplog):
    folder = tmp_path / "d"
    folder.mkdir()
    for name, size in (("thin.png", (100, 40)), ("ok.png", (128, 64))):
        Image.new("RGB", size).save(folder / name)
    subset = SubsetConfig(image_dir=folder, class_tokens="x")
    config = DatasetConfig(subsets=(subset,), resolution=(64, 64), enable_bucket=True, bucket_no_upscale=True,
                           min_bucket_reso=64, bucket_reso_steps=64)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="library.data.images"):
        ds = ImageCaptionDataset(config, seed=0)
    assert [r.bucket for r in ds.records] == [(64, 64), (64, 64)]  # ok.png is scaled down, thin.png up
    warned = [r.getMessage() for r in caplog.records if "bucket_no_upscale" in r.getMessage()]
    assert len(warned) == 1 and "1 image(s)" in warned[0] and "thin.png" in warned[0] and "ok.png" not in warned[0]


def test_log_scale_bucket_choice_is_mirror_symmetric():
    """The README's claim: where sd-scripts' linear comparison picks the narrower bucket, this picks the wider."""
    buckets = make_bucket_resolutions((512, 512), 256, 1024, 64)
    # 1.139 lies between sqrt(1 * 9/7) = 1.134 (the log midpoint) and (1 + 9/7) / 2 = 1.143 (the linear one)
    assert closest_bucket((1139, 1000), buckets) == (576, 448)
    assert closest_bucket((1000, 1139), buckets) == (448, 576)
    linear = min(buckets, key=lambda b: abs(b[0] / b[1] - 1.139))
    assert linear == (512, 512)


def test_readme_states_the_differences_from_sd_scripts():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Dataset TOML reference") : readme.index("## When things go wrong")]
    for phrase in ("different `batch_size`", "log", "floor", "`keep_tokens_separator`", "empty tags",
                   "`metadata_file`", "smaller than `bucket_reso_steps`"):  # fmt: skip
        assert phrase in section, phrase


def test_sd_scripts_caption_arguments_on_the_command_line(tmp_path):
    """--caption_prefix/--caption_suffix/--keep_tokens_separator/--caption_separator, as sd-scripts has them,
    are the command-line level of the dataset precedence (a TOML value still wins)."""
    from library.args import build_parser
    from library.train_setup import dataset_defaults

    args = build_parser().parse_args(["--caption_prefix", "pre", "--caption_suffix", "post",
                                      "--keep_tokens_separator", "|||", "--caption_separator", ";"])
    folder = write_synthetic_images(tmp_path / "imgs", count=1, size=32)
    path = tmp_path / "dataset.toml"
    path.write_text(f"[[datasets]]\nresolution = 32\n[[datasets.subsets]]\nimage_dir = '{folder.as_posix()}'\n"
                    "caption_suffix = 'toml'\n", encoding="utf-8")
    (subset,) = load_dataset_config(path, dataset_defaults(args)).datasets[0].subsets
    assert (subset.caption_prefix, subset.caption_suffix) == ("pre", "toml")
    assert (subset.keep_tokens_separator, subset.caption_separator) == ("|||", ";")


def test_sdxl_crop_condition_describes_the_flipped_image(tmp_path):
    """With random_crop and flip_aug, crop_top_left's left is measured in the image the model sees (the
    mirrored one), as sd-scripts and diffusers' SDXL script do; it was the unflipped crop's."""
    import numpy as np

    folder = tmp_path / "imgs"
    folder.mkdir()
    ramp = np.tile(np.arange(256, dtype=np.uint8)[None, :, None], (64, 1, 3))  # pixel value = its column
    Image.fromarray(ramp).save(folder / "ramp.png")
    (folder / "ramp.caption").write_text("ramp")
    config = DatasetConfig((SubsetConfig(folder, num_repeats=40, random_crop=True, flip_aug=True),),
                           resolution=(64, 64))
    ds = ImageCaptionDataset(config, seed=0)
    flips = set()
    for i in range(len(ds)):
        item = ds[(0, i)]
        top, left = item["crop_top_left"]
        first_column = round((item["image"][0, 0, 0].item() + 1) * 127.5)
        # the cover image is the 256x64 original: column j of the seen image holds j, or 255 - j when mirrored
        assert first_column == (255 - left if item["flipped"] else left), (i, item["flipped"], left, first_column)
        flips.add(item["flipped"])
    assert flips == {True, False}
