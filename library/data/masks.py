"""Loss masks for ``--masked_loss`` (sd-scripts' names): an image's alpha channel or a mask image per image.

A subset with ``alpha_mask = true`` takes each image's transparency as its mask (an image without an alpha
channel is fully opaque: it trains everywhere); a subset with ``conditioning_data_dir`` takes a mask image of
the same name from that folder (its first channel, as sd-scripts reads it; a mask of another size is scaled to
the image's). White (opaque) trains, black (transparent) does not, grey in between.

The mask goes through exactly the image's scaling, crop and flip, so each pixel's weight stays on that pixel.
The loss multiplies by it after averaging it down to the latent grid (library/families/diffusion.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from library.data.buckets import Size
from library.data.pixels import IMAGE_EXTENSIONS, resize_and_crop, to_8bit
from library.errors import UserError

_LIST_LIMIT = 10


def has_mask(subset: object) -> bool:
    """Whether a subset's samples carry a loss mask (alpha_mask, or a conditioning_data_dir)."""
    return bool(getattr(subset, "alpha_mask", False)) or getattr(subset, "conditioning_data_dir", None) is not None


def mask_file(image: Path, folder: Path) -> Path | None:
    """The mask of ``image`` in ``folder``: the same stem with any image extension (the image's own first)."""
    suffixes = [image.suffix, *(e for e in IMAGE_EXTENSIONS if e != image.suffix.lower())]
    for suffix in suffixes:
        for candidate in (folder / (image.stem + suffix), folder / (image.stem + suffix.upper())):
            if candidate.is_file():
                return candidate
    return None


def mask_files(subset_name: str, images: list[Path], folder: Path) -> list[Path]:
    """Each image's mask file in ``folder``; a missing folder or mask is a UserError naming them."""
    if not folder.is_dir():
        raise UserError(f"{subset_name}: conditioning_data_dir {folder} is not a folder; it must hold one mask "
                        "image per training image, with the same file name.")
    found = [mask_file(image, folder) for image in images]
    missing = [image.name for image, mask in zip(images, found, strict=True) if mask is None]
    if missing:
        raise UserError(f"{subset_name}: {len(missing)} image(s) have no mask of the same name in {folder}: "
                        f"{', '.join(missing[:_LIST_LIMIT])}. Add the masks, or drop conditioning_data_dir.")
    return [mask for mask in found if mask is not None]


def open_mask(image_path: Path, mask_path: Path | None, size: Size) -> Image.Image:
    """The 8-bit mask of one image, as displayed (EXIF orientation applied), ``size`` = the image's (w, h)."""
    path = mask_path or image_path
    try:
        with Image.open(path) as raw:
            image = to_8bit(ImageOps.exif_transpose(raw))
            if mask_path is None:  # the image's own alpha; none means fully opaque
                has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
                mask = image.convert("RGBA").getchannel("A") if has_alpha else Image.new("L", image.size, 255)
            else:  # a mask image: its first channel (sd-scripts reads R)
                mask = image.convert("RGB").getchannel("R")
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read mask ({exc})") from None
    if mask.size != tuple(size):
        mask = mask.resize(size, Image.Resampling.BILINEAR)
    return mask


def mask_tensor(image_path: Path, mask_path: Path | None, size: Size, bucket: Size, random_crop: bool,
                uniforms: tuple[float, float], flipped: bool) -> torch.Tensor:
    """The mask as the sample's pixels see it: [1, H, W] in 0..1, scaled, cropped and flipped like the image."""
    mask, _ = resize_and_crop(open_mask(image_path, mask_path, size), bucket, random_crop, uniforms)
    tensor = torch.from_numpy(np.asarray(mask, dtype=np.uint8).copy()).float().div(255.0)[None]
    return tensor.flip(-1) if flipped else tensor


def to_latent_grid(mask: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """A pixel mask [B, 1, H, W] averaged down to the latent grid (each latent the mean of its pixels)."""
    if tuple(mask.shape[-2:]) == tuple(latent_size):
        return mask
    return torch.nn.functional.interpolate(mask.float(), size=latent_size, mode="area")
