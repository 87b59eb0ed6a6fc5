"""Inputs users get wrong: 16-bit greyscale PNGs, caption files with another extension or not
UTF-8, tiny images (CPU, small generated files)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from library.data.captions import caption_extension_hint, other_caption_extensions, read_caption_file
from library.data.images import ImageCaptionDataset
from library.data.pixels import open_rgb, probe_image, to_8bit
from library.dataset_config import DatasetConfig, SubsetConfig
from library.errors import UserError

LOGGER = "library.data.images"


def config(folder: Path, resolution: tuple[int, int] = (32, 32), **subset_kw: object) -> DatasetConfig:
    return DatasetConfig(subsets=(SubsetConfig(image_dir=folder, **subset_kw),), resolution=resolution)


def grey_ramp_16(path: Path) -> np.ndarray:
    """A 16-bit greyscale PNG whose values span 0..65535; returns the values written."""
    values = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)
    values[0, 0], values[-1, -1] = 0, 65535
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values).save(path)
    return values


# --- 1. high-bit-depth greyscale --------------------------------------------------------------


def test_16bit_greyscale_png_is_scaled_not_clipped_to_white(tmp_path):
    values = grey_ramp_16(tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").mode in ("I;16", "I")  # what PIL opens it as
    rgb = np.asarray(open_rgb(tmp_path / "g.png"))
    assert rgb.shape == (32, 32, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    expected = np.rint(values / 257).astype(np.uint8)
    assert np.array_equal(rgb[..., 1], expected)  # PIL's own convert("RGB") gives 255 almost everywhere
    assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255 and rgb[16, 0, 0] == round(16 * 32 * 64 / 257)
    assert probe_image(tmp_path / "g.png") == (32, 32)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_every_16bit_mode_maps_65535_to_255(mode):
    values = np.array([[0, 257, 32896, 65535]])
    if mode == "I":  # what older Pillow gives for a 16-bit PNG
        image = Image.fromarray(values.astype(np.int32))
    else:
        image = Image.frombytes(mode, (4, 1), values.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    assert image.mode == mode
    assert np.asarray(to_8bit(image)).tolist() == [[0, 1, 128, 255]]


def test_float_images_scale_by_their_range_or_are_refused(tmp_path):
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert np.asarray(to_8bit(unit)).tolist() == [[0, 128, 255]]  # 0..1: the float convention
    bytes_range = Image.fromarray(np.array([[0.0, 100.0, 255.0]], dtype=np.float32))
    assert np.asarray(to_8bit(bytes_range)).tolist() == [[0, 100, 255]]  # 0..255: PIL's F from 8-bit data
    with pytest.raises(ValueError, match=r"values -1\.\.300.*8- or 16-bit PNG"):
        to_8bit(Image.fromarray(np.array([[-1.0, 300.0]], dtype=np.float32)))
    with pytest.raises(ValueError, match="not 16-bit"):
        to_8bit(Image.fromarray(np.array([[0, 70000]], dtype=np.int32)))
    rgb = Image.new("RGB", (2, 2), (1, 2, 3))
    assert to_8bit(rgb) is rgb  # 8-bit modes are left to PIL's convert


def test_dataset_trains_on_the_scaled_16bit_pixels(tmp_path):
    grey_ramp_16(tmp_path / "d" / "g.png")
    ds = ImageCaptionDataset(config(tmp_path / "d", class_tokens="x"), seed=0)
    image = ds.record_image(0)
    assert -1.0 <= image.min() < -0.9 and 0.9 < image.max() <= 1.0 and image.mean().abs() < 0.2  # not all white


# --- 2. caption files with another extension ---------------------------------------------------


def test_class_tokens_with_captions_of_another_extension_warn_once(tmp_path, caplog):
    folder = tmp_path / "5_sks"
    folder.mkdir()
    for name in ("a", "b", "c"):
        Image.new("RGB", (32, 32)).save(folder / f"{name}.png")
    (folder / "a.txt").write_text("sks dog, grass", encoding="utf-8")
    (folder / "b.txt").write_text("sks dog, sofa", encoding="utf-8")
    (folder / "c.npz").write_bytes(b"")  # an sd-scripts latent cache: not a caption
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ds = ImageCaptionDataset(config(folder, class_tokens="sks dog"), seed=0)
    assert [r.caption for r in ds.records] == ["sks dog"] * 3  # still trains, as sd-scripts would
    warned = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(warned) == 1
    assert '3 of 3 images' in warned[0] and '"caption"' not in warned[0] and '".caption"' in warned[0]
    assert '.txt found for 2 images; set caption_extension = ".txt"' in warned[0] and ".npz" not in warned[0]


def test_no_warning_for_a_plain_dreambooth_folder(tmp_path, caplog):
    folder = tmp_path / "5_sks"
    folder.mkdir()
    Image.new("RGB", (32, 32)).save(folder / "a.png")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ImageCaptionDataset(config(folder, class_tokens="sks dog"), seed=0)
    assert not [r for r in caplog.records if r.name == LOGGER]


def test_other_caption_extensions_only_counts_files_named_like_the_images(tmp_path):
    for name in ("a.png", "a.txt", "a.TXT2", "b.png", "b.txt", "b.xmp", "b.jpg", "notes.txt", "c.png"):
        (tmp_path / name).write_bytes(b"")
    images = [tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"]
    found = other_caption_extensions(images, ".caption")
    assert dict(found) == {".txt": 2, ".TXT2": 1}
    assert caption_extension_hint(found) == (
        '.txt found for 2 images, .TXT2 found for 1 image; set caption_extension = ".txt"'
    )
    assert caption_extension_hint(other_caption_extensions(images, ".txt")) == (
        '.TXT2 found for 1 image; set caption_extension = ".TXT2"'
    )


# --- 3. captions that are not UTF-8 -------------------------------------------------------------


def test_latin1_caption_is_a_user_error_naming_file_and_byte(tmp_path):
    path = tmp_path / "a.caption"
    path.write_bytes("café crème".encode("latin-1"))
    with pytest.raises(UserError) as info:
        read_caption_file(path)
    assert str(info.value) == f"{path}: not UTF-8 (byte 0xe9 at position 3); re-save it as UTF-8"
    path.write_bytes(b"\xef\xbb\xbf" + "café".encode("latin-1"))  # the position counts the BOM too
    with pytest.raises(UserError, match="byte 0xe9 at position 6"):
        read_caption_file(path)
    path.write_bytes(b"\xef\xbb\xbf" + "café".encode())
    assert read_caption_file(path) == "café"


def test_latin1_caption_stops_the_dataset_with_the_file_named(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    Image.new("RGB", (32, 32)).save(folder / "a.png")
    (folder / "a.caption").write_bytes(b"caf\xe9")
    with pytest.raises(UserError, match=r"a\.caption: not UTF-8"):
        ImageCaptionDataset(config(folder), seed=0)


# --- 4. tiny images --------------------------------------------------------------------------


def test_tiny_images_are_named_in_one_warning(tmp_path, caplog):
    folder = tmp_path / "d"
    folder.mkdir()
    for name, size in (("one.png", (1, 1)), ("sliver.png", (64, 3)), ("ok.png", (64, 64)), ("half.png", (16, 16))):
        Image.new("RGB", size).save(folder / name)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ds = ImageCaptionDataset(config(folder, resolution=(64, 64), class_tokens="x"), seed=0)
    assert {r.bucket for r in ds.records} == {(64, 64)}
    warned = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(warned) == 1 and "2 image(s)" in warned[0] and "more than 8x" in warned[0]
    assert "one.png" in warned[0] and "sliver.png" in warned[0]
    assert "ok.png" not in warned[0] and "half.png" not in warned[0]  # 4x is a soft image, not a blur
