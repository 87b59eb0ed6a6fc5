"""Caption reading and per-sample caption augmentation, as pure functions.

Randomness comes only from the ``random.Random`` passed in (the dataset seeds it from
(seed, epoch, sample index)), so a caption is the same on every process and on resume.

Order of operations, as in sd-scripts: prefix/suffix → whole-caption dropout → wildcards (one
line of a multi-line caption, one choice of each ``{a|b|c}``) → split into tags (fixed part by
``keep_tokens`` or ``keep_tokens_separator``) → shuffle the flexible tags → tag dropout → join →
``secondary_separator`` replaced by the separator (tags joined by it move and drop as one).
Differences from sd-scripts, on purpose:
- empty tags ("a,,b") are dropped instead of kept as empty strings;
- the tags are joined with the separator plus a space (", " for the default ","), where
  sd-scripts always joins with ", " whatever the separator;
- a ``keep_tokens_separator`` is removed from the caption even when nothing is shuffled
  (sd-scripts leaves "|||" in the text then);
- ``secondary_separator`` becomes the separator as tags are joined here (", " for ","), where
  sd-scripts puts the bare separator (",").
"""

from __future__ import annotations

import codecs
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from library.errors import UserError

# Files next to images that share an image's name but are not captions: sd-scripts' latent
# caches, editor sidecars, metadata. Left out of the "other caption extensions" hint, which
# would otherwise tell a user with cached .npz latents to set caption_extension = ".npz".
_NOT_CAPTIONS = frozenset((".npz", ".safetensors", ".pt", ".json", ".toml", ".yaml", ".yml", ".xmp", ".gif",
                           ".tif", ".tiff", ".psd", ".avif", ".heic"))  # fmt: skip


@dataclass(frozen=True)
class CaptionOptions:
    """A subset's caption settings (kohya's names without the ``caption_`` prefix)."""

    prefix: str | None = None
    suffix: str | None = None
    shuffle: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    separator: str = ","
    dropout_rate: float = 0.0
    tag_dropout_rate: float = 0.0
    dropout_every_n_epochs: int = 0
    secondary_separator: str = ""
    enable_wildcard: bool = False


def caption_path(image_path: Path, extension: str) -> Path:
    """The side file of an image: same folder and stem, ``extension`` (with its dot)."""
    return image_path.with_name(image_path.stem + extension)


def read_utf8(path: Path) -> str:
    """A text file's contents; one that is not UTF-8 is a UserError naming the file and the byte.

    Captions are UTF-8 as in sd-scripts (which stops on anything else too); guessing another
    encoding could silently train on mojibake. A leading BOM (Windows editors) is dropped.
    """
    raw = path.read_bytes()
    body = raw.removeprefix(codecs.BOM_UTF8)
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        position = exc.start + len(raw) - len(body)  # in the file as a hex editor shows it, BOM included
        raise UserError(
            f"{path}: not UTF-8 (byte 0x{body[exc.start]:02x} at position {position}); re-save it as UTF-8"
        ) from None


def read_caption_file(path: Path, all_lines: bool = False) -> str | None:
    """The first non-empty line of a caption file, stripped; None when the file does not exist.

    With ``all_lines`` (``enable_wildcard``: one line is chosen per sample), every non-empty line,
    stripped, joined by newlines. An existing but empty file gives "" (an explicit empty caption), not None.
    """
    try:
        text = read_utf8(path)
    except FileNotFoundError:
        return None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if all_lines:
        return "\n".join(lines)
    return lines[0] if lines else ""


def image_caption(image_path: Path, extension: str, class_tokens: str | None) -> str | None:
    """The caption from the side file, else ``class_tokens``, else None (the dataset reports it)."""
    caption = read_caption_file(caption_path(image_path, extension))
    return caption if caption is not None else class_tokens


def other_caption_extensions(images: Sequence[Path], extension: str) -> Counter[str]:
    """Extensions of files named like ``images`` (same folder and stem) other than ``extension``.

    The caption files a user meant when ``extension`` finds none (``.txt`` next to images while
    caption_extension is ``.caption``); image files and known non-caption files are left out.
    """
    # imported here: dataset_config imports this module, and pixels brings PIL, numpy and torch
    from library.data.pixels import IMAGE_EXTENSIONS

    found: Counter[str] = Counter()
    for folder in sorted({p.parent for p in images}):
        stems = {p.stem for p in images if p.parent == folder}
        found.update(
            p.suffix
            for p in folder.iterdir()
            if p.stem in stems and p.suffix and p.suffix != extension and p.suffix.lower() not in _NOT_CAPTIONS
            and p.suffix.lower() not in IMAGE_EXTENSIONS and p.is_file()
        )  # fmt: skip
    return found


