"""One training sample as text, with the tokens the loss learns marked: what check_dataset shows per subset.

A template or label mask that is wrong (a missing separator, the prompt learnt, the end-of-turn token not
learnt) is invisible in counts but obvious in one rendered sample. Tokens in the loss are put between ⟦ and
⟧; special tokens are shown as they are (``<|im_end|>``, ``</s>``), so the end of each learnt turn is visible.
"""

from __future__ import annotations

from itertools import groupby
from typing import Any

IGNORE_INDEX = -100
OPEN, CLOSE = "⟦", "⟧"


def render_sample(input_ids: list[int], labels: list[int], tokenizer: Any, limit: int = 1200) -> str:
    """The decoded sample with the learnt runs of tokens marked; the middle elided past ``limit`` characters."""
    parts = []
    for learnt, run in groupby(zip(input_ids, labels, strict=True), key=lambda pair: pair[1] != IGNORE_INDEX):
        text = tokenizer.decode([token for token, _ in run], skip_special_tokens=False)
        parts.append(f"{OPEN}{text}{CLOSE}" if learnt else text)
    text = "".join(parts)
    if len(text) > limit:  # the answer is usually at the end: keep both ends
        half = limit // 2
        text = f"{text[:half]} … ({len(text) - 2 * half} characters) … {text[-half:]}"
    return text
