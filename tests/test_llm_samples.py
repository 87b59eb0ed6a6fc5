"""--sample_prompts for a causal LM: greedy answers with the LoRA as trained, one text file per sampling point."""

from __future__ import annotations

from pathlib import Path

import pytest

import train_network
from library.text_samples import generate_text, prompt_ids


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from library.tiny_llm import save_tiny_llm, write_tiny_llm_data

    work = tmp_path_factory.mktemp("llm-samples")
    model = save_tiny_llm(work / "model")
    files = write_tiny_llm_data(work / "data")
    data = work / "data.toml"
    data.write_text(f"[general]\nmax_seq_length = 64\n[[datasets]]\nbatch_size = 2\n"
                    f"  [[datasets.subsets]]\n  jsonl_file = \"{files['chat']}\"\n  messages_column = \"messages\"\n")
    return model, data


def _load(model: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(model)).eval(), AutoTokenizer.from_pretrained(str(model))


def test_prompts_are_user_turns_of_the_chat_template(llm):
    _model, tokenizer = _load(llm[0])
    ids = prompt_ids(tokenizer, "what is the capital of france?")
    text = tokenizer.decode(ids)
    assert text.startswith("<s><|user|>\nwhat is the capital of france?<|end|>") and text.endswith("<|assistant|>\n")


def test_training_writes_text_samples_with_the_lora(llm, tmp_path, capsys):
    model, data = llm
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("what is the capital of france? --s 6\n# a comment\nhow many legs does a spider have? --w 64\n")
    out = tmp_path / "out"
    argv = ["--pretrained_model_name_or_path", str(model), "--dataset_config", str(data), "--output_dir", str(out),
            "--output_name", "lora", "--max_train_steps", "2", "--learning_rate", "0.05", "--seed", "1",
            "--sample_prompts", str(prompts), "--sample_at_first", "--sample_every_n_steps", "2",
            "--logging_dir", str(tmp_path / "logs")]
    assert train_network.main(argv) == 0
    log = capsys.readouterr().out
    assert "--w mean nothing for text samples" in log and "failed" not in log
    assert sorted(p.name for p in (out / "sample").iterdir()) == ["lora_000000.txt", "lora_000002.txt"]
    first = (out / "sample" / "lora_000000.txt").read_text()
    assert first.startswith("# samples at training step 0")
    assert "## prompt 0 (6 new tokens)\nwhat is the capital of france?" in first
    assert "## prompt 1 (128 new tokens)\nhow many legs does a spider have?" in first
    # step 0: the LoRA is still the identity, so the sample is the base model's greedy answer
    base, tokenizer = _load(model)
    expected = generate_text(base, tokenizer, "what is the capital of france?", 6)
    assert f"## sample\n{expected}\n" in first

    from tensorboard.backend.event_processing.event_accumulator import TENSORS, EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "logs").rglob("events.out.tfevents.*")).parent),
                              size_guidance={TENSORS: 0}).Reload()
    tags = set(events.Tags()["tensors"])
    assert any(t.startswith("sample/00") for t in tags) and any(t.startswith("sample/01") for t in tags)


def test_greedy_samples_are_reproducible_and_follow_the_weights(llm):
    import torch

    model, tokenizer = _load(llm[0])
    a = generate_text(model, tokenizer, "the quick brown fox", 8)
    assert a == generate_text(model, tokenizer, "the quick brown fox", 8)
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)  # another model: another greedy answer
    assert generate_text(model, tokenizer, "the quick brown fox", 8) != a


def test_samples_follow_how_the_data_was_formatted(llm):
    from types import SimpleNamespace

    from library.families.llm import training_format

    _model, tokenizer = _load(llm[0])
    raw = tokenizer.decode(prompt_ids(tokenizer, "the sky", "raw"))
    assert "<|user|>" not in raw and raw.endswith("the sky")  # instruction / text data trains without a template
    custom = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    assert tokenizer.decode(prompt_ids(tokenizer, "hi", "chat", custom)) == "[hi]>"
    instruct = SimpleNamespace(format="instruct", chat_template=None)
    assert training_format([instruct]) == ("raw", None)
    assert training_format([instruct, SimpleNamespace(format="chat", chat_template=None)]) == ("chat", None)


def test_the_datasets_own_chat_template_is_used_and_saved_with_the_adapter(llm, tmp_path):
    model, data = llm
    template = tmp_path / "t.jinja"
    template.write_text("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
                        "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}", encoding="utf-8")
    custom = tmp_path / "data.toml"
    custom.write_text(data.read_text() + f'  chat_template = "{template}"\n')
    out = tmp_path / "out"
    argv = ["--pretrained_model_name_or_path", str(model), "--dataset_config", str(custom), "--output_dir", str(out),
            "--output_name", "lora", "--max_train_steps", "1"]
    assert train_network.main(argv) == 0
    assert (out / "lora" / "chat_template.jinja").read_text(encoding="utf-8") == template.read_text(encoding="utf-8")
    card = (out / "lora" / "README.md").read_text(encoding="utf-8")  # how to prompt the adapter travels with it
    assert "chat template in `chat_template.jinja`" in card and f'base_model: "{model}"' in card
    assert "- steps: 1\n" in card and "- target modules: " in card and "q_proj" in card
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(str(out / "lora")).base_model_name_or_path == str(model)  # still a PEFT folder
