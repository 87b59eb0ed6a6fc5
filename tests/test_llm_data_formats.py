"""LLM data files as TRL / axolotl / LLaMA-Factory users have them: JSON arrays, gzip, ShareGPT, content parts."""

from __future__ import annotations

import gzip
import json

import pytest

from library.errors import UserError
from tests.test_llm_data import _dataset, _jsonl, tok  # noqa: F401  (tok: the fixture)

CHAT = [{"role": "user", "content": "count to three"}, {"role": "assistant", "content": "one two three"}]


def _same_samples(a, b) -> bool:
    return [(s.input_ids, s.labels) for s in a.train] == [(s.input_ids, s.labels) for s in b.train]


def test_a_json_array_and_gzipped_json_lines_read_as_json_lines(tmp_path, tok):  # noqa: F811
    rows = [{"messages": CHAT}, {"messages": CHAT[:1] + [{"role": "assistant", "content": "four"}]}]
    reference = _dataset(tmp_path, f'jsonl_file = "{_jsonl(tmp_path / "c.jsonl", rows)}"\n'
                         'messages_column = "messages"', tok=tok)
    (tmp_path / "c.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    with gzip.open(tmp_path / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("c.json", "c.jsonl.gz"):
        other = _dataset(tmp_path, f'jsonl_file = "{tmp_path / name}"\nmessages_column = "messages"', tok=tok)
        assert len(reference.train) == 2 and _same_samples(reference, other), name


def test_a_json_file_that_is_not_an_array_says_what_to_do(tmp_path, tok):  # noqa: F811
    (tmp_path / "one.json").write_text('{"text": "a"}\n{"text": "b"}\n', encoding="utf-8")
    with pytest.raises(UserError, match="one object per line is JSON Lines: name it .jsonl"):
        _dataset(tmp_path, f'jsonl_file = "{tmp_path / "one.json"}"', tok=tok)


@pytest.mark.parametrize("name", ["train.parquet", "saved_dataset"])
def test_parquet_and_dataset_folders_are_refused_with_a_conversion(tmp_path, tok, name):  # noqa: F811
    path = tmp_path / name
    path.mkdir() if "." not in name else path.write_bytes(b"PAR1")
    with pytest.raises(UserError, match=r"jsonl_file reads JSON Lines .*convert it to JSON Lines"):
        _dataset(tmp_path, f'jsonl_file = "{path}"', tok=tok)


def test_sharegpt_turns_and_text_parts_train_like_openai_messages(tmp_path, tok):  # noqa: F811
    reference = _dataset(tmp_path, f'jsonl_file = "{_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])}"\n'
                         'messages_column = "messages"', tok=tok)
    sharegpt = [{"conversations": [{"from": "human", "value": "count to three"},
                                   {"from": "gpt", "value": "one two three"}]}]
    parts = [{"messages": [{"role": "user", "content": [{"type": "text", "text": "count to "},
                                                        {"type": "text", "text": "three"}]},
                           {"role": "assistant", "content": "one two three"}]}]
    for rows, column in ((sharegpt, "conversations"), (parts, "messages")):
        other = _dataset(tmp_path, f'jsonl_file = "{_jsonl(tmp_path / "o.jsonl", rows)}"\n'
                         f'messages_column = "{column}"', tok=tok)
        assert _same_samples(reference, other), column


def test_an_unknown_sharegpt_speaker_is_named(tmp_path, tok):  # noqa: F811
    rows = [{"conversations": [{"from": "narrator", "value": "x"}, {"from": "gpt", "value": "y"}]}]
    with pytest.raises(UserError, match="ShareGPT speaker 'narrator' is not one of human"):
        _dataset(tmp_path, f'jsonl_file = "{_jsonl(tmp_path / "s.jsonl", rows)}"\nmessages_column = "conversations"',
                 tok=tok)


@pytest.mark.parametrize("row, hint", [
    ({"messages": CHAT}, 'set messages_column = "messages"'),
    ({"prompt": "a", "completion": "b"}, 'prompt_column = "prompt" and response_column = "completion"'),
    ({"instruction": "a", "input": "", "output": "b"}, 'input_column = "input"'),
])
def test_a_missing_text_column_suggests_the_key_the_row_needs(tmp_path, tok, row, hint):  # noqa: F811
    with pytest.raises(UserError, match=hint):
        _dataset(tmp_path, f'jsonl_file = "{_jsonl(tmp_path / "r.jsonl", [row])}"', tok=tok)


# Like Qwen3's: the last assistant turn gets a marker the earlier ones lose, so renderings are not prefixes.
LAST_TURN_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n"
    "{% if m['role'] == 'assistant' and loop.last %}<|system|>{% endif %}{{ m['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def test_multi_turn_chat_with_a_last_turn_template_learns_every_assistant_turn(tmp_path, tok):  # noqa: F811
    import torch

    from library.data.text_data import IGNORE_INDEX

    (tmp_path / "t.jinja").write_text(LAST_TURN_TEMPLATE, encoding="utf-8")
    messages = [*CHAT, {"role": "user", "content": "and on?"}, {"role": "assistant", "content": "four five"}]
    d = _dataset(tmp_path, f'jsonl_file = "{_jsonl(tmp_path / "c.jsonl", [{"messages": messages}])}"\n'
                 f'messages_column = "messages"\nchat_template = "{tmp_path / "t.jinja"}"', tok=tok)
    (sample,) = d.train
    pieces = [("<s><|user|>\ncount to three<|end|>\n<|assistant|>\n", False), ("one two three<|end|>\n", True),
              ("<|user|>\nand on?<|end|>\n<|assistant|>\n<|system|>", False), ("four five<|end|>\n", True)]
    ids, labels = [], []
    for text, learnt in pieces:
        piece = tok(text, add_special_tokens=False).input_ids
        ids += piece
        labels += piece if learnt else [IGNORE_INDEX] * len(piece)
    assert sample.input_ids == ids
    assert torch.equal(torch.tensor(sample.labels), torch.tensor(labels))


# As Qwen3's: earlier assistant turns lose their reasoning, the last one keeps it re-rendered in <think> tags.
THINK_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{% if m['role'] == 'assistant' %}"
    "{% set answer = m['content'].split('</think>')[-1].lstrip('\\n') %}{% if loop.last %}"
    "{% set r = m['content'].split('</think>')[0].split('<think>')[-1].strip('\\n') %}<think>\n{{ r }}\n</think>\n\n"
    "{% endif %}{{ answer }}{% else %}{{ m['content'] }}{% endif %}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def test_a_template_that_drops_earlier_reasoning_learns_the_turn_that_keeps_it(tmp_path, tok):  # noqa: F811
    from library.data.text_data import IGNORE_INDEX

    (tmp_path / "t.jinja").write_text(THINK_TEMPLATE, encoding="utf-8")
    messages = [{"role": "user", "content": "count to three"},
                {"role": "assistant", "content": "<think>easy</think>one two three"},
                {"role": "user", "content": "and on?"},
                {"role": "assistant", "content": "<think>\ncount on\n</think>\n\nfour five"}]
    d = _dataset(tmp_path, f'jsonl_file = "{_jsonl(tmp_path / "c.jsonl", [{"messages": messages}])}"\n'
                 f'messages_column = "messages"\nchat_template = "{tmp_path / "t.jinja"}"', tok=tok)
    (sample,) = d.train
    text = tok.decode(sample.input_ids)
    assert "easy" not in text and "<think>\ncount on\n</think>\n\nfour five<|end|>" in text
    runs, current = [], []
    for token, label in zip(sample.input_ids, sample.labels, strict=True):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs, current = [*runs, tok.decode(current)], []
    runs += [tok.decode(current)] if current else []
    # the first answer, rendered without its reasoning, is context: learning it would teach skipping <think>
    assert runs == ["<think>\ncount on\n</think>\n\nfour five<|end|>\n"]


def _learnt_runs(tokenizer, sample) -> list[str]:
    from library.data.text_data import IGNORE_INDEX

    runs, current = [], []
    for token, label in [*zip(sample.input_ids, sample.labels, strict=True), (None, IGNORE_INDEX)]:
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs, current = [*runs, tokenizer.decode(current)], []
    return runs


@pytest.mark.parametrize(("reasoning", "answer"), [("two and two make four", "four"), ("the first letter", "a")])
def test_a_reasoning_that_mentions_the_answer_is_not_taken_for_it(tmp_path, tok, reasoning, answer):  # noqa: F811
    # written without the newlines the template adds, after an earlier exchange (so renderings are no prefixes
    # of each other): the turn is found by its parts
    (tmp_path / "t.jinja").write_text(THINK_TEMPLATE, encoding="utf-8")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>greet</think>hello"},
                {"role": "user", "content": "what is two plus two?"},
                {"role": "assistant", "content": f"<think>{reasoning}</think>{answer}"}]
    d = _dataset(tmp_path, f'jsonl_file = "{_jsonl(tmp_path / "c.jsonl", [{"messages": messages}])}"\n'
                 f'messages_column = "messages"\nchat_template = "{tmp_path / "t.jinja"}"', tok=tok)
    assert _learnt_runs(tok, d.train[0]) == [f"<think>\n{reasoning}\n</think>\n\n{answer}<|end|>\n"]


