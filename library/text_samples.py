"""Sample texts during LLM training: the ``--sample_prompts`` of a causal-LM run.

The same prompt files and schedule as sample images (library/sampling.py). Each prompt is formatted as the
training data was: one user turn of the chat template, the dataset's prompt_template, or the bare text; it is
answered greedily up to the end of the turn, so the texts of successive sampling points differ only by what
the LoRA learned. ``--s`` sets the number of new tokens (default 128); image options (``--w``, ``--h``,
``--n``, ``--l``, ``--ss``, ``--d``) mean nothing here and are named in the log when a prompt sets them.

Written to ``{sample folder}/{output_name}_{step:06d}.txt`` (atomically) and to the trackers as text
(tensorboard's text tab, wandb), ``sample/NN`` per prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from library.data.prompt_templates import format_prompt
from library.fileio import atomic_write

DEFAULT_NEW_TOKENS = 128
_IMAGE_ONLY = {"negative_prompt": "--n", "width": "--w", "height": "--h", "scale": "--l", "sample_sampler": "--ss",
               "seed": "--d"}


def image_only_options(prompt: Any, defaults: Any) -> list[str]:
    """The image options a prompt sets (differing from ``defaults``, a SamplePrompt with only a prompt)."""
    return [flag for key, flag in _IMAGE_ONLY.items()
            if key != "sample_sampler" and getattr(prompt, key) != getattr(defaults, key)]


def prompt_ids(tokenizer: Any, text: str, kind: str = "chat", template: str | None = None) -> list[int]:
    """Token ids of one user turn as training formatted its data: the chat template (``template``, else the
    tokenizer's own) with the assistant's turn opened; the prompt_template (``kind`` "prompt", ``template`` the
    prompt_template); or the raw text (``kind`` "raw", or no chat template)."""
    if kind == "chat" and (template or getattr(tokenizer, "chat_template", None)):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True, chat_template=template)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    if kind == "prompt" and template is not None:
        text = format_prompt(template, text)
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def stop_token_ids(model: Any, tokenizer: Any, kind: str = "chat", template: str | None = None) -> list[int]:
    """Where a sample ends: the model's and the tokenizer's end-of-sequence tokens and, for chat data, the
    chat template's end-of-turn token (Llama 3's ``<|eot_id|>``, ChatML's ``<|im_end|>``) when it is a special
    token. A base model trained with a ChatML template learns to close its turn with ``<|im_end|>``, which its
    generation config does not know, so without it every sample ran to ``--s`` tokens."""
    found: list[int] = []
    config = getattr(model, "generation_config", None)
    for value in (getattr(config, "eos_token_id", None), tokenizer.eos_token_id):
        found += [value] if isinstance(value, int) else list(value or [])
    if kind == "chat" and (template or getattr(tokenizer, "chat_template", None)):
        try:
            probe = tokenizer.apply_chat_template([{"role": "user", "content": "\x01"},
                                                   {"role": "assistant", "content": "\x02"}],
                                                  tokenize=False, chat_template=template)
        except Exception:  # a template that refuses the probe just has no known end-of-turn token
            probe = ""
        tail = probe[probe.rindex("\x02") + 1:].strip() if "\x02" in probe else ""
        ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
        if ids and ids[0] in set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values()):
            found.append(ids[0])
    return list(dict.fromkeys(found))


@torch.no_grad()
def generate_text(model: Any, tokenizer: Any, text: str, max_new_tokens: int, kind: str = "chat",
                  template: str | None = None) -> str:
    """The greedy continuation of one prompt (new tokens only, special tokens dropped), formatted as training
    formatted its data (:func:`prompt_ids`), up to the end of the turn (:func:`stop_token_ids`)."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids(tokenizer, text, kind, template)], device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         use_cache=True, pad_token_id=pad,
                         eos_token_id=stop_token_ids(model, tokenizer, kind, template) or None)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def write_text_samples(prompts: list[Any], generate: Callable[[str, int], str], folder: Path, output_name: str,
                       step: int, log_values: Callable[[dict[str, str]], None],
                       log: Callable[[str], None]) -> Path | None:
    """Generate every prompt, write one text file for this step and log each sample; None when all failed."""
    sections, values = [f"# samples at training step {step}"], {}
    for prompt in prompts:
        new_tokens = prompt.sample_steps or DEFAULT_NEW_TOKENS
        try:
            text = generate(prompt.prompt, new_tokens)
        except Exception as e:  # one bad prompt (length, OOM) must not stop training
            log(f"sample {prompt.index} failed at step {step} ({prompt.where}: {prompt.prompt!r}): "
                f"{type(e).__name__}: {e}; training continues")
            continue
        sections.append(f"\n## prompt {prompt.index} ({new_tokens} new tokens)\n{prompt.prompt}\n\n## sample\n{text}\n")
        values[f"sample/{prompt.index:02d}"] = f"{prompt.prompt}\n\n→ {text}"
    if not values:
        return None
    path = folder / f"{output_name}_{step:06d}.txt"
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        f.write("\n".join(sections).encode("utf-8"))
    try:
        log_values(values)
    except Exception as e:  # a tracker problem must not stop training either
        log(f"logging sample texts to the trackers failed: {type(e).__name__}: {e}")
    return path