def caption_extension_hint(found: Counter[str]) -> str:
    """'.txt found for 2 images; set caption_extension = ".txt"' (the commonest first); "" for none."""
    if not found:
        return ""
    listing = ", ".join(f"{suffix} found for {n} image{'s' if n != 1 else ''}" for suffix, n in found.most_common())
    return f'{listing}; set caption_extension = "{found.most_common(1)[0][0]}"'


def add_prefix_suffix(caption: str, prefix: str | None, suffix: str | None) -> str:
    """sd-scripts joins prefix and suffix with a space, so a prefix merges into the first tag."""
    if prefix:
        caption = f"{prefix} {caption}"
    if suffix:
        caption = f"{caption} {suffix}"
    return caption


def split_tags(text: str, separator: str) -> list[str]:
    """Tags of a caption, stripped, empty ones dropped."""
    return [tag.strip() for tag in text.split(separator) if tag.strip()]


def join_tags(tags: Iterable[str], separator: str) -> str:
    joiner = separator if separator.isspace() or separator.endswith(" ") else separator + " "
    return joiner.join(tags)


def is_dropped_out(rng: random.Random, rate: float, epoch_number: int, every_n_epochs: int) -> bool:
    """Whole-caption dropout; ``epoch_number`` counts from 1, so every_n_epochs=2 drops epochs 2, 4, ...

    The random draw happens only when ``rate`` > 0, so turning dropout off does not shift the
    draws that follow.
    """
    dropped = rate > 0 and rng.random() < rate
    return dropped or (every_n_epochs > 0 and epoch_number % every_n_epochs == 0)


def _fixed_and_flexible(caption: str, options: CaptionOptions) -> tuple[list[str], list[str], list[str]]:
    """(fixed head, shuffleable middle, fixed tail) tags."""
    sep = options.separator
    marker = options.keep_tokens_separator
    if marker and marker in caption:
        # "head ||| flexible ||| tail": the optional second marker pins tags at the end.
        head, rest = caption.split(marker, 1)
        middle, _, tail = rest.partition(marker)
        return split_tags(head, sep), split_tags(middle, sep), split_tags(tail.replace(marker, sep), sep)
    tags = split_tags(caption, sep)
    return tags[: options.keep_tokens], tags[options.keep_tokens :], []


def shuffle_and_drop_tags(caption: str, options: CaptionOptions, rng: random.Random) -> str:
    """Shuffle the flexible tags and drop each with ``tag_dropout_rate``; fixed tags stay in place."""
    marker_used = bool(options.keep_tokens_separator) and options.keep_tokens_separator in caption
    if not (options.shuffle or options.tag_dropout_rate > 0 or marker_used):
        return caption  # left exactly as written
    head, middle, tail = _fixed_and_flexible(caption, options)
    if options.shuffle:
        rng.shuffle(middle)
    if options.tag_dropout_rate > 0:
        middle = [tag for tag in middle if rng.random() >= options.tag_dropout_rate]
    return join_tags(head + middle + tail, options.separator)


_WILDCARD = re.compile(r"\{([^{}]+)\}")  # "{}" stays as written, as in sd-scripts


def choose_wildcards(caption: str, rng: random.Random) -> str:
    """One non-empty line of a multi-line caption, then one option of each ``{a|b|c}``; ``{{`` / ``}}`` are
    literal braces. Draws happen only for what is there, so a plain caption takes none."""
    lines = [line.strip() for line in caption.splitlines() if line.strip()]
    if len(lines) > 1:
        caption = rng.choice(lines)
    elif lines:
        caption = lines[0]
    # Literal braces are set aside first so "{{a|b}}" stays "{a|b}" rather than becoming a choice.
    left, right = "\x00", "\x01"
    caption = caption.replace("{{", left).replace("}}", right)
    caption = _WILDCARD.sub(lambda m: rng.choice(m.group(1).split("|")), caption)
    return caption.replace(left, "{").replace(right, "}")


def process_caption(caption: str, options: CaptionOptions, rng: random.Random, epoch_number: int) -> str:
    """The caption one sample trains with this epoch (``epoch_number`` counts from 1)."""
    caption = add_prefix_suffix(caption, options.prefix, options.suffix)
    if is_dropped_out(rng, options.dropout_rate, epoch_number, options.dropout_every_n_epochs):
        return ""
    if options.enable_wildcard:
        caption = choose_wildcards(caption, rng)
    caption = shuffle_and_drop_tags(caption, options, rng)
    if options.secondary_separator:
        caption = caption.replace(options.secondary_separator, join_tags(["", ""], options.separator))
    return caption


def count_tags(captions: Iterable[str], separator: str = ",") -> dict[str, int]:
    """How often each tag occurs over the captions (``ss_tag_frequency``, counted like sd-scripts)."""
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(split_tags(caption, separator))
    return dict(sorted(counts.items()))
