"""tools/merge.py --llm_model: a PEFT adapter baked into a full transformers folder gives PEFT's logits."""

from __future__ import annotations

import torch


def test_llm_adapter_baked_into_a_model_folder(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from library.tiny_llm import save_tiny_llm
    from networks.lora import create_network
    from networks.peft_export import write_peft_adapter
    from tools import merge

    base_dir = save_tiny_llm(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    network = create_network(1.0, 4, 8.0, None, None, model)
    network.apply_to(None, model, apply_text_encoder=False)
    torch.manual_seed(0)
    with torch.no_grad():
        for lora in network.unet_loras:
            lora.lora_up.weight.normal_(0, 0.05)
    adapter = write_peft_adapter(network, model, tmp_path / "adapter", str(base_dir))

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
