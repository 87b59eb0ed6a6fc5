"""sd-scripts arguments that were refused before and now work as in sd-scripts: --validation_split /
--validation_seed on the command line, --resize_interpolation, --log_tracker_config and --base_weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from library.arg_checks import check_combinations
from library.args import build_parser
from library.config_file import parse_args_with_sources
from library.data.images import ImageCaptionDataset
from library.data.text_config import parse_text_dataset_config
from library.dataset_config import config_from_train_data_dir, load_dataset_config
from library.errors import UserError
from library.tiny_models import write_synthetic_images
from library.train_setup import dataset_defaults

BASE = ["--output_dir", "o", "--pretrained_model_name_or_path", "m"]


def _args(*argv: str):
    args, sources = parse_args_with_sources(build_parser(), [*BASE, *argv])
    check_combinations(args, build_parser().parse_args([]))
    return args, sources


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- --validation_split / --validation_seed ------------------------------------------------------

IMAGE_TOML = '[[datasets]]\n{dataset}\n  [[datasets.subsets]]\n  image_dir = "a"\n'


@pytest.mark.parametrize(("general", "dataset", "expected"), [
    ("", "", (0.25, 9)),  # the command line is the lowest level, used when the TOML is silent
    ("[general]\nvalidation_split = 0.5\n", "", (0.5, 9)),  # [general] beats the command line
    ("[general]\nvalidation_split = 0.5\n", "validation_split = 0.1\nvalidation_seed = 3", (0.1, 3)),
    ("", "validation_split = 0.0", (0.0, 9)),  # an explicit 0 in the TOML turns the command line's split off
])
def test_command_line_validation_split_is_the_dataset_default(tmp_path, general, dataset, expected):
    args, sources = _args("--validation_split", "0.25", "--validation_seed", "9")
    path = _write(tmp_path / "d.toml", general + IMAGE_TOML.format(dataset=dataset))
    (d,) = load_dataset_config(path, dataset_defaults(args, sources)).datasets
    assert (d.validation_split, d.validation_seed) == expected


def test_without_the_flags_nothing_is_held_out(tmp_path):
    args, sources = _args()
    (d,) = load_dataset_config(_write(tmp_path / "d.toml", IMAGE_TOML.format(dataset="")),
                               dataset_defaults(args, sources)).datasets
    assert (d.validation_split, d.validation_seed) == (0.0, None)


def test_train_data_dir_runs_hold_out_images_from_the_command_line(tmp_path):
    write_synthetic_images(tmp_path / "img" / "2_sks dog", count=10, size=32)
    args, sources = _args("--train_data_dir", str(tmp_path / "img"), "--resolution", "32",
                          "--validation_split", "0.2", "--validation_seed", "4")
    (d,) = config_from_train_data_dir(dataset_defaults(args, sources)).datasets
    assert (d.validation_split, d.validation_seed) == (0.2, 4)
    held = {r.path.name for r in ImageCaptionDataset(d, seed=0, split="validation").records}
    train = {r.path.name for r in ImageCaptionDataset(d, seed=0).records}
    assert len(held) == 2 and len(train) == 8 and not held & train
    # the split follows --validation_seed, not the run's seed
    assert {r.path.name for r in ImageCaptionDataset(d, seed=123, split="validation").records} == held


def test_llm_dataset_takes_the_command_line_validation_as_its_default(tmp_path):
    _write(tmp_path / "rows.jsonl", '{"text": "a"}\n')
    subset = {"jsonl_file": str(tmp_path / "rows.jsonl")}
    group = parse_text_dataset_config({"datasets": [{"subsets": [subset]}]}, validation_split=0.3,
                                      validation_seed=8)
    assert (group.datasets[0].validation_split, group.datasets[0].validation_seed) == (0.3, 8)
    data = {"general": {"validation_split": 0.1}, "datasets": [{"subsets": [subset]}, {"validation_seed": 2,
                                                                                        "subsets": [subset]}]}
    group = parse_text_dataset_config(data, validation_split=0.3, validation_seed=8)
    assert [(d.validation_split, d.validation_seed) for d in group.datasets] == [(0.1, 8), (0.1, 2)]


@pytest.mark.parametrize("value", ["1", "-0.1", "1.5"])
def test_a_validation_split_out_of_range_is_refused_before_anything_loads(value):
    with pytest.raises(UserError, match=f"--validation_split {float(value)}: expected a fraction"):
        _args("--validation_split", value)


def test_validation_flags_are_real_arguments_also_in_a_config_file(tmp_path):
    config = _write(tmp_path / "c.toml", "validation_split = 0.2\nvalidation_seed = 11\n")
    args, sources = _args("--config_file", str(config))
    defaults = dataset_defaults(args, sources)
    assert (defaults.validation_split, defaults.validation_seed) == (0.2, 11)
    assert json.dumps(sources["validation_split"]).startswith('"config file')
