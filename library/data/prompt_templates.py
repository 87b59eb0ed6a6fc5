"""How instruction rows (``prompt_column`` + ``response_column``) become one training text: ``prompt_template``.

Without a template the prompt and the response are joined as they are, as TRL's prompt/completion
data is; a dataset whose prompts carry no separator (Alpaca's ``instruction``) then trains the model to
answer straight after the question's last character. ``prompt_template`` sets the format:

- a string with ``{prompt}``: the prompt goes there and the response follows the template's text, e.g.
  ``"### Question:\\n{prompt}\\n\\n### Answer:\\n"``. ``{input}`` takes ``input_column``'s text ("" when the
  row has none); a template without ``{input}`` gets the input after the prompt and a blank line. Only
  these two placeholders are replaced, so other braces (JSON) stay as written.
- ``"alpaca"``: the Stanford Alpaca prompt (its two variants, with and without an input), as axolotl's
  ``type: alpaca`` writes it.
- ``"chat"``: the row is a user turn and an assistant turn, rendered by the chat template
  (``chat_template`` or the tokenizer's), as LLaMA-Factory formats Alpaca data for an instruct model.

Samples during training (``--sample_prompts``) format each prompt the same way.
"""

from __future__ import annotations

import re

CHAT = "chat"
_ALPACA_HEAD = "Below is an instruction that describes a task"
ALPACA_WITH_INPUT = (f"{_ALPACA_HEAD}, paired with an input that provides further context. Write a response "
                     "that appropriately completes the request.\n\n### Instruction:\n{prompt}\n\n### Input:\n{input}"
                     "\n\n### Response:\n")
ALPACA = (f"{_ALPACA_HEAD}. Write a response that appropriately completes the request.\n\n### Instruction:\n"
          "{prompt}\n\n### Response:\n")
PRESETS = {"alpaca": ALPACA}


def check_prompt_template(value: str) -> str | None:
    """What a prompt_template must be, when ``value`` is not one (None when it is)."""
    if value in PRESETS or value == CHAT or "{prompt}" in value:
        return None
    return ('"chat", "alpaca", or a text containing {prompt} where the prompt goes, e.g. '
            '"### Question:\\n{prompt}\\n\\n### Answer:\\n"')


def format_prompt(template: str | None, prompt: str, input_text: str | None = None) -> str:
    """The text before the response: ``prompt`` (and the row's input, if any) placed into ``template``.

    ``template`` None joins the input after a blank line and adds nothing else (the response follows the
    prompt directly). Not for ``"chat"``, which the chat template renders.
    """
    has_input = bool(input_text and input_text.strip())
    if template == "alpaca":
        template = ALPACA_WITH_INPUT if has_input else ALPACA
    if has_input and (template is None or "{input}" not in template):
        # Alpaca's convention without an input section: the instruction, a blank line, the input
        prompt, input_text = f"{prompt}\n\n{input_text}", None
    if template is None:
        return prompt
    values = {"prompt": prompt, "input": input_text if has_input and input_text else ""}
    # One pass, so a prompt that itself contains "{input}" is not substituted into.
    return re.sub(r"\{(prompt|input)\}", lambda m: values[m.group(1)], template)
