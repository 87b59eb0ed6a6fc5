"""GPT-2-style causal LMs, whose projections are transformers' ``Conv1D`` (weight ``(in, out)``, ``y = x @ W + b``).

The LoRA keeps Linear's orientation (``lora_down (r, in)``, ``lora_up (out, r)``, ΔW ``(out, in)``), so the kohya
file and the PEFT adapter hold the same tensors as for a Llama; PEFT is told ``fan_in_fan_out: true``. Checked
against a formula written out here, against PEFT's logits, and through train_network.py / merge / convert / show.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_llm_training import _randomise  # every adapter given a visible effect

import networks.lora as lora
from library.errors import UserError
from networks.conv1d import is_conv1d
from networks.peft_export import peft_to_kohya, read_peft_adapter, write_peft_adapter

IDS = torch.tensor([[0, 5, 9, 40, 77, 120, 3, 200, 11, 60], [0, 250, 17, 33, 99, 4, 150, 7, 8, 300]])
GPT2_TARGETS = ["c_attn", "c_fc", "c_proj"]


def _gpt2(vocab_size: int, seed: int = 0, **ids: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=vocab_size, n_positions=128, **ids)
    return GPT2LMHeadModel(config)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    """A tiny GPT-2 and the offline BPE tokenizer of library/tiny_llm.py, as one transformers folder."""
    from library.tiny_llm import tiny_bpe_tokenizer

    folder = tmp_path_factory.mktemp("models") / "tiny-gpt2"
    tokenizer = tiny_bpe_tokenizer()
    model = _gpt2(len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _base(folder: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder))
    model.requires_grad_(False)
    return model.eval()


def _merged_by_hand(model, weights: dict[str, torch.Tensor]):
    """``model`` with each kohya module's ΔW = (alpha/r) · up @ down (out, in) added, transposed, to its Conv1D."""
    with torch.no_grad():
        for path, module in model.named_modules():
            name = "lora_unet_" + path.replace(".", "_")
            if f"{name}.lora_down.weight" not in weights:
                continue
            assert is_conv1d(module), path
            down, up = weights[f"{name}.lora_down.weight"].float(), weights[f"{name}.lora_up.weight"].float()
            delta = float(weights[f"{name}.alpha"]) / down.shape[0] * (up @ down)
            module.weight += delta.t()  # Conv1D stores (in, out)
    return model


# --- (a) one Conv1D layer: forward and gradients against the formula ----------------------------------------


def _conv1d_layer():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1D(24, 16)  # nf=24 outputs, nx=16 inputs: weight (16, 24)
    with torch.no_grad():
        layer.weight.normal_(0, 0.2)
        layer.bias.normal_(0, 0.2)
    layer.requires_grad_(False)
    return layer


@pytest.mark.parametrize("path", ["fused", "plain"])
def test_lora_on_conv1d_matches_the_reference_formula(path):
    layer = _conv1d_layer()
    module = lora.LoRAModule("lora_unet_c_attn", layer, multiplier=0.7, lora_dim=4, alpha=2.0)
    assert tuple(module.lora_down.weight.shape) == (4, 16) and tuple(module.lora_up.weight.shape) == (24, 4)
    module.apply_to()
    assert module._fast == "conv1d"  # the fused op takes Conv1D (its weight as a transposed view)
    if path == "plain":
        module._fast = None  # the path torch.compile traces
    with torch.no_grad():
        module.lora_up.weight.normal_(0, 0.3)
    x = torch.randn(3, 5, 16, requires_grad=True)
    A = module.lora_down.weight.detach().clone().requires_grad_(True)
    B = module.lora_up.weight.detach().clone().requires_grad_(True)
    W, b = layer.weight, layer.bias

    if path == "fused":
        from networks.fast_lora import fast_forward

        assert fast_forward(module, x) is not None  # the fused op runs, not a silent fallback
    out = layer(x)  # the hooked forward
    want = x @ W + b + 0.7 * (2.0 / 4) * (x @ A.t()) @ B.t()
    assert torch.allclose(out, want, atol=1e-6), (out - want).abs().max()
    assert (out - (x @ W + b)).abs().max() > 1e-2, "the adapter must change the output"

    g = torch.randn_like(out)
    gx, gA, gB = torch.autograd.grad(out, (x, module.lora_down.weight, module.lora_up.weight), g)
    wx, wA, wB = torch.autograd.grad(want, (x, A, B), g)
    for got, ref in ((gx, wx), (gA, wA), (gB, wB)):
        assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()
    assert W.grad is None


