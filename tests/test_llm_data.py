"""LLM data (CONTRACTS.md §6): the dataset TOML, tokenisation and label masks, packing, bad rows.

Only the offline BPE tokenizer is needed here; labels are compared as exact tensors built from
separately tokenised pieces, not from the code under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from library.data.sampler import epoch_batches
from library.data.text_config import load_text_dataset_config, parse_text_dataset_config
from library.data.text_data import (
    IGNORE_INDEX,
    TextSequences,
    build_dataset,
    build_text_data,
    collate,
    pack,
)
from library.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tok():
    from library.tiny_llm import tiny_bpe_tokenizer

    return tiny_bpe_tokenizer()


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _config(tmp_path: Path, body: str, name: str = "data.toml"):
    (tmp_path / name).write_text(body, encoding="utf-8")
    return load_text_dataset_config(tmp_path / name)


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def _dataset(tmp_path, subset_lines: str, dataset_lines: str = "max_seq_length = 128\npacking = false", tok=None):
    group = _config(tmp_path, f"[[datasets]]\n{dataset_lines}\n[[datasets.subsets]]\n{subset_lines}\n")
    return build_dataset(group.datasets[0], tok, seed=0)


# --- label masks on exact tensors ----------------------------------------------------------------


def test_instruction_rows_learn_only_the_response(tmp_path, tok):
    f = _jsonl(tmp_path / "i.jsonl", [{"q": "what colour is the sky? ", "a": "blue."}])
    d = _dataset(tmp_path, f'jsonl_file = "{f}"\nprompt_column = "q"\nresponse_column = "a"', tok=tok)
    (sample,) = d.train
    prompt, response = _ids(tok, "what colour is the sky? "), _ids(tok, "blue.") + [tok.eos_token_id]
    assert sample.input_ids == prompt + response
    assert torch.equal(torch.tensor(sample.labels), torch.tensor([IGNORE_INDEX] * len(prompt) + response))


def test_chat_rows_learn_only_the_assistant_turns(tmp_path, tok):
    messages = [{"role": "system", "content": "be brief."}, {"role": "user", "content": "count to three"},
                {"role": "assistant", "content": "one two three"}, {"role": "user", "content": "and on?"},
                {"role": "assistant", "content": "four five"}]
    f = _jsonl(tmp_path / "c.jsonl", [{"messages": messages}])
    d = _dataset(tmp_path, f'jsonl_file = "{f}"\nmessages_column = "messages"', tok=tok)
    (sample,) = d.train
    # The template's pieces, tokenised one by one: prompt parts masked, assistant parts (with <|end|>\n) learnt.
    pieces = [("<s><|system|>\nbe brief.<|end|>\n<|user|>\ncount to three<|end|>\n<|assistant|>\n", False),
              ("one two three<|end|>\n", True), ("<|user|>\nand on?<|end|>\n<|assistant|>\n", False),
              ("four five<|end|>\n", True)]
    ids, labels = [], []
    for text, learnt in pieces:
        ids += _ids(tok, text)
        labels += _ids(tok, text) if learnt else [IGNORE_INDEX] * len(_ids(tok, text))
    assert sample.input_ids == ids
    assert torch.equal(torch.tensor(sample.labels), torch.tensor(labels))


def test_train_on_prompt_and_text_rows_learn_every_token(tmp_path, tok):
    f = _jsonl(tmp_path / "i.jsonl", [{"q": "hi ", "a": "there", "text": "the sky is blue"}])
    d = _dataset(tmp_path, f'jsonl_file = "{f}"\nprompt_column = "q"\nresponse_column = "a"\ntrain_on_prompt = true',
                 tok=tok)
    assert d.train[0].labels == d.train[0].input_ids
    d = _dataset(tmp_path, f'jsonl_file = "{f}"', tok=tok)  # no column key: text_column = "text"
    assert d.train[0].input_ids == _ids(tok, "the sky is blue") + [tok.eos_token_id]
    assert d.train[0].labels == d.train[0].input_ids


def test_plain_text_blocks_and_long_documents_are_chunked(tmp_path, tok):
    f = tmp_path / "t.txt"
    f.write_text("first document\nstill first\n\n\nsecond " + "word " * 40 + "\n", encoding="utf-8")
    d = _dataset(tmp_path, f'text_file = "{f}"', "max_seq_length = 32\npacking = false", tok=tok)
    assert d.reports[0].rows == 2
    assert d.train[0].input_ids == _ids(tok, "first document\nstill first") + [tok.eos_token_id]
    second = _ids(tok, "second " + "word " * 40) + [tok.eos_token_id]
    chunks = [s.input_ids for s in d.train[1:]]
    assert len(chunks) >= 2 and all(len(c) <= 32 for c in chunks)
    assert sum(chunks, []) == second[: sum(len(c) for c in chunks)]
    assert len(second) - sum(len(c) for c in chunks) <= 1  # only a 1-token tail (nothing to predict) is left


def test_long_prompts_are_cut_and_samples_without_response_dropped(tmp_path, tok):
    f = _jsonl(tmp_path / "i.jsonl", [{"q": "word " * 50, "a": "yes"}, {"q": "ok ", "a": "fine"}])
    d = _dataset(tmp_path, f'jsonl_file = "{f}"\nprompt_column = "q"\nresponse_column = "a"', "max_seq_length = 12",
                 tok=tok)
    assert len(d.train) == 1 and d.reports[0].no_labels == 1 and d.reports[0].truncated == 1


# --- packing and batches ---------------------------------------------------------------------------


def test_pack_is_a_deterministic_partition_within_capacity():
    lengths = [7, 3, 5, 5, 2, 9, 1, 4, 6]
    bins = pack(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 5  # 42 tokens need 5 bins of 10: best fit finds the minimum here
    assert pack(lengths, 10) == bins


def test_packed_rows_restart_positions_and_mask_sample_starts(tmp_path, tok):
    f = _jsonl(tmp_path / "t.jsonl", [{"text": "one two"}, {"text": "three"}, {"text": "four five six"}])
    d = _dataset(tmp_path, f'jsonl_file = "{f}"', "max_seq_length = 64\npacking = true", tok=tok)
    assert len(d.sequences) == 1
    item = TextSequences(d.sequences)[(0, 0)]
    lengths = [len(s.input_ids) for s in d.sequences[0]]
    assert item["position_ids"] == [p for n in lengths for p in range(n)]
    starts = [sum(lengths[:k]) for k in range(len(lengths))]
    assert [item["labels"][s] for s in starts] == [IGNORE_INDEX] * 3
    learnt = [i for i, label in enumerate(item["labels"]) if label != IGNORE_INDEX]
    assert learnt == [i for i in range(sum(lengths)) if i not in starts]

    batch = collate([item, {"input_ids": [5, 6], "labels": [5, 6], "position_ids": [0, 1], "index": 1}], pad_id=2)
    width = sum(lengths)
    assert batch["input_ids"].shape == (2, width)
    assert batch["input_ids"][1, 2:].eq(2).all() and batch["labels"][1, 2:].eq(IGNORE_INDEX).all()
    assert batch["position_ids"][1].tolist() == [0, 1] + list(range(width - 2))  # padding: a segment of its own


def test_batches_follow_the_epoch_order_contract(tmp_path, tok):
    f = _jsonl(tmp_path / "t.jsonl", [{"text": f"sample {i} " * (1 + i % 3)} for i in range(10)])
    def group(batch_size: int):
        return _config(tmp_path, f'[[datasets]]\nbatch_size = {batch_size}\npacking = false\nmax_seq_length = 64\n'
                                 f'[[datasets.subsets]]\njsonl_file = "{f}"\n')

    one = build_text_data(group(4), tok, seed=3, num_processes=1, rank=0)  # 1 process x batch 4
    two = [build_text_data(group(2), tok, seed=3, num_processes=2, rank=r) for r in range(2)]  # 2 x batch 2
    for data in (one, *two):
        data.sampler.set_epoch(1)
    # process r gets slice r of each global batch, and its loader yields exactly the sampler's indices
    expected = epoch_batches([0] * 10, 2, 2, 1, 3, 1)
    assert [b["indices"].tolist() for b in two[1].loader] == expected
    for step, (a, b, c) in enumerate(zip(one.loader, two[0].loader, two[1].loader, strict=True)):
        assert a["indices"].tolist() == b["indices"].tolist() + c["indices"].tolist(), step


def test_num_repeats_and_validation_split(tmp_path, tok):
    f = _jsonl(tmp_path / "t.jsonl", [{"text": f"row {i}"} for i in range(10)])
    d = _dataset(tmp_path, f'jsonl_file = "{f}"\nnum_repeats = 3',
                 "max_seq_length = 64\npacking = false\nvalidation_split = 0.2\nvalidation_seed = 5", tok=tok)
    assert len(d.validation) == 2 and len(d.train) == 8 * 3
    held = {tuple(s.input_ids) for s in d.validation}
    assert not held & {tuple(s.input_ids) for s in d.train}
    split = "max_seq_length = 64\nvalidation_split = 0.2\nvalidation_seed = 5"
    again = _dataset(tmp_path, f'jsonl_file = "{f}"', split, tok=tok)
    assert {tuple(s.input_ids) for s in again.validation} == held


# --- bad rows ----------------------------------------------------------------------------------------


def test_bad_rows_stop_the_run_with_file_and_line(tmp_path, tok):
    f = _jsonl(tmp_path / "c.jsonl", [{"text": "fine"}, "", '{"text": "broken', {"text": "ok"}])
    with pytest.raises(UserError, match=rf"{f}:3: not valid JSON .*on_bad_row = \"skip\""):
        _dataset(tmp_path, f'jsonl_file = "{f}"', tok=tok)


@pytest.mark.parametrize("row, reason", [
    ({"other": "x"}, "no column 'text' \\(the row has: other\\)"),
    ({"text": "   "}, "column 'text' is empty"),
    ({"text": 3}, "column 'text' is int, expected str"),
    ([1, 2], "not a JSON object"),
])
def test_each_kind_of_bad_row_is_named(tmp_path, tok, row, reason):
    f = _jsonl(tmp_path / "c.jsonl", [{"text": "fine"}, row])
    with pytest.raises(UserError, match=rf"{f}:2: {reason}"):
        _dataset(tmp_path, f'jsonl_file = "{f}"', tok=tok)


def test_skipped_rows_are_counted_and_listed(tmp_path, tok):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    rows = [good, {"messages": [{"role": "user", "content": "no answer"}]}, "not json", good,
            {"messages": [{"role": "user"}]}]
    f = _jsonl(tmp_path / "c.jsonl", rows)
    d = _dataset(tmp_path, f'jsonl_file = "{f}"\nmessages_column = "messages"\non_bad_row = "skip"', tok=tok)
    assert len(d.train) == 2
    assert [w.split(": ")[0] for w in d.reports[0].skipped] == [f"{f}:2", f"{f}:3", f"{f}:5"]
    assert "no assistant message" in d.reports[0].skipped[0]
    summary = "\n".join(d.summary())
    assert "3 skipped" in summary and f"skipped {f}:5" in summary


# --- the TOML --------------------------------------------------------------------------------------


def test_precedence_and_defaults(tmp_path):
    f = _jsonl(tmp_path / "t.jsonl", [{"text": "x"}])
    group = parse_text_dataset_config({
        "general": {"max_seq_length": 256, "train_on_prompt": True, "num_repeats": 2},
        "datasets": [{"packing": False, "subsets": [{"jsonl_file": str(f), "num_repeats": 5}, {"jsonl_file": str(f)}]},
                     {"subsets": [{"jsonl_file": str(f)}]}],
    }, batch_size=3)
    a, b = group.datasets
    assert (a.max_seq_length, a.packing, a.batch_size) == (256, False, 3)
    assert b.packing is True and b.validation_split == 0.0
    assert [s.num_repeats for s in a.subsets] == [5, 2]
    assert all(s.train_on_prompt and s.on_bad_row == "error" and s.format == "text" for s in a.subsets)


@pytest.mark.parametrize("body, message", [
    ('[[datasets]]\nmax_seq_lenght = 5\n[[datasets.subsets]]\njsonl_file = "F"',
     r"datasets\[0\].max_seq_lenght \(line 2\): unknown key 'max_seq_lenght' \(did you mean 'max_seq_length'\?\)"),
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"', "'image_dir' is an image dataset key"),
    ('[[datasets]]\n[[datasets.subsets]]\njsonl_file = "F"\npacking = true', "put it in \\[general\\] or"),
    ('[[datasets]]\n[[datasets.subsets]]\njsonl_file = "F"\ntext_file = "F"', "exactly one of jsonl_file or"),
    ('[[datasets]]\n[[datasets.subsets]]\njsonl_file = "missing.jsonl"', "file not found: missing.jsonl"),
    ('[general]\ntext_column = "t"\n[[datasets]]\n[[datasets.subsets]]\njsonl_file = "F"\nmessages_column = "m"',
     "choose one format"),
    ('[[datasets]]\n[[datasets.subsets]]\njsonl_file = "F"\nprompt_column = "p"', "set both"),
    ('[[datasets]]\n[[datasets.subsets]]\njsonl_file = "F"\non_bad_row = "ignore"', 'expected "error" or "skip"'),
    ('[[datasets]]\nmax_seq_length = 1\n[[datasets.subsets]]\njsonl_file = "F"', "expected an integer >= 2"),
])
def test_config_errors_name_file_key_and_fix(tmp_path, body, message):
    f = _jsonl(tmp_path / "t.jsonl", [{"text": "x"}])
    with pytest.raises(UserError, match=message) as info:
        _config(tmp_path, body.replace('"F"', f'"{f}"'))
    assert str(tmp_path / "data.toml") in str(info.value)


def test_example_llm_data_config_parses(tmp_path, monkeypatch, tok):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    _jsonl(tmp_path / "data" / "chat.jsonl", [good])
    _jsonl(tmp_path / "data" / "instructions.jsonl", [{"instruction": "say hi ", "output": "hi"}])
    (tmp_path / "data" / "notes.txt").write_text("some notes\n", encoding="utf-8")
    group = load_text_dataset_config(ROOT / "configs" / "llm_example_data.toml")
    formats = [s.format for s in group.datasets[0].subsets]
    assert formats == ["chat", "instruct", "text"] and group.datasets[0].batch_size == 4
    data = build_text_data(group, tok, seed=0, num_processes=1, rank=0)
    assert data.num_train_images == 4  # 1 chat + 2 x 1 instruction + 1 text