def test_a_template_that_drops_the_last_turns_reasoning_says_what_to_do(tmp_path, tok):  # noqa: F811
    # As DeepSeek-R1's: every turn loses its reasoning, so the data's reasoning could never be learnt
    r1 = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
          "{% else %}{% set c = m['content'] %}{% if '</think>' in c %}{% set c = c.split('</think>')[-1] %}"
          "{% endif %}<|assistant|>{{ c }}<|end|>{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}")
    (tmp_path / "r1.jinja").write_text(r1, encoding="utf-8")
    messages = [{"role": "user", "content": "two plus two?"},
                {"role": "assistant", "content": "<think>\nadd them\n</think>\n\nfour"}]
    with pytest.raises(UserError, match="c.jsonl:1: the chat template drops the <think> reasoning of the last "
                                        "assistant turn.*chat_template"):
        _dataset(tmp_path, f'jsonl_file = "{_jsonl(tmp_path / "c.jsonl", [{"messages": messages}])}"\n'
                 f'messages_column = "messages"\nchat_template = "{tmp_path / "r1.jinja"}"', tok=tok)


def test_an_assistant_turn_with_weight_zero_is_not_learnt(tmp_path, tok):  # noqa: F811
    from library.data.text_data import IGNORE_INDEX

    messages = [{"role": "user", "content": "count to three"},
                {"role": "assistant", "content": "wrong answer", "weight": 0},
                {"role": "user", "content": "again"}, {"role": "assistant", "content": "one two three"}]
    d = _dataset(tmp_path, f'jsonl_file = "{_jsonl(tmp_path / "w.jsonl", [{"messages": messages}])}"\n'
                 'messages_column = "messages"', tok=tok)
    (sample,) = d.train
    learnt = tok.decode([t for t, label in zip(sample.input_ids, sample.labels, strict=True) if label != IGNORE_INDEX])
    assert "one two three" in learnt and "wrong" not in learnt


