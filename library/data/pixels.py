"""One image file → the 8-bit RGB pixels a sample trains on: decoding, bit depth, crop, tensor.

``probe_image`` (when the dataset is built, and in tools/check_dataset.py) and ``open_rgb``
(every sample) go through the same ``to_8bit`` step, so an image that cannot be converted is
reported before training, and one that can is converted the same way in both.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from library.data.buckets import Size, cover_size, crop_position
from library.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# sd-scripts' resize_interpolation names and the PIL filter each means (its get_pil_interpolation); "area" is
# HAMMING there as well. Unset is this toolkit's LANCZOS, so an unset run resizes exactly as before.
RESIZE_FILTERS: dict[str, Image.Resampling] = {
    "lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR, "linear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC, "cubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.HAMMING, "box": Image.Resampling.BOX,
}
DEFAULT_RESIZE = "lanczos"


def resize_filter(name: str | None) -> Image.Resampling:
    """The PIL filter of a resize_interpolation name (None: the default, LANCZOS)."""
    return RESIZE_FILTERS[name or DEFAULT_RESIZE]
# Modes with more than 8 bits per sample, which PIL's convert("RGB") clips to 0..255 instead of
# scaling: a 16-bit greyscale PNG (I;16, or I in older Pillow) would come out almost all white.
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def to_8bit(image: Image.Image) -> Image.Image:
    """A high-bit-depth greyscale image as 8-bit "L"; other modes unchanged. ValueError when unconvertible.

    I;16* and I hold 16-bit samples (0..65535: PNG scales any lower bit depth up to the full
    range), so v / 257 maps 65535 to 255 exactly. F (float) has no declared depth: 0..1 (the
    usual float convention) is scaled by 255, 0..255 (PIL's F from 8-bit data) kept; any other
    range is refused rather than guessed.
    """
    if image.mode not in _HIGH_DEPTH_MODES:
        return image
    values = np.asarray(image)
    low, high = (values.min().item(), values.max().item()) if values.size else (0, 0)
    if image.mode == "F":
        if not np.isfinite(values).all() or low < 0 or high > 255:
            raise ValueError(f"float greyscale image with values {low:g}..{high:g}; only 0..1 or 0..255 can be "
                             "converted to 8 bits: save it as an 8- or 16-bit PNG")  # fmt: skip
        scaled = np.rint(values * (255.0 if high <= 1 else 1.0))
    else:
        if low < 0 or high > 65535:
            raise ValueError(f"32-bit integer image with values {low}..{high} (not 16-bit 0..65535); "
                             "save it as an 8- or 16-bit PNG")  # fmt: skip
        scaled = (values.astype(np.uint32) + 128) // 257  # round(v / 257) in integers: 65535 → 255
    return Image.fromarray(scaled.astype(np.uint8), "L")


def probe_image(path: Path) -> Size:
    """Decode the whole file (so truncation shows now, not mid-training); (w, h) as displayed.

    An image over PIL's decompression-bomb limit is an error here, like a corrupt file: PIL only
    refuses those over twice the limit and merely warns (without naming the file) below that.
    """
    with Image.open(path) as image:
        limit, (width, height) = Image.MAX_IMAGE_PIXELS, image.size
        if limit is not None and width * height > limit:  # checked before decoding: that is the bomb
            raise Image.DecompressionBombWarning(
                f"oversized image: {width}x{height} = {width * height} pixels is over PIL's decompression-bomb limit "
                f"of {limit} pixels (PIL.Image.MAX_IMAGE_PIXELS); downscale it"
            )
        image.load()
        to_8bit(image)  # what open_rgb will do: an unconvertible bit depth is a bad image now
        width, height = image.size
        # EXIF orientations 5-8 rotate by 90°: the displayed image is height × width.
        if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):
            width, height = height, width
    return (width, height)


def open_rgb(path: Path) -> Image.Image:
    """The image as displayed (EXIF orientation applied), 8-bit RGB; transparency composited on white."""
    try:
        with Image.open(path) as raw:
            image = to_8bit(ImageOps.exif_transpose(raw))
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                rgba = image.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, rgba).convert("RGB")
            return image.convert("RGB")
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read image ({exc}); it was readable when the dataset was built") from None


def resize_and_crop(
    image: Image.Image, target: Size, random_crop: bool, uniforms: tuple[float, float],
    interpolation: str | None = None,
) -> tuple[Image.Image, tuple[int, int]]:
    """Scale so the image covers ``target`` (aspect kept), then crop to it; returns (image, (top, left)).
    ``interpolation``: a :data:`RESIZE_FILTERS` name (None: LANCZOS)."""
    cover = cover_size(image.size, target)
    if cover != image.size:
        image = image.resize(cover, resize_filter(interpolation))
    top, left = crop_position(image.size, target, random_crop, uniforms)
    return image.crop((left, top, left + target[0], top + target[1])), (top, left)


def load_image(
    path: Path, target: Size, random_crop: bool, uniforms: tuple[float, float], interpolation: str | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    return resize_and_crop(open_rgb(path), target, random_crop, uniforms, interpolation)


def shift_hue(image: Image.Image, offset: int) -> Image.Image:
    if offset == 0:
        return image
    hue, saturation, value = image.convert("HSV").split()
    hue = hue.point(lambda h: (h + offset) % 256)
    return Image.merge("HSV", (hue, saturation, value)).convert("RGB")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image → float tensor [3, H, W] in [-1, 1]."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)
