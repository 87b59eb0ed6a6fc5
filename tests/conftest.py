"""Shared fixtures: tiny models and data written once per test session (never downloaded)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> Path:
    """A tiny SD1-style diffusers folder (epsilon prediction)."""
    from library.tiny_models import save_tiny_sd

    return save_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd", seed=0)


@pytest.fixture(scope="session")
def tiny_images(tmp_path_factory) -> Path:
    """Eight 64x64 PNG images with .caption side files."""
    from library.tiny_models import write_synthetic_images

    return write_synthetic_images(tmp_path_factory.mktemp("data") / "images", count=8, size=64)


@pytest.fixture
def free_port() -> int:
    """A TCP port nobody listens on now, for a multi-process launch (a fixed port collides with other runs)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
