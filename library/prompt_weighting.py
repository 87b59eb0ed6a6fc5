"""A1111 attention syntax in sample prompts: ``(word:1.2)``, ``(word)``, ``[word]``, escapes and ``BREAK``.

Users paste prompts from AUTOMATIC1111's web UI into their sample prompt files, and sd-scripts' sampling
pipeline honours the weights, so ours does too. The semantics are A1111's:

- ``(text)`` multiplies the weight of ``text`` by 1.1, ``[text]`` divides it by 1.1, ``(text:1.5)`` multiplies
  it by 1.5; brackets nest and their factors multiply (``((a))`` is 1.21);
- ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are the literal characters; a bracket with no opening partner is plain
  text, and a bracket left open applies to the end of the prompt;
- ``BREAK`` (upper case, a whole word) pads the current 75-token chunk and starts the next one.

Each token's hidden state is multiplied by its weight, then the prompt's embedding is rescaled so that its mean
equals the unweighted mean (A1111 and sd-scripts both do this; it keeps the overall magnitude the UNet saw in
training). Chunks follow training's layout (library/families/diffusion_parts.py ``token_chunks``), so a prompt
without any of this syntax is encoded exactly as a training caption is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

CHUNK = 75  # text tokens per chunk: CLIP's 77 positions less <bos> and the end token
MAX_CHUNKS = 3  # 225 tokens, the longest --max_token_length; prompts with BREAK may use this many
ROUND, SQUARE = 1.1, 1 / 1.1

# One lexical token of the syntax per match; the weight group is set only for ":<number>)".
_SYNTAX = re.compile(r"""
    \\[\\()\[\]]                                   # an escaped bracket or backslash: the literal character
  | [(\[]                                          # an opening bracket
  | :\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)         # ":1.2)": closes a round bracket with that weight
  | [)\]]                                          # a closing bracket
  | [^\\()\[\]:]+                                  # plain text
  | [\\:]                                          # a lone ':' or '\' is plain text too
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")

Sections = list[list[tuple[str, float]]]


def parse_attention(text: str) -> Sections:
    """The prompt's ``BREAK``-separated sections, each a list of (text, weight) runs; neighbouring runs of the
    same weight are joined, so plain text is one run of weight 1.0."""
    items: list[list[Any] | None] = []  # [text, weight], or None where a BREAK is
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for item in items[start:]:
            if item is not None:
                item[1] *= factor

    for match in _SYNTAX.finditer(text):
        token, weight = match.group(0), match.group(1)
        if len(token) == 2 and token[0] == "\\":
            items.append([token[1], 1.0])
        elif token in "([":
            (round_open if token == "(" else square_open).append(len(items))
        elif weight is not None and round_open:
            scale(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            scale(round_open.pop(), ROUND)
        elif token == "]" and square_open:
            scale(square_open.pop(), SQUARE)
        else:  # text, or a closing bracket (or ":1.2)") with nothing to close: A1111 keeps it as text
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    items.append(None)
                items.append([part, 1.0])
    # Brackets never closed weigh everything after them, as in A1111.
    for start in round_open:
        scale(start, ROUND)
    for start in square_open:
        scale(start, SQUARE)

    sections: Sections = [[]]
    for item in items:
        if item is None:
            sections.append([])
        elif item[0]:
            runs = sections[-1]
            if runs and runs[-1][1] == item[1]:
                runs[-1] = (runs[-1][0] + item[0], item[1])
            else:
                runs.append((item[0], item[1]))
    return sections


def chunk_budget(max_token_length: int | None) -> int:
    """Chunks that training encodes a caption in: 1, or 2 / 3 for --max_token_length 150 / 225."""
    return max(1, (max_token_length or CHUNK) // CHUNK)


@dataclass
class WeightedChunk:
    """One chunk's text tokens (at most 75, no <bos> / end token) and their weights."""

    ids: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


def weighted_chunks(tokenizer: Any, text: str, max_token_length: int | None,
                    break_extends: bool = True) -> list[WeightedChunk]:
    """The prompt's tokens in chunks of 75, each ``BREAK`` starting a new chunk.

    A prompt is cut where a training caption would be (``chunk_budget``); with ``break_extends`` (sample prompts)
    one with ``BREAK`` may use up to three chunks, since otherwise everything after a BREAK would be lost at the
    default 75 tokens. Training captions keep the budget (every caption of a batch, and of a text-encoder
    cache, must have the same length).
    """
    sections = parse_attention(text)
    budget = chunk_budget(max_token_length)
    limit = max(budget, MAX_CHUNKS) if break_extends and len(sections) > 1 else budget
    chunks: list[WeightedChunk] = []
    for runs in sections:
        chunks.append(WeightedChunk())
        if not runs:
            continue
        # Runs are tokenized apart (as A1111 does); plain text is one run, so it gets the caption's exact tokens.
        encoded = tokenizer([run for run, _ in runs], add_special_tokens=False, verbose=False).input_ids
        for ids, (_, weight) in zip(encoded, runs, strict=True):
            for token in ids:
                if len(chunks[-1].ids) == CHUNK:
                    chunks.append(WeightedChunk())
                chunks[-1].ids.append(token)
                chunks[-1].weights.append(weight)
    return chunks[:limit]


def encoder_inputs(tokenizer: Any, prompts: list[list[WeightedChunk]], count: int,
                   device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Token ids for the encoder, one [B, 77] tensor per chunk, and per-token weights [B, 2 + 75 * count] for
    the merged sequence (library/families/diffusion_parts.py ``merge_chunks``).

    ``count`` is the number of chunks every prompt gets (the pipeline needs the prompt and the negative prompt
    the same length): missing ones are empty. The layout is ``token_chunks``' (<bos>, text, <eos>, <pad>s; a
    full chunk ends in <eos>), so unweighted prompts are encoded exactly as training captions are.
    """
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    ids = torch.full((count, len(prompts), CHUNK + 2), pad, dtype=torch.long)
    weights = torch.ones(len(prompts), 2 + CHUNK * count)
    for row, chunks in enumerate(prompts):
        for i in range(count):
            chunk = chunks[i] if i < len(chunks) else WeightedChunk()
            size = len(chunk.ids)
            ids[i, row, 0] = bos
            ids[i, row, 1:1 + size] = torch.tensor(chunk.ids, dtype=torch.long)
            ids[i, row, 1 + size] = eos  # after the text; in a full chunk, the end token
            weights[row, 1 + CHUNK * i:1 + CHUNK * i + size] = torch.tensor(chunk.weights)
    return [chunk.to(device) for chunk in ids], weights.to(device)


def apply_weights(hidden: torch.Tensor, weights: torch.Tensor, rescale: bool = True) -> torch.Tensor:
    """Hidden states [B, L, D] times the token weights [B, L], each prompt rescaled to its unweighted mean.

    A prompt whose weights are all 1.0 is returned untouched (bit for bit). The rescale is skipped where the
    weighted mean is zero or of the other sign (negative weights): the factor would blow up or flip every token.
    ``rescale=False`` (training captions, as sd-scripts' training encodes them): the weights alone.
    """
    rows = []
    for h, w in zip(hidden, weights.to(hidden.device), strict=True):
        if bool((w == 1).all()):
            rows.append(h)
            continue
        h32 = h.float()
        weighted = h32 * w[:, None].float()
        ratio = h32.mean() / weighted.mean()
        if rescale and bool(torch.isfinite(ratio)) and ratio > 0:
            weighted = weighted * ratio
        rows.append(weighted.to(h.dtype))
    return torch.stack(rows)
