"""prompt_template: instruction rows formatted as axolotl's alpaca, a user's own text, or the chat template; and
samples that format their prompts the same way and stop at the end of the turn."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from library.data.prompt_templates import ALPACA, ALPACA_WITH_INPUT, format_prompt
from library.data.text_data import IGNORE_INDEX
from library.errors import UserError
from library.families.llm import training_format
from library.text_samples import generate_text, prompt_ids, stop_token_ids
from tests.test_llm_data import _dataset, _ids, _jsonl, tok  # noqa: F401  (tok: the fixture)

ROW = {"instruction": "name a colour", "input": "", "output": "blue"}
ROW_WITH_INPUT = {"instruction": "translate to german", "input": "good morning", "output": "guten morgen"}
COLUMNS = 'prompt_column = "instruction"\ninput_column = "input"\nresponse_column = "output"'


def test_format_prompt_places_the_prompt_and_the_input():
    assert format_prompt(None, "q", "") == "q"
    assert format_prompt(None, "q", "x") == "q\n\nx"  # no template: Alpaca's blank-line join, nothing else
    assert format_prompt("alpaca", "q", " ") == ALPACA.replace("{prompt}", "q")
    assert format_prompt("alpaca", "q", "x") == ALPACA_WITH_INPUT.replace("{prompt}", "q").replace("{input}", "x")
    assert "### Input:" not in format_prompt("alpaca", "q") and "### Input:\nx\n" in format_prompt("alpaca", "q", "x")
    assert format_prompt("Q: {prompt}\nCtx: {input}\nA:", "q", None) == "Q: q\nCtx: \nA:"
    assert format_prompt("Q: {prompt}\nA:", "q", "x") == "Q: q\n\nx\nA:"  # no {input}: after the prompt
    # one pass: braces in the data, and JSON braces in the template, are left as they are
    assert format_prompt('{"q": "{prompt}"} {input}', "say {input}", "i") == '{"q": "say {input}"} i'


def test_an_alpaca_row_trains_on_the_alpaca_prompt_and_learns_only_the_response(tmp_path, tok):  # noqa: F811
    f = _jsonl(tmp_path / "a.jsonl", [ROW, ROW_WITH_INPUT])
    d = _dataset(tmp_path, f'jsonl_file = "{f}"\n{COLUMNS}\nprompt_template = "alpaca"',
                 "max_seq_length = 512\npacking = false", tok=tok)
    for sample, row in zip(d.train, (ROW, ROW_WITH_INPUT), strict=True):
        prompt = _ids(tok, format_prompt("alpaca", row["instruction"], row["input"]))  # this tokenizer adds no bos
        response = _ids(tok, row["output"]) + [tok.eos_token_id]
        assert sample.input_ids == prompt + response
        assert sample.labels == [IGNORE_INDEX] * len(prompt) + response
    assert "### Input:\ngood morning" in tok.decode(d.train[1].input_ids)
    assert "(instruct, prompt_template alpaca)" in "\n".join(d.summary())
    assert d.reports[0].prompt_template == "alpaca"


def test_without_a_template_the_summary_says_the_texts_are_joined_as_they_are(tmp_path, tok):  # noqa: F811
    d = _dataset(tmp_path, f'jsonl_file = "{_jsonl(tmp_path / "a.jsonl", [ROW])}"\n{COLUMNS}', tok=tok)
    assert "no prompt_template: prompt and response joined as they are" in "\n".join(d.summary())
    assert tok.decode(d.train[0].input_ids, skip_special_tokens=True) == "name a colourblue"


def test_prompt_template_chat_renders_the_row_as_a_conversation(tmp_path, tok):  # noqa: F811
    messages = [{"role": "user", "content": "translate to german\n\ngood morning"},
                {"role": "assistant", "content": "guten morgen"}]
    f = _jsonl(tmp_path / "c.jsonl", [{"messages": messages}])
    chat = _dataset(tmp_path, f'jsonl_file = "{f}"\nmessages_column = "messages"', tok=tok)
    rows = _dataset(tmp_path, f'jsonl_file = "{_jsonl(tmp_path / "a.jsonl", [ROW_WITH_INPUT])}"\n{COLUMNS}\n'
                    'prompt_template = "chat"', tok=tok)
    assert [(s.input_ids, s.labels) for s in rows.train] == [(s.input_ids, s.labels) for s in chat.train]
    learnt = tok.decode([t for t in rows.train[0].labels if t != IGNORE_INDEX])
    assert learnt.startswith("guten morgen") and "translate" not in learnt


_AT = r"prompt_template \(line \d+\): "


@pytest.mark.parametrize(("lines", "match"), [
    ('prompt_template = "### Question: {question}"',
     _AT + r"got .*expected \"chat\", \"alpaca\", or a text containing \{prompt\}"),
    ('prompt_template = ""', _AT + 'got "", expected a non-empty string'),
    ('messages_column = "m"\nprompt_template = "alpaca"',
     _AT + r"formats instruction rows; it goes with prompt_column \+ response_column \(chat rows use chat_template"),
])
def test_a_bad_prompt_template_names_the_key(tmp_path, tok, lines, match):  # noqa: F811
    f = _jsonl(tmp_path / "a.jsonl", [ROW])
    with pytest.raises(UserError, match=match):
        _dataset(tmp_path, f'jsonl_file = "{f}"\n{lines}', tok=tok)


def test_prompt_template_chat_without_any_chat_template_says_what_to_set(tmp_path, tok):  # noqa: F811
    tok.chat_template = None
    with pytest.raises(UserError, match='no chat template; set chat_template = .* or a text prompt_template such '
                                        'as "alpaca"'):
        _dataset(tmp_path, f'jsonl_file = "{_jsonl(tmp_path / "a.jsonl", [ROW])}"\n{COLUMNS}\n'
                 'prompt_template = "chat"', tok=tok)


def test_samples_follow_the_prompt_template():
    instruct = SimpleNamespace(format="instruct", chat_template=None, prompt_template="alpaca")
    assert training_format([instruct]) == ("prompt", "alpaca")
    assert training_format([instruct, SimpleNamespace(format="instruct", prompt_template=None)]) == ("raw", None)
    chat_rows = SimpleNamespace(format="instruct", chat_template=None, prompt_template="chat")
    assert training_format([chat_rows]) == ("chat", None)


def test_sample_prompt_ids_use_the_prompt_template(tok):  # noqa: F811
    ids = prompt_ids(tok, "name a colour", "prompt", "alpaca")
    assert ids == _ids(tok, format_prompt("alpaca", "name a colour"))


def _always(model, token: int) -> list[int]:
    """Make ``model`` answer ``token`` at every position; returns the list that counts its forward calls."""
    calls: list[int] = []

    def hook(_module, _inputs, output):
        calls.append(1)
        bias = torch.zeros(output.shape[-1], dtype=output.dtype)
        bias[token] = 1e4
        return output + bias

    model.lm_head.register_forward_hook(hook)
    return calls


def test_samples_stop_at_the_chat_templates_end_of_turn_token(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from library.tiny_llm import save_tiny_llm

    folder = save_tiny_llm(tmp_path / "model")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(str(folder)).eval(), AutoTokenizer.from_pretrained(folder)
    end = tokenizer.convert_tokens_to_ids("<|end|>")  # the tiny template's end of turn, not its eos
    assert end != tokenizer.eos_token_id and end in stop_token_ids(model, tokenizer)
    assert tokenizer.eos_token_id in stop_token_ids(model, tokenizer)
    assert end not in stop_token_ids(model, tokenizer, "raw")  # text data learns eos, not the template
    calls = _always(model, end)
    generate_text(model, tokenizer, "name a colour", 8)
    assert len(calls) == 1  # one forward: the first new token closes the turn
    calls.clear()
    generate_text(model, tokenizer, "name a colour", 8, "raw")
    assert len(calls) == 8


def test_the_adapter_card_says_how_to_prompt():
    from library.model_card import adapter_card

    meta = {"ss_output_name": "mine", "ss_network_dim": "8", "ss_steps": "12"}
    card = adapter_card("org/model", meta, [("prompt", "Q: {prompt}\nA:")], ["q_proj", "v_proj"])
    assert card.startswith('---\nbase_model: "org/model"\nlibrary_name: peft\n')
    assert "# mine" in card and "- rank: 8" in card and "- steps: 12" in card and "q_proj, v_proj" in card
    assert "```text\nQ: <your prompt>\nA:\n```" in card and "several formats" not in card
    assert "the tokenizer's chat template" in adapter_card("m", {}, [("chat", None)])
    assert "bare text" in adapter_card("m", {}, [("raw", None)])
    mixed = adapter_card("m", {}, [("chat", None), ("prompt", "alpaca")])  # as configs/llm_example_data.toml
    assert "several formats" in mixed and "apply_chat_template" in mixed and "### Instruction:" in mixed
    # an adapter trained over merged LoRAs says so: on the plain base model it would see other weights
    merged = adapter_card("m", {"ss_base_weights": '[{"name": "style.safetensors", "multiplier": 0.5}]'},
                          [("raw", None)])
    assert "## Base weights" in merged and "- `style.safetensors` × 0.5" in merged
    assert "Base weights" not in adapter_card("m", {}, [("raw", None)])


def test_subset_formats_lists_each_format_once():
    from library.families.llm import subset_formats

    chat = SimpleNamespace(format="chat", chat_template=None, prompt_template=None)
    alpaca = SimpleNamespace(format="instruct", chat_template=None, prompt_template="alpaca")
    text = SimpleNamespace(format="text", chat_template=None, prompt_template=None)
    assert subset_formats([chat, alpaca, chat, text]) == [("chat", None), ("prompt", "alpaca")]
    assert subset_formats([text]) == [("raw", None)]


def test_a_prompt_template_in_general_applies_to_the_instruction_subsets_only(tmp_path, tok):  # noqa: F811
    from library.data.text_config import load_text_dataset_config

    rows = _jsonl(tmp_path / "a.jsonl", [ROW])
    texts = _jsonl(tmp_path / "t.jsonl", [{"text": "plain words"}])
    chats = _jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                        {"role": "assistant", "content": "hello"}]}])
    (tmp_path / "plain.txt").write_text("more words\n", encoding="utf-8")
    (tmp_path / "d.toml").write_text(
        'general.prompt_template = "alpaca"\ngeneral.input_column = "input"\n[[datasets]]\n'
        f'[[datasets.subsets]]\njsonl_file = "{rows}"\nprompt_column = "instruction"\nresponse_column = "output"\n'
        f'[[datasets.subsets]]\njsonl_file = "{texts}"\n[[datasets.subsets]]\njsonl_file = "{chats}"\n'
        f'messages_column = "messages"\n[[datasets.subsets]]\ntext_file = "{tmp_path / "plain.txt"}"\n',
        encoding="utf-8")
    subsets = load_text_dataset_config(tmp_path / "d.toml").datasets[0].subsets
    assert [(s.format, s.prompt_template, s.input_column) for s in subsets] == [
        ("instruct", "alpaca", "input"), ("text", None, None), ("chat", None, None), ("text", None, None)]


def test_the_command_lines_validation_seed_decides_which_llm_rows_are_held_out(tmp_path, tok):  # noqa: F811
    from library.data.text_config import load_text_dataset_config
    from library.data.text_data import build_dataset

    rows = _jsonl(tmp_path / "t.jsonl", [{"text": f"row number {i}"} for i in range(20)])
    toml = f'[[datasets]]\nmax_seq_length = 64\n[[datasets.subsets]]\njsonl_file = "{rows}"\n'
    (tmp_path / "d.toml").write_text(toml, encoding="utf-8")

    def held_out(seed: int) -> list[str]:
        config = load_text_dataset_config(tmp_path / "d.toml", validation_split=0.25, validation_seed=seed)
        data = build_dataset(config.datasets[0], tok, seed=0)
        return sorted(tok.decode(s.input_ids, skip_special_tokens=True) for s in data.validation)

    assert len(held_out(1)) == 5 and held_out(1) == held_out(1)
    assert held_out(1) != held_out(2)