def test_merge_weights_writes_the_transposed_delta_into_conv1d():
    layer = _conv1d_layer()
    module = lora.LoRAModule("lora_unet_c_fc", layer, lora_dim=4, alpha=8.0)
    module.apply_to()
    with torch.no_grad():
        module.lora_up.weight.normal_(0, 0.3)
    x = torch.randn(2, 16)
    with torch.no_grad():
        want = layer(x)
        before = layer.weight.clone()
        module.merge_weights(module.lora_down.weight, module.lora_up.weight, 8.0)
        module.multiplier = 0.0  # only the merged weight now
        got = layer(x)
    assert layer.weight.shape == (16, 24)
    delta = 2.0 * module.lora_up.weight @ module.lora_down.weight  # (out, in)
    assert torch.allclose(layer.weight, before + delta.t(), atol=1e-6)
    assert torch.allclose(got, want, atol=1e-5)


def test_dora_on_conv1d_matches_the_reference_formula():
    from networks.lora_variants import DoRAModule

    layer = _conv1d_layer()
    module = DoRAModule("lora_unet_c_proj", layer, lora_dim=4, alpha=4.0)
    W_lin = layer.weight.t()  # (out, in)
    assert torch.allclose(module.magnitude, torch.linalg.norm(W_lin, dim=1))  # per output feature
    module.apply_to()
    with torch.no_grad():
        module.lora_up.weight.normal_(0, 0.3)
        module.magnitude.mul_(1.1)
    x = torch.randn(3, 16)
    with torch.no_grad():
        A, B = module.lora_down.weight, module.lora_up.weight
        merged = W_lin + B @ A
        want = module.magnitude / torch.linalg.norm(merged, dim=1) * (x @ merged.t()) + layer.bias
        assert torch.allclose(layer(x), want, atol=1e-5), (layer(x) - want).abs().max()


# --- the network on a GPT-2: targets, PEFT export, reloads -----------------------------------------------


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_network_on_gpt2_exports_a_peft_adapter_with_identical_logits(gpt2_dir, tmp_path, variant):
    from peft import PeftModel

    args = {"use_dora": "true"} if variant == "dora" else {}
    model = _base(gpt2_dir)
    network = lora.create_network(1.0, 4, 8.0, None, None, model, **args)
    assert len(network.unet_loras) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block; not lm_head
    assert "lora_unet_transformer_h_1_mlp_c_fc" in {m.lora_name for m in network.unet_loras}
    network.apply_to(None, model)
    _randomise(network)
    network.eval()
    with torch.no_grad():
        ours = model(IDS).logits
    folder = write_peft_adapter(network, model, tmp_path / "adapter", str(gpt2_dir))
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["target_modules"] == GPT2_TARGETS
    assert config["use_dora"] == (variant == "dora")

    peft_model = PeftModel.from_pretrained(_base(gpt2_dir), str(folder)).eval()
    with torch.no_grad():
        theirs, plain = peft_model(IDS).logits, _base(gpt2_dir)(IDS).logits
    assert (ours - plain).abs().max() > 1e-3
    assert torch.allclose(theirs, ours, atol=1e-5), (theirs - ours).abs().max()

    # read back: the PEFT folder gives the kohya state dict, which rebuilds the same network
    converted = peft_to_kohya(*read_peft_adapter(folder))
    assert converted.keys() == network.state_dict().keys()
    fresh = _base(gpt2_dir)
    reloaded, weights = lora.create_network_from_weights(1.0, str(folder), None, None, fresh)
    reloaded.apply_to(None, fresh)
    reloaded.load_state_dict(weights)
    reloaded.eval()
    with torch.no_grad():
        assert torch.allclose(fresh(IDS).logits, ours, atol=1e-5)


def test_target_modules_error_lists_the_conv1d_names(gpt2_dir):
    with pytest.raises(UserError, match="c_attn,c_fc,c_proj"):
        lora.create_network(1.0, 4, 4.0, None, None, _base(gpt2_dir), target_modules="q_proj")


# --- (b)-(d) train_network.py on the tiny GPT-2, then PEFT, merge, convert, show, --network_weights ----------


def _train(gpt2_dir: Path, data: Path, out: Path, *extra: str) -> None:
    import train_network

    argv = ["--pretrained_model_name_or_path", str(gpt2_dir), "--dataset_config", str(data), "--output_dir", str(out),
            "--output_name", "gpt2_lora", "--network_dim", "4", "--network_alpha", "8", "--learning_rate", "1e-2",
            "--max_train_steps", "4", "--seed", "3", *extra]
    assert train_network.main(argv) == 0


