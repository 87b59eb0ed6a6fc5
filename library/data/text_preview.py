"""One training sample as text, with the tokens the loss learns marked: what check_dataset shows per subset.

A template or label mask that is wrong (a missing separator, the prompt learnt, the end-of-turn token not
learnt) is invisible in counts but obvious in one rendered sample. Tokens in the loss are put between ⟦ and
⟧ (never a sample's first token, which nothing predicts); special tokens are shown as they are
(``<|im_end|>``, ``</s>``), so the end of each learnt turn is visible.
"""

from __future__ import annotations

from functools import partial
from itertools import groupby
from typing import Any

IGNORE_INDEX = -100
OPEN, CLOSE = "⟦", "⟧"


def render_sample(input_ids: list[int], labels: list[int], tokenizer: Any, limit: int = 1200) -> str:
    """The decoded sample with the learnt runs of tokens marked; the middle elided past ``limit`` characters.

    The whole sample is decoded once and cut where the runs meet (each cut from the decoded prefix):
    SentencePiece decoders (Llama 2, Mistral, Gemma) drop the leading space of a text decoded on its own, so
    decoding run by run would show a missing separator that is not in the data.
    """
    decode = partial(tokenizer.decode, skip_special_tokens=False)
    # The first token is never predicted (each label is the next token after a position): a plain-text
    # sample's labels include it, but the loss does not, so it is not marked.
    labels = [IGNORE_INDEX, *labels[1:]] if labels else labels
    runs = [(learnt, len(list(run))) for learnt, run in groupby(labels, key=lambda label: label != IGNORE_INDEX)]
    whole, parts, start, done = decode(input_ids), [], 0, 0
    for learnt, length in runs:
        done += length
        end = len(whole) if done == len(input_ids) else len(decode(input_ids[:done]))
        end = min(max(end, start), len(whole))  # a prefix's decoding may end mid-character: keep cuts in order
        parts.append(f"{OPEN}{whole[start:end]}{CLOSE}" if learnt else whole[start:end])
        start = end
    text = "".join(parts)
    if len(text) > limit:  # the answer is usually at the end: keep both ends
        half = limit // 2
        text = f"{text[:half]} … ({len(text) - 2 * half} characters) … {text[-half:]}"
    return text
