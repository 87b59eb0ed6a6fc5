"""A model folder with a part missing names the part (the loaders name the folder and a file they did not find)."""

from __future__ import annotations

import shutil

import pytest

from library.errors import UserError
from library.weights_check import check_model_folder


@pytest.mark.parametrize(("part", "missing"), [
    ("vae", "vae/config.json"), ("text_encoder", "text_encoder/config.json"), ("tokenizer", "tokenizer"),
    ("scheduler", "scheduler/scheduler_config.json"),
])
def test_a_missing_part_is_named(tmp_path, tiny_sd_dir, part, missing):
    model = tmp_path / "model"
    shutil.copytree(tiny_sd_dir, model)
    check_model_folder(model)  # complete
    shutil.rmtree(model / part)
    with pytest.raises(UserError, match=f"model_index.json names a '{part}', but .*{missing} is missing"):
        check_model_folder(model)
    if part == "vae":  # given separately with --vae: not needed in the folder
        check_model_folder(model, skip=("vae",))
