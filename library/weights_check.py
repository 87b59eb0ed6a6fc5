"""Cheap checks of weight files before a library tries (and fails obscurely) to load them.

Only headers are read: a git-lfs pointer committed instead of the weights, and a truncated
``.safetensors`` (a download or copy that stopped early) are named with what to do.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from library.errors import UserError

_LFS_PREFIX = b"version https://git-lfs"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")


def check_weight_file(path: str | os.PathLike) -> None:
    """Raise UserError for a git-lfs pointer or a truncated/corrupt safetensors file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(min(size, 64))
        if head.startswith(_LFS_PREFIX):
            raise UserError(f"{path} is a git-lfs pointer file ({size} bytes), not the weights: run "
                            "`git lfs pull` in that repository, or download the real file.")
        if path.suffix != ".safetensors":
            return
        if size < 8:
            raise UserError(f"{path} is truncated ({size} bytes): download or copy it again.")
        (header_len,) = struct.unpack("<Q", head[:8])
        if 8 + header_len > size:
            raise UserError(f"{path} is truncated or not a safetensors file (header of {header_len} bytes, "
                            f"file of {size}): download or copy it again.")
        f.seek(8)
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise UserError(f"{path} is not a valid safetensors file (unreadable header).") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise UserError(f"{path} is truncated: it should hold {8 + header_len + end} bytes but has {size}. "
                        "Download or copy it again.")


# Parts of a diffusers pipeline folder that training loads, and the file that must be in each.
_NEEDED_PARTS = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
                 "text_encoder_2": "config.json", "scheduler": "scheduler_config.json", "tokenizer": "",
                 "tokenizer_2": ""}  # a tokenizer's files vary: its folder must be there


def check_model_folder(folder: str | os.PathLike, skip: tuple[str, ...] = ()) -> None:
    """Check a model folder: every part its ``model_index.json`` names and training loads is there (the loaders
    would name the folder, not the missing part), and every weight file is whole (headers only). ``skip``: parts
    given separately (``--vae``)."""
    root = Path(folder)
    index = root / "model_index.json"
    if index.is_file():
        try:
            parts = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{index} is not valid JSON ({e}); download the model again.") from None
        for part, needed in _NEEDED_PARTS.items():
            listed = isinstance(parts, dict) and isinstance(parts.get(part), list) and parts[part][0] is not None
            present = (root / part / needed).is_file() if needed else (root / part).is_dir()
            if listed and part not in skip and not present:
                raise UserError(f"{root}: model_index.json names a '{part}', but {root / part / needed} is missing; "
                                "the download looks incomplete (download the model again).")
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix in WEIGHT_SUFFIXES:
            check_weight_file(path)