@pytest.fixture(scope="module")
def trained(gpt2_dir, tmp_path_factory):
    from library.tiny_llm import write_tiny_llm_data

    work = tmp_path_factory.mktemp("gpt2-train")
    paths = write_tiny_llm_data(work / "data")
    (work / "data.toml").write_text(f"""
[general]
max_seq_length = 64
[[datasets]]
batch_size = 2
  [[datasets.subsets]]
  jsonl_file = "{paths['chat']}"
  messages_column = "messages"
  [[datasets.subsets]]
  text_file = "{paths['text']}"
""")
    _train(gpt2_dir, work / "data.toml", work / "out")
    return work


def test_training_writes_a_kohya_file_and_a_peft_folder_peft_loads(gpt2_dir, trained):
    from peft import PeftModel

    out = trained / "out"
    weights = load_file(str(out / "gpt2_lora.safetensors"))
    assert len(weights) == 3 * 8 and weights["lora_unet_transformer_h_0_attn_c_attn.lora_down.weight"].shape == (4, 32)
    assert weights["lora_unet_transformer_h_0_attn_c_attn.lora_up.weight"].shape == (96, 4)
    assert all(weights[k].abs().max() > 0 for k in weights if k.endswith("lora_up.weight")), "training moved nothing"
    config = json.loads((out / "gpt2_lora" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and (config["r"], config["lora_alpha"]) == (4, 8)

    peft_model = PeftModel.from_pretrained(_base(gpt2_dir), str(out / "gpt2_lora")).eval()
    reference = _merged_by_hand(_base(gpt2_dir), weights)
    with torch.no_grad():
        theirs, want, plain = peft_model(IDS).logits, reference(IDS).logits, _base(gpt2_dir)(IDS).logits
    assert (want - plain).abs().max() > 1e-4, "the adapter must change the output for the test to mean anything"
    assert torch.allclose(theirs, want, atol=1e-5), (theirs - want).abs().max()


def test_merge_llm_model_bakes_the_conv1d_lora(gpt2_dir, trained, tmp_path):
    from transformers import AutoModelForCausalLM

    from tools import merge

    out = trained / "out"
    weights = load_file(str(out / "gpt2_lora.safetensors"))
    reference = _merged_by_hand(_base(gpt2_dir), weights)
    with torch.no_grad():
        want = reference(IDS).logits
    for source in ("gpt2_lora.safetensors", "gpt2_lora"):  # the kohya file and the PEFT folder
        save_to = tmp_path / f"merged-{source}"
        assert merge.main(["--llm_model", str(gpt2_dir), "--models", str(out / source), "--save_to", str(save_to)]) == 0
        merged = AutoModelForCausalLM.from_pretrained(str(save_to)).eval()
        for path, module in reference.named_modules():
            if is_conv1d(module):
                assert torch.allclose(merged.get_submodule(path).weight, module.weight, atol=1e-6), path
        with torch.no_grad():
            got = merged(IDS).logits
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_convert_and_show_read_the_conv1d_lora(gpt2_dir, trained, tmp_path, capsys):
    from peft import PeftModel

    from tools import convert, show

    out = trained / "out"
    folder = tmp_path / "converted"
    assert convert.main(["--model", str(out / "gpt2_lora.safetensors"), "--to", "peft", "--save_to", str(folder),
                         "--base_model", str(gpt2_dir)]) == 0
    assert json.loads((folder / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    reference = _merged_by_hand(_base(gpt2_dir), load_file(str(out / "gpt2_lora.safetensors")))
    peft_model = PeftModel.from_pretrained(_base(gpt2_dir), str(folder)).eval()
    with torch.no_grad():
        assert torch.allclose(peft_model(IDS).logits, reference(IDS).logits, atol=1e-5)
    capsys.readouterr()
    assert show.main([str(out / "gpt2_lora.safetensors")]) == 0
    shown = capsys.readouterr().out
    assert "lora_unet_transformer_h_0_attn_c_attn" in shown and "96x32" in shown  # ΔW (out, in), as a Linear's


@pytest.mark.parametrize("source", ["gpt2_lora.safetensors", "gpt2_lora"])
def test_network_weights_continues_from_the_file(gpt2_dir, trained, tmp_path, source):
    start = load_file(str(trained / "out" / "gpt2_lora.safetensors"))
    # a learning rate too small to move anything visible: what is saved is what was loaded
    _train(gpt2_dir, trained / "data.toml", tmp_path / "cont", "--network_weights", str(trained / "out" / source),
           "--learning_rate", "1e-9", "--max_train_steps", "1")
    after = load_file(str(tmp_path / "cont" / "gpt2_lora.safetensors"))
    assert after.keys() == start.keys()
    for key, value in start.items():
        assert torch.allclose(after[key].float(), value.float(), atol=1e-6), key
