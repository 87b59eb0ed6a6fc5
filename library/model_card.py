"""README.md of an LLM adapter folder: what the adapter is and, above all, how to prompt it.

An adapter answers well only in the format its data was trained in; that format (a chat template, a
prompt_template, or the bare text) lives in the dataset TOML, which does not travel with the adapter.
The card states it, with the base model, rank, targets and length of training, and the lines that load
the folder with PEFT. The YAML header is the Hugging Face Hub's (``base_model``, ``library_name: peft``),
so an uploaded folder is listed as an adapter of its base model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from library.data.prompt_templates import format_prompt


def _prompt_section(kind: str, template: str | None) -> list[str]:
    if kind == "chat":
        where = ("the chat template in `chat_template.jinja` (this folder)" if template is not None
                 else "the tokenizer's chat template")
        return [f"Conversations rendered with {where}: prompt it with `apply_chat_template(messages, "
                "add_generation_prompt=True)`."]
    if kind == "prompt" and template is not None:
        example = format_prompt(template, "<your prompt>")
        return ["Instruction rows in this format; the answer follows it and ends with the end-of-sequence token:",
                "", "```text", example, "```"]
    return ["Text without a template (instruction rows joined as they are, or plain text): prompt it with the "
            "bare text."]


def _base_weights_section(recorded: str | None) -> list[str]:
    """``ss_base_weights``: LoRAs merged into the base model before training, which the adapter expects."""
    try:
        merged = json.loads(recorded) if recorded else []
    except json.JSONDecodeError:
        merged = []
    if not merged:
        return []
    lines = ["", "## Base weights", "", "Trained on the base model with these LoRAs merged in (`--base_weights`); "
             "merge them the same way first (`tools/merge.py --llm_model`), or the adapter sees other weights "
             "than it was trained on:", ""]
    return lines + [f"- `{entry.get('name')}` × {entry.get('multiplier')}" for entry in merged]


def adapter_card(base_model: str, metadata: Mapping[str, str], formats: list[tuple[str, str | None]],
                 targets: list[str] | None = None) -> str:
    """The card's Markdown, from the run's ``ss_*`` metadata, the data's prompt formats ((kind, template) per
    distinct subset format) and the adapter's target modules."""
    name = metadata.get("ss_output_name") or "LoRA adapter"
    facts = [("rank", metadata.get("ss_network_dim")), ("alpha", metadata.get("ss_network_alpha")),
             ("steps", metadata.get("ss_steps")), ("epochs", metadata.get("ss_epoch")),
             ("learning rate", metadata.get("ss_learning_rate"))]
    lines = ["---", f"base_model: {json.dumps(base_model)}", "library_name: peft", "tags:", "- lora",
             "- train_network", "---", "", f"# {name}", "",
             f"A LoRA adapter for `{base_model}`, trained with this toolkit's `train_network.py`.", ""]
    lines += [f"- {label}: {value}" for label, value in facts if value not in (None, "", "None")]
    if targets:
        lines.append(f"- target modules: {', '.join(targets)}")
    lines += ["", "## Prompt format", ""]
    if len(formats) > 1:
        lines += ["The training data had several formats; each works:", ""]
    for n, prompt_format in enumerate(formats):
        lines += (["", ""] if n else []) + _prompt_section(*prompt_format)
    lines += _base_weights_section(metadata.get("ss_base_weights"))
    lines += ["", "## Use", "", "```python", "from peft import PeftModel",
              "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f"model = AutoModelForCausalLM.from_pretrained({base_model!r})",
              "model = PeftModel.from_pretrained(model, \"path/to/this/folder\")",
              f"tokenizer = AutoTokenizer.from_pretrained({base_model!r})", "```", ""]
    return "\n".join(lines)
