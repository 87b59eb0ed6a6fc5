"""A tiny Llama and an offline BPE tokenizer, built in code (never downloaded).

Tests, the demo and the CPU benchmarks use these to exercise the real LLM loading code: the
model is written with ``save_pretrained`` and loaded back with ``AutoModelForCausalLM``, the
tokenizer is a byte-level BPE trained on a few sentences with the ``tokenizers`` library and
wrapped in ``PreTrainedTokenizerFast`` with a chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")

# Jinja, as transformers renders it: <s><|user|>\nhi<|end|>\n<|assistant|>\nhello<|end|>\n
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "what is the capital of france? the capital of france is paris.",
    "what colour is the sky? the sky is blue on a clear day.",
    "how many legs does a spider have? a spider has eight legs.",
    "translate to german: good morning. guten morgen.",
    "lora adapters train a low rank update of each linear layer.",
    "a small model learns these sentences quickly.",
    "one two three four five six seven eight nine ten",
]


def tiny_bpe_tokenizer(corpus: list[str] | None = None, vocab_size: int = 384):
    """A byte-level BPE trained on ``corpus`` (deterministic), with bos/eos/pad and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BOS, EOS, PAD, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(corpus or CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS), chat_template=CHAT_TEMPLATE, model_max_length=512,
    )


def tiny_llama(vocab_size: int, seed: int = 0, bos_token_id: int = 0, eos_token_id: int = 1, pad_token_id: int = 2):
    """A two-layer LlamaForCausalLM with hidden size 64 (grouped-query attention, 2 KV heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=vocab_size, max_position_embeddings=512, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def save_tiny_llm(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny Llama and its tokenizer as one transformers folder; returns the folder."""
    folder = Path(folder)
    tokenizer = tiny_bpe_tokenizer()
    model = tiny_llama(len(tokenizer), seed, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_tiny_llm_data(folder: str | Path) -> dict[str, Path]:
    """Small chat, instruction and plain-text files in every format the dataset TOML reads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pairs = [
        ("what is the capital of france?", "the capital of france is paris."),
        ("what colour is the sky?", "the sky is blue on a clear day."),
        ("how many legs does a spider have?", "a spider has eight legs."),
        ("translate to german: good morning.", "guten morgen."),
    ]
    chat = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]
    turns = [("system", "answer briefly."), ("user", "count to three"), ("assistant", "one two three"),
             ("user", "and on?"), ("assistant", "four five six")]
    chat.append({"messages": [{"role": role, "content": content} for role, content in turns]})
    paths = {
        "chat": folder / "chat.jsonl",
        "instruct": folder / "instruct.jsonl",
        "text_jsonl": folder / "text.jsonl",
        "text": folder / "corpus.txt",
    }
    paths["chat"].write_text("".join(json.dumps(row) + "\n" for row in chat), encoding="utf-8")
    paths["instruct"].write_text("".join(json.dumps({"prompt": q + " ", "response": a}) + "\n" for q, a in pairs),
                                 encoding="utf-8")
    paths["text_jsonl"].write_text("".join(json.dumps({"text": s}) + "\n" for s in CORPUS), encoding="utf-8")
    paths["text"].write_text("\n\n".join(CORPUS) + "\n", encoding="utf-8")
    return paths
