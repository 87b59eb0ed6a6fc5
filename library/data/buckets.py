"""Aspect-ratio buckets: which (width, height) each image is trained at.

With bucketing off every image goes to the one bucket ``resolution``. With bucketing on
(sd-scripts' ``enable_bucket``):
- the candidate buckets are all (w, h) with sides multiples of ``bucket_reso_steps`` between
  ``min_bucket_reso`` and ``max_bucket_reso`` and area ≤ the resolution's area (for each
  width, the tallest such height), plus the largest square;
- an image goes to the bucket with the closest aspect ratio, compared on a log scale so that
  2:1 and 1:2 are equally far from 1:1 and an image and its 90°-rotated copy get mirrored
  buckets (sd-scripts compares w/h linearly: an image whose ratio lies just below the
  arithmetic mean of two neighbouring buckets' ratios goes to the narrower one there, to the
  wider one here);
- with ``bucket_no_upscale`` the bucket is derived from the image itself instead: the image is
  scaled down (never up) until its area fits the resolution's area and both sides fit
  ``max_bucket_reso``, then each side is floored to a multiple of ``bucket_reso_steps``, as
  sd-scripts floors (rounding up would make the bucket larger than the image, i.e. upscale it).
  A side under one step still becomes one step (the image is enlarged; ``images.py`` warns).

Every image is later resized to cover its bucket and cropped (see ``images.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Size = tuple[int, int]  # (width, height)


@dataclass(frozen=True)
class BucketSettings:
    resolution: Size
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False


def make_bucket_resolutions(resolution: Size, min_reso: int, max_reso: int, step: int) -> list[Size]:
    """The predefined buckets for a resolution, sorted."""
    max_area = resolution[0] * resolution[1]
    side = max(step, math.isqrt(max_area) // step * step)
    buckets = {(side, side)}
    width = min_reso
    while width <= max_reso:
        height = min(max_reso, max_area // width // step * step)
        if height >= min_reso:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    return sorted(buckets)


def closest_bucket(size: Size, buckets: Sequence[Size]) -> Size:
    """The bucket whose aspect ratio is closest to the image's (log scale; ties → first)."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - ratio))


def no_upscale_bucket(size: Size, max_area: int, max_reso: int, step: int) -> Size:
    """The bucket for ``bucket_no_upscale``: the image's own shape, never enlarged."""
    width, height = size
    scale = min(1.0, math.sqrt(max_area / (width * height)), max_reso / width, max_reso / height)
    # Flooring keeps the bucket inside the (scaled) image, so resizing to cover it never upscales
    # an image larger than one step.
    return (max(step, int(width * scale) // step * step), max(step, int(height * scale) // step * step))


def assign_buckets(sizes: Sequence[Size], settings: BucketSettings) -> list[Size]:
    """The bucket of each image, given its (width, height) after EXIF orientation."""
    if not settings.enable_bucket:
        return [settings.resolution] * len(sizes)
    if settings.bucket_no_upscale:
        area = settings.resolution[0] * settings.resolution[1]
        return [no_upscale_bucket(s, area, settings.max_bucket_reso, settings.bucket_reso_steps) for s in sizes]
    candidates = make_bucket_resolutions(
        settings.resolution, settings.min_bucket_reso, settings.max_bucket_reso, settings.bucket_reso_steps
    )
    return [closest_bucket(s, candidates) for s in sizes]


def cover_size(size: Size, target: Size) -> Size:
    """The smallest size with the image's aspect ratio that covers ``target``."""
    scale = max(target[0] / size[0], target[1] / size[1])
    return max(target[0], round(size[0] * scale)), max(target[1], round(size[1] * scale))


def crop_position(size: Size, target: Size, random_crop: bool, uniforms: tuple[float, float]) -> tuple[int, int]:
    """(top, left) of the ``target`` crop in the image of ``size`` scaled to cover it.

    Centred, or placed by ``uniforms`` (two numbers in [0, 1)) with ``random_crop``.
    """
    width, height = cover_size(size, target)
    if not random_crop:
        return (height - target[1]) // 2, (width - target[0]) // 2
    left = min(width - target[0], int(uniforms[0] * (width - target[0] + 1)))
    top = min(height - target[1], int(uniforms[1] * (height - target[1] + 1)))
    return top, left


def upscaled(size: Size, bucket: Size) -> bool:
    """Whether an image of ``size`` is enlarged to cover ``bucket``."""
    return bucket[0] > size[0] or bucket[1] > size[1]