NO_SYSTEM_TEMPLATE = (  # as Gemma's: a system message raises
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def test_a_template_without_a_system_role_gets_the_system_text_in_the_first_user_turn(tmp_path, tok):  # noqa: F811
    (tmp_path / "t.jinja").write_text(NO_SYSTEM_TEMPLATE, encoding="utf-8")
    messages = [{"role": "system", "content": "be brief."}, *CHAT]
    d = _dataset(tmp_path, f'jsonl_file = "{_jsonl(tmp_path / "s.jsonl", [{"messages": messages}])}"\n'
                 f'messages_column = "messages"\nchat_template = "{tmp_path / "t.jinja"}"', tok=tok)
    (sample,) = d.train
    assert tok.decode(sample.input_ids).startswith("<s><|user|>\nbe brief.\n\ncount to three<|end|>")


def test_alpaca_input_joins_the_instruction_after_a_blank_line(tmp_path, tok):  # noqa: F811
    from library.data.text_data import IGNORE_INDEX

    rows = [{"instruction": "translate to german:", "input": "good morning.", "output": "guten morgen."},
            {"instruction": "say hi", "input": "", "output": "hi"}]
    d = _dataset(tmp_path, f'jsonl_file = "{_jsonl(tmp_path / "a.jsonl", rows)}"\nprompt_column = "instruction"\n'
                 'input_column = "input"\nresponse_column = "output"', tok=tok)
    first, second = d.train
    prompt = tok("translate to german:\n\ngood morning.", add_special_tokens=False).input_ids
    assert first.input_ids[:len(prompt)] == prompt and first.labels[:len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert second.input_ids[:len(tok("say hi", add_special_tokens=False).input_ids)] == tok(
        "say hi", add_special_tokens=False).input_ids  # an empty input adds nothing
    with pytest.raises(UserError, match=r"input_column \(line \d+\): adds Alpaca's input to the prompt"):
        _dataset(tmp_path, f'jsonl_file = "{tmp_path / "a.jsonl"}"\nmessages_column = "m"\ninput_column = "input"',
                 tok=tok)
