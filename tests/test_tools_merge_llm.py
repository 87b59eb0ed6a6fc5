"""tools/merge.py --llm_model: a PEFT adapter baked into a full transformers folder gives PEFT's logits."""

from __future__ import annotations

import pytest
import torch


def _random_adapter(base_dir, folder, **network_args):
    """A PEFT adapter folder for the model in ``base_dir`` with random (non-zero) up weights."""
    from transformers import AutoModelForCausalLM

    from networks.lora import create_network
    from networks.peft_export import write_peft_adapter

    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    network = create_network(1.0, 4, 8.0, None, None, model, **network_args)
    network.apply_to(None, model, apply_text_encoder=False)
    torch.manual_seed(0)
    with torch.no_grad():
        for lora in network.unet_loras:
            lora.lora_up.weight.normal_(0, 0.05)
    return write_peft_adapter(network, model, folder, str(base_dir))


def test_llm_adapter_baked_into_a_model_folder(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from library.tiny_llm import save_tiny_llm
    from tools import merge

    base_dir = save_tiny_llm(tmp_path / "base")
    adapter = _random_adapter(base_dir, tmp_path / "adapter")

    out = tmp_path / "merged"
    assert merge.main(["--llm_model", str(base_dir), "--models", str(adapter), "--save_to", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)), str(adapter))
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        expected = reference(ids).logits
        got = merged(ids).logits
        base = AutoModelForCausalLM.from_pretrained(str(base_dir))(ids).logits
    assert not torch.allclose(got, base, atol=1e-4), "the adapter changed nothing"
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


def test_llm_merge_refuses_a_folder_that_is_not_a_model(tmp_path, capsys):
    from tools import merge

    (tmp_path / "adapter").mkdir()
    code = merge.main(["--llm_model", str(tmp_path), "--models", str(tmp_path / "adapter"), "--save_to",
                       str(tmp_path / "out")])
    assert code == 2 and "not a transformers model folder" in capsys.readouterr().err


@pytest.fixture(scope="module")
def dora(tmp_path_factory):
    from test_tools_common import llm_adapter

    return llm_adapter(tmp_path_factory.mktemp("merge_dora"), use_dora=True)


@pytest.mark.parametrize("which,ratio", [("peft", 1.0), ("kohya", 0.5)])
def test_dora_is_baked_exactly_as_the_trainer_computes_it(dora, which, ratio, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from tools import merge

    out = tmp_path / "merged"
    assert merge.main(["--llm_model", str(dora["base"]), "--models", str(dora[which]), "--ratios", str(ratio),
                       "--save_to", str(out)]) == 0  # fmt: skip
    assert "DoRA modules" in capsys.readouterr().out
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    dora["network"].set_multiplier(ratio)  # networks/lora_variants.py's DoRA forward, the reference
    try:
        with torch.no_grad():
            want = dora["model"](ids).logits
            got = AutoModelForCausalLM.from_pretrained(str(out))(ids).logits
    finally:
        dora["network"].set_multiplier(1.0)
    assert torch.allclose(got, want, atol=2e-5), (got - want).abs().max()


def test_dora_cannot_be_combined_into_one_lora(dora, tmp_path, capsys):
    from tools import merge

    out = tmp_path / "ab.safetensors"
    assert merge.main(["--models", str(dora["kohya"]), str(dora["kohya"]), "--save_to", str(out)]) == 2
    assert "DoRA" in capsys.readouterr().err and not out.exists()


def test_llm_merge_keeps_the_model_dtype(tmp_path):
    from safetensors import safe_open
    from test_tools_common import llm_adapter
    from transformers import AutoModelForCausalLM

    from tools import merge

    plain = llm_adapter(tmp_path, use_dora=False)
    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(str(plain["base"]), dtype=torch.bfloat16).save_pretrained(bf16)
    out = tmp_path / "merged"
    assert merge.main(["--llm_model", str(bf16), "--models", str(plain["peft"]), "--save_to", str(out)]) == 0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    out32 = tmp_path / "merged32"
    assert merge.main(["--llm_model", str(bf16), "--models", str(plain["peft"]), "--save_to", str(out32),
                       "--save_precision", "float"]) == 0  # fmt: skip
    with safe_open(str(out32 / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}


def test_lm_head_lora_of_a_tied_model_is_baked_into_lm_head_only(tmp_path, capsys):
    """tie_word_embeddings: lm_head and embed_tokens share one tensor; the adapter changes the output layer
    only (in training and in PEFT), so the merge must not move the input embeddings with it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from library.tiny_llm import tiny_bpe_tokenizer, tiny_llama
    from tools import merge

    tokenizer = tiny_bpe_tokenizer()
    model = tiny_llama(len(tokenizer))
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    adapter = _random_adapter(base_dir, tmp_path / "adapter", target_modules="q_proj,lm_head")

    out = tmp_path / "merged"
    assert merge.main(["--llm_model", str(base_dir), "--models", str(adapter), "--save_to", str(out)]) == 0
    assert "tied embeddings" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    base = AutoModelForCausalLM.from_pretrained(str(base_dir))
    assert torch.equal(merged.model.embed_tokens.weight, base.model.embed_tokens.weight)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)), str(adapter))
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, reference(ids).logits, atol=1e-4)
