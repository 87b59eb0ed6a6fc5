"""Every shipped example config parses with the real parsers (keys and types checked)."""

from __future__ import annotations

from pathlib import Path

import pytest

from library.args import build_parser
from library.config_file import load_config_file
from library.dataset_config import DatasetDefaults, parse_dataset_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _is_dataset_toml(path: Path) -> bool:
    return "[[datasets]]" in path.read_text()


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_example_config_parses(path):
    if _is_dataset_toml(path):
        import tomllib

        data = tomllib.loads(path.read_text())
        if any("image_dir" in s for d in data.get("datasets", []) for s in d.get("subsets", [])):
            config = parse_dataset_config(data, DatasetDefaults(), source=str(path), text=path.read_text())
            assert config.datasets and all(d.subsets for d in config.datasets)
        else:
            pytest.skip("not an image dataset config (checked by its family's tests)")
    else:
        values = load_config_file(build_parser(), path)
        assert values, f"{path} sets no arguments"


def test_there_are_examples():
    assert len(list(CONFIGS.glob("*.toml"))) >= 2
