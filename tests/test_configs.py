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
def test_example_config_parses(path, tmp_path, monkeypatch):
    if _is_dataset_toml(path):
        import tomllib

        data = tomllib.loads(path.read_text())
        if any("image_dir" in s for d in data.get("datasets", []) for s in d.get("subsets", [])):
            config = parse_dataset_config(data, DatasetDefaults(), source=str(path), text=path.read_text())
            assert config.datasets and all(d.subsets for d in config.datasets)
        else:  # an LLM dataset: the text parser checks its keys, types and that the files exist
            from library.data.text_config import parse_text_dataset_config

            monkeypatch.chdir(tmp_path)  # the example's relative data files, created empty here
            for d in data["datasets"]:
                for subset in d["subsets"]:
                    for key in ("jsonl_file", "text_file"):
                        if key in subset:
                            (tmp_path / subset[key]).parent.mkdir(parents=True, exist_ok=True)
                            (tmp_path / subset[key]).write_text("")

            group = parse_text_dataset_config(data, source=str(path), text=path.read_text())
            assert group.datasets and all(d.subsets for d in group.datasets)
    else:
        values = load_config_file(build_parser(), path)
        assert values, f"{path} sets no arguments"


def test_there_are_examples():
    assert len(list(CONFIGS.glob("*.toml"))) >= 2
