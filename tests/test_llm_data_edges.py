"""LLM data edge cases (CONTRACTS.md §6): file encodings, datasets with no usable rows, the chat loss
mask at a generation prompt ending in a space, empty assistant turns and max_seq_length limits.

Like tests/test_llm_data.py, only the offline BPE tokenizer is needed; expected labels are built from
separately tokenised pieces.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from library.data.text_config import load_text_dataset_config, replace_max_seq_length
from library.data.text_data import IGNORE_INDEX, build_dataset
from library.errors import UserError

CHAT = {"messages": [{"role": "user", "content": "what is the capital of france?"},
                     {"role": "assistant", "content": "the capital of france is paris."}]}


@pytest.fixture(scope="module")
def tok():
    from library.tiny_llm import tiny_bpe_tokenizer

    return tiny_bpe_tokenizer()


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def _write(path: Path, rows: list, prefix: bytes = b"") -> Path:
    lines = [r if isinstance(r, bytes) else json.dumps(r).encode() for r in rows]
    path.write_bytes(prefix + b"".join(line + b"\n" for line in lines))
    return path


def _dataset(tmp_path: Path, subset_lines: str, tok, dataset_lines: str = "max_seq_length = 128\npacking = false"):
    (tmp_path / "data.toml").write_text(f"[[datasets]]\n{dataset_lines}\n[[datasets.subsets]]\n{subset_lines}\n",
                                        encoding="utf-8")
    group = load_text_dataset_config(tmp_path / "data.toml")
    return build_dataset(group.datasets[0], tok, seed=0)


# --- encodings -------------------------------------------------------------------------------------------

LATIN1 = json.dumps(CHAT).replace("france", "fran\u00e7e").encode("latin-1")  # "ç" as the single byte 0xe7


def test_a_line_that_is_not_utf8_is_named_with_file_and_line(tmp_path, tok):
    f = _write(tmp_path / "c.jsonl", [CHAT, LATIN1])
    with pytest.raises(UserError, match=rf"{f}:2: not UTF-8 text \(byte 0xe7 at column \d+\); re-save the file as "
                                        r"UTF-8 .*on_bad_row = \"skip\""):
        _dataset(tmp_path, f'jsonl_file = "{f}"\nmessages_column = "messages"', tok)


def test_lines_that_are_not_utf8_are_skipped_and_listed(tmp_path, tok):
    f = _write(tmp_path / "c.jsonl", [LATIN1, CHAT, LATIN1])
    d = _dataset(tmp_path, f'jsonl_file = "{f}"\nmessages_column = "messages"\non_bad_row = "skip"', tok)
    assert len(d.train) == 1 and d.reports[0].rows == 3
    assert [w.split(": ")[0] for w in d.reports[0].skipped] == [f"{f}:1", f"{f}:3"]
    assert "skipped " + f"{f}:3: not UTF-8" in "\n".join(d.summary())


def test_a_text_block_that_is_not_utf8_is_named_at_its_bad_line(tmp_path, tok):
    f = tmp_path / "t.txt"
    f.write_bytes(b"first document\n\nsecond\ncaf\xe9 latin-1\n\nthird document\n")
    d = _dataset(tmp_path, f'text_file = "{f}"\non_bad_row = "skip"', tok)
    assert len(d.train) == 2 and d.reports[0].skipped[0].startswith(f"{f}:4: not UTF-8 text (byte 0xe9 at column 4)")
    with pytest.raises(UserError, match=rf"{f}:4: not UTF-8"):
        _dataset(tmp_path, f'text_file = "{f}"', tok)


def test_a_utf8_bom_is_accepted(tmp_path, tok):
    f = _write(tmp_path / "t.jsonl", [{"text": "the sky is blue"}], prefix=b"\xef\xbb\xbf")
    d = _dataset(tmp_path, f'jsonl_file = "{f}"', tok)
    assert d.train[0].input_ids == _ids(tok, "the sky is blue") + [tok.eos_token_id]
    t = tmp_path / "t.txt"
    t.write_bytes(b"\xef\xbb\xbfthe sky is blue\n")
    d = _dataset(tmp_path, f'text_file = "{t}"', tok)
    assert d.train[0].input_ids == _ids(tok, "the sky is blue") + [tok.eos_token_id]


# --- no usable rows ----------------------------------------------------------------------------------------


def test_no_usable_rows_says_every_row_is_too_long(tmp_path, tok):
    long_prompt = {"messages": [{"role": "user", "content": "the quick brown fox " * 40},
                                {"role": "assistant", "content": "ok"}]}
    f = _write(tmp_path / "c.jsonl", [long_prompt, long_prompt])
    longest = len(_ids(tok, tok.apply_chat_template(long_prompt["messages"], tokenize=False)))
    with pytest.raises(UserError, match=rf"datasets\[0\]: no usable rows: {f}: all 2 rows are longer than "
                                        rf"max_seq_length=64 tokens \(longest {longest}\).*raise max_seq_length"):
        _dataset(tmp_path, f'jsonl_file = "{f}"\nmessages_column = "messages"', tok, "max_seq_length = 64")


@pytest.mark.parametrize("content", [b"", b"\n  \n"])
def test_no_usable_rows_says_the_file_is_empty(tmp_path, tok, content):
    f = tmp_path / "c.jsonl"
    f.write_bytes(content)
    # validation_split is set: an empty file must not be reported as "validation_split leaves no training rows"
    with pytest.raises(UserError, match=rf"no usable rows: {f} is empty \(no rows\)"):
        _dataset(tmp_path, f'jsonl_file = "{f}"\nmessages_column = "messages"', tok,
                 "max_seq_length = 64\nvalidation_split = 0.2")


def test_no_usable_rows_names_the_skipped_rows(tmp_path, tok):
    f = _write(tmp_path / "c.jsonl", [b"not json", {"text": "   "}])
    with pytest.raises(UserError, match=rf"no usable rows: {f}: 2 of 2 rows are bad and skipped \(first: {f}:1: "
                                        "not valid JSON"):
        _dataset(tmp_path, f'jsonl_file = "{f}"\non_bad_row = "skip"', tok)


# --- chat labels and empty assistant turns ----------------------------------------------------------------

# The audit's template (/tmp/audit_llm/tmpl_space.jinja): its generation prompt "Assistant: " ends in a
# space, which the BPE puts into the answer's first token " the".
SPACE_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% else %}Assistant: {{ m['content'] }}{{ eos_token }}\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}\n"
)


def test_the_first_answer_token_is_learnt_when_the_prompt_ends_in_a_space(tmp_path, tok):
    (tmp_path / "t.jinja").write_text(SPACE_TEMPLATE, encoding="utf-8")
    f = _write(tmp_path / "c.jsonl", [CHAT])
    d = _dataset(tmp_path, f'jsonl_file = "{f}"\nmessages_column = "messages"\n'
                           f'chat_template = "{tmp_path / "t.jinja"}"', tok)
    (sample,) = d.train
    prompt = _ids(tok, "User: what is the capital of france?\nAssistant:")
    answer = _ids(tok, " the capital of france is paris.</s>\n")
    assert _ids(tok, " the")[0] == answer[0]  # the token that straddles the prompt's space
    assert sample.input_ids == prompt + answer
    assert torch.equal(torch.tensor(sample.labels), torch.tensor([IGNORE_INDEX] * len(prompt) + answer))


@pytest.mark.parametrize("content", ["", "  "])
def test_an_empty_assistant_message_is_a_bad_row(tmp_path, tok, content):
    empty = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": content}]}
    f = _write(tmp_path / "c.jsonl", [CHAT, empty])
    subset = f'jsonl_file = "{f}"\nmessages_column = "messages"'
    with pytest.raises(UserError, match=rf"{f}:2: messages\[1\] is an empty assistant message"):
        _dataset(tmp_path, subset, tok)
    d = _dataset(tmp_path, subset + '\non_bad_row = "skip"', tok)
    assert len(d.train) == 1 and d.reports[0].skipped[0].startswith(f"{f}:2: ")


# --- max_seq_length and the model's positions ---------------------------------------------------------------


def test_max_seq_length_above_the_model_positions_is_refused(tmp_path):
    f = _write(tmp_path / "t.jsonl", [{"text": "x"}])
    toml = tmp_path / "data.toml"
    toml.write_text(f'[general]\nmax_seq_length = 2048\n[[datasets]]\n[[datasets.subsets]]\njsonl_file = "{f}"\n'
                    f'[[datasets]]\n[[datasets.subsets]]\njsonl_file = "{f}"\n', encoding="utf-8")
    group = load_text_dataset_config(toml)
    with pytest.raises(UserError, match=rf"{toml}: general.max_seq_length \(line 2\): 2048 is more than the "
                                        r"model supports \(max_position_embeddings = 512\); set max_seq_length = "
                                        "512 or less"):
        replace_max_seq_length(group, 512, limit=512)
    assert [d.max_seq_length for d in replace_max_seq_length(group, 512, limit=2048).datasets] == [2048, 2048]
    assert [d.max_seq_length for d in replace_max_seq_length(group, 512).datasets] == [2048, 2048]  # limit unknown
    toml.write_text(f'[[datasets]]\n[[datasets.subsets]]\njsonl_file = "{f}"\n', encoding="utf-8")
    unset = load_text_dataset_config(toml)
    assert replace_max_seq_length(unset, 512, limit=512).datasets[0].max_seq_length == 512


# --- subsets beside each other --------------------------------------------------------------------------


def _two_subsets(tmp_path: Path, tok, small: list, large: list, dataset_lines: str):
    a, b = _write(tmp_path / "small.jsonl", small), _write(tmp_path / "large.jsonl", large)
    (tmp_path / "data.toml").write_text(
        f"[[datasets]]\n{dataset_lines}\n[[datasets.subsets]]\njsonl_file = \"{a}\"\nmessages_column = \"messages\"\n"
        f"[[datasets.subsets]]\njsonl_file = \"{b}\"\ntext_column = \"text\"\n", encoding="utf-8")
    return build_dataset(load_text_dataset_config(tmp_path / "data.toml").datasets[0], tok, seed=0)


def test_a_subset_that_gives_no_sample_is_an_error_not_a_silent_omission(tmp_path, tok):
    long_prompt = {"messages": [{"role": "user", "content": "word " * 200}, CHAT["messages"][1]]}
    with pytest.raises(UserError, match=r"datasets\[0\].subsets\[0\] gave no sample to train on: .*small.jsonl: "
                                        r"all 2 rows are longer than max_seq_length=64.*remove the subset"):
        _two_subsets(tmp_path, tok, [long_prompt, long_prompt], [{"text": "a short text"}] * 3,
                     "max_seq_length = 64\npacking = false")


@pytest.mark.parametrize("seed", range(4))
def test_validation_split_holds_out_each_subsets_share(tmp_path, tok, seed):
    """validation_split = 0.2 of 5 chat rows and 20 text rows: 1 and 4 rows, whatever the seed (a split over
    the pooled rows would take anything from 0 to 5 of the small subset)."""
    texts = [{"text": f"text number {i}"} for i in range(20)]
    data = _two_subsets(tmp_path, tok, [CHAT] * 5, texts,
                        f"max_seq_length = 64\npacking = false\nvalidation_split = 0.2\nvalidation_seed = {seed}")
    held = [s.subset for s in data.validation]
    assert (held.count(0), held.count(1)) == (1, 4)
    assert len(data.train) == 4 + 16


def test_long_documents_do_not_raise_transformers_indexing_warning(tmp_path, tok, caplog):
    """Long rows are chunked to max_seq_length here, so the tokenizer's "will result in indexing errors" warning
    (about its own model_max_length) is not shown."""
    from library.tiny_llm import tiny_bpe_tokenizer

    fresh = tiny_bpe_tokenizer()  # its own "already warned" flags
    f = _write(tmp_path / "t.jsonl", [{"text": "word " * (fresh.model_max_length + 100)}])
    with caplog.at_level("WARNING"):
        data = _dataset(tmp_path, f'jsonl_file = "{f}"\ntext_column = "text"', fresh, "max_seq_length = 64")
    assert len(data.train) > 1  # chunked
    assert "indexing errors" not in caplog.text


def test_a_too_long_max_seq_length_is_named_where_it_was_set(tmp_path):
    """Set in [general], the error named datasets[0].max_seq_length, a key the file does not have."""
    from library.data.text_config import load_text_dataset_config, replace_max_seq_length
    from library.errors import UserError

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "hi"}\n', encoding="utf-8")
    data = tmp_path / "d.toml"
    data.write_text(f'[general]\nmax_seq_length = 4096\n\n[[datasets]]\n[[datasets.subsets]]\njsonl_file = "{rows}"\n'
                    f'\n[[datasets]]\nmax_seq_length = 2000\n[[datasets.subsets]]\njsonl_file = "{rows}"\n',
                    encoding="utf-8")  # fmt: skip
    group = load_text_dataset_config(data)
    with pytest.raises(UserError, match=r"general\.max_seq_length \(line 2\): 4096 is more"):
        replace_max_seq_length(group, 512, 1024)
    only_second = load_text_dataset_config(data)
    only_second = type(group)(datasets=(only_second.datasets[1],), source=group.source)
    with pytest.raises(UserError, match=r"datasets\[1\]\.max_seq_length \(line \d+\): 2000 is more"):
        replace_max_seq_length(only_second, 512, 1024)
