"""--gradient_checkpointing keeps frozen transformers models in eval mode: their dropout stays off, so the loss
and the LoRA's gradients are those of the run without it (library/checkpointing.py)."""

from __future__ import annotations

import pytest
import torch
import torch.utils.checkpoint

from library.checkpointing import enable_checkpointing
from library.families.llm import LLMFamily
from library.tiny_llm import tiny_llama
from networks import lora


def _llama_with_dropout():
    model = tiny_llama(vocab_size=64)
    model.config.attention_dropout = 0.5
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5  # what attention_dropout=0.5 in the config gives
    model.requires_grad_(False)
    network = lora.create_network(1.0, 4, 4.0, None, None, model)
    network.apply_to(None, model, apply_text_encoder=False)
    g = torch.Generator().manual_seed(0)
    for p in network.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.1
    return model, network


def _loss_and_grads(model, network):
    ids = torch.arange(24).reshape(2, 12) % 64
    network.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in network.parameters()]


def test_llm_checkpointing_keeps_dropout_off_and_the_gradients_equal(monkeypatch):
    model, network = _llama_with_dropout()
    family = LLMFamily(model, None, "tiny")
    family.prepare(torch.device("cpu"), torch.float32, False, gradient_checkpointing=False)
    plain = _loss_and_grads(model, network)
    again = _loss_and_grads(model, network)
    assert torch.equal(plain[0], again[0]), "no dropout: the same batch gives the same loss"

    calls = []
    real = torch.utils.checkpoint._checkpoint_without_reentrant_generator

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "_checkpoint_without_reentrant_generator", counting)
    family.prepare(torch.device("cpu"), torch.float32, False, gradient_checkpointing=True)
    assert not any(m.training for m in model.modules()), "checkpointing put a module in training mode"
    checkpointed = _loss_and_grads(model, network)
    assert len(calls) == len(model.model.layers), "each decoder layer is checkpointed"
    assert torch.allclose(checkpointed[0], plain[0], atol=1e-6)
    for a, b in zip(checkpointed[1], plain[1], strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    with torch.no_grad():  # validation and sampling: no checkpoint, nothing to recompute
        calls.clear()
        model(input_ids=torch.zeros(1, 4, dtype=torch.long), use_cache=False)
        assert not calls


def test_text_encoder_checkpointing_keeps_eval_mode():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, vocab_size=100, attention_dropout=0.5, dropout=0.5,
                                      bos_token_id=0, eos_token_id=1, pad_token_id=1))
    te.requires_grad_(False)
    norm = next(m for name, m in te.named_modules() if name.endswith("final_layer_norm"))
    norm.requires_grad_(True)  # something to take a gradient
    ids = torch.arange(8).reshape(1, 8)
    te.eval()
    expected = te(ids).last_hidden_state
    enable_checkpointing(te)
    assert not any(m.training for m in te.modules())
    got = te(ids).last_hidden_state
    assert torch.equal(got, expected)
    got.sum().backward()
    assert norm.weight.grad is not None


def test_a_model_without_checkpointable_layers_falls_back_to_transformers_switch():
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enabled = False

        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            self.enabled = gradient_checkpointing_kwargs == {"use_reentrant": False}

    model = Plain()
    enable_checkpointing(model)
    assert model.enabled and model.training


if __name__ == "__main__":
    pytest.main([__file__])
