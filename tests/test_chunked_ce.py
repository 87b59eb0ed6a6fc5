"""The chunked causal-LM loss (library/chunked_ce.py) equals transformers' loss without its logits.

Reference everywhere: transformers' own path, ``lm_head(hidden)`` then ``ForCausalLMLoss`` (or
``model(..., labels=...).loss``). fp32 results must agree to ~1e-5 relative, gradients included.
"""

from __future__ import annotations

import pytest
import torch

import networks.lora as lora
from library.chunked_ce import (
    causal_lm_loss,
    causal_lm_loss_from_hidden,
    default_chunk_size,
    linear_cross_entropy,
    why_not_chunked,
)
from library.families.llm import LLMFamily


def _reference(hidden, head, labels):
    from transformers.loss.loss_utils import ForCausalLMLoss

    return ForCausalLMLoss(head(hidden), labels, head.out_features)


def _labels(batch: int, tokens: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """Random targets with -100 in several places: a prompt prefix, scattered holes, padding, one empty row."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (batch, tokens), generator=g)
    labels[0, :4] = -100
    labels[:, -2:] = -100
    labels[torch.rand(batch, tokens, generator=g) < 0.2] = -100
    labels[1] = -100  # a row without a single label token
    return labels


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> None:
    a, b = a.detach(), b.detach()
    scale = float(b.abs().max().clamp_min(1e-12))
    assert float((a - b).abs().max()) <= rtol * scale, (float((a - b).abs().max()), scale)


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
def test_loss_and_gradients_equal_transformers(bias, chunk_size):
    torch.manual_seed(0)
    batch, tokens, width, vocab = 3, 19, 16, 50
    hidden = torch.randn(batch, tokens, width, requires_grad=True)
    head = torch.nn.Linear(width, vocab, bias=bias)
    labels = _labels(batch, tokens, vocab)
    count = int((labels[:, 1:] != -100).sum())
    assert count > 2 * 7 and count % 7, "several chunks of 7 with a ragged last one"

    ours = causal_lm_loss_from_hidden(hidden, head, labels, chunk_size=chunk_size)
    theirs = _reference(hidden, head, labels)
    _close(ours, theirs)
    params = [hidden, head.weight] + ([head.bias] if bias else [])
    # Scaled, as a loss scaler or accumulation would: backward must apply the incoming gradient.
    for a, b in zip(_grads(ours * 3.5, *params), _grads(theirs * 3.5, *params), strict=True):
        _close(a, b)
    # Positions whose next label is -100 (and the empty row) get exactly no gradient, as in transformers.
    grad_hidden = _grads(causal_lm_loss_from_hidden(hidden, head, labels, chunk_size=chunk_size), hidden)[0]
    assert torch.all(grad_hidden[1] == 0) and torch.all(grad_hidden[:, -1] == 0)


def test_positions_from_the_collate_select_the_same_tokens_as_the_mask():
    # the LLM collate finds the loss positions on the CPU (no device sync for a boolean mask each micro-step)
    from library.data.text_data import collate

    torch.manual_seed(0)
    labels = _labels(3, 19, 50)
    items = [{"input_ids": list(range(19)), "labels": row.tolist(), "position_ids": list(range(19)), "index": i}
             for i, row in enumerate(labels)]
    items[2] = {k: v[:11] if isinstance(v, list) else v for k, v in items[2].items()}  # a shorter row: padding
    batch = collate(items, pad_id=0)
    keep = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[:, 1:] != -100
    assert torch.equal(batch["loss_positions"], keep.flatten().nonzero().squeeze(1))
    assert batch["num_label_tokens"] == int(keep.sum())
    hidden = torch.randn(3, 19, 16, requires_grad=True)
    head = torch.nn.Linear(16, 50)
    masked = causal_lm_loss_from_hidden(hidden, head, batch["labels"], chunk_size=7)
    indexed = causal_lm_loss_from_hidden(hidden, head, batch["labels"], chunk_size=7,
                                         positions=batch["loss_positions"])
    assert torch.equal(masked, indexed)
    for a, b in zip(_grads(masked, hidden, head.weight), _grads(indexed, hidden, head.weight), strict=True):
        assert torch.equal(a, b)


def test_without_any_label_token_the_loss_is_nan_and_the_gradient_zero_like_transformers():
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    head = torch.nn.Linear(8, 11)
    labels = torch.full((2, 5), -100)
    ours, theirs = causal_lm_loss_from_hidden(hidden, head, labels), _reference(hidden, head, labels)
    assert torch.isnan(ours) and torch.isnan(theirs)
    assert torch.equal(_grads(ours, hidden)[0], _grads(theirs, hidden)[0])


def test_autocast_casts_like_transformers_lm_head():
    torch.manual_seed(1)
    hidden = torch.randn(2, 24, 32, requires_grad=True)
    head = torch.nn.Linear(32, 300)
    labels = _labels(2, 24, 300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = causal_lm_loss_from_hidden(hidden, head, labels, chunk_size=8)
        theirs = _reference(hidden, head, labels)
    assert ours.dtype == theirs.dtype == torch.float32
    _close(ours, theirs, 1e-3)
    # (the weight's gradient is summed over chunks in bf16 here, one rounding per chunk)
    for a, b, tol in zip(_grads(ours, hidden, head.weight), _grads(theirs, hidden, head.weight), (1e-3, 2e-2),
                         strict=True):
        assert a.dtype == b.dtype
        _close(a, b, tol)


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_the_logits_are_not_saved_for_backward():
    torch.manual_seed(0)
    tokens, width, vocab = 512, 32, 8192
    logits_bytes = tokens * vocab * 4  # 16 MiB
    hidden = torch.randn(1, tokens, width, requires_grad=True)
    head = torch.nn.Linear(width, vocab, bias=False)  # weight: 1 MiB
    labels = torch.randint(0, vocab, (1, tokens))
    theirs = _saved_bytes(lambda: _reference(hidden, head, labels))
    ours = _saved_bytes(lambda: causal_lm_loss_from_hidden(hidden, head, labels, chunk_size=128))
    assert theirs >= logits_bytes, "the reference must keep the logits, or this test proves nothing"
    assert ours < logits_bytes / 8, (ours, logits_bytes)


def _tiny(vocab: int = 96, tie: bool = False, **config):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=128,
                      tie_word_embeddings=tie, **config)
    model = LlamaForCausalLM(cfg)
    model.requires_grad_(False)
    return model.eval()


def _batch(vocab: int, tokens: int = 20):
    """Two rows; row 0 packs two samples (positions restart), row 1 has no label token."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (2, tokens), generator=g)
    positions = torch.cat([torch.arange(9), torch.arange(tokens - 9)]).repeat(2, 1)
    return {"input_ids": ids, "position_ids": positions, "labels": _labels(2, tokens, vocab, seed=4)}


def test_family_loss_equals_the_model_loss_with_a_lora():
    model = _tiny()
    network = lora.create_network(1.0, 4, 4.0, None, None, model)
    network.apply_to(None, model)
    for m in network.unet_loras:  # non-zero up weights, so every LoRA parameter gets a gradient
        torch.nn.init.normal_(m.lora_up.weight, std=0.05)
    assert why_not_chunked(model) is None
    family = LLMFamily(model, None, "tiny")
    batch = _batch(model.config.vocab_size)
    params = [p for p in network.parameters() if p.requires_grad]
    ours = family.loss(batch, 0)
    theirs = model(**batch, use_cache=False).loss
    _close(ours, theirs)
    for a, b in zip(_grads(ours, *params), _grads(theirs, *params), strict=True):
        _close(a, b, 2e-5)
    assert all(g.abs().sum() > 0 for g in _grads(family.loss(batch, 0), *params))


def test_tied_output_embedding_gets_the_gradient_of_both_uses():
    model = _tiny(tie=True)
    weight = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is weight
    weight.requires_grad_(True)
    batch = _batch(model.config.vocab_size)
    ours = causal_lm_loss(model, batch["input_ids"], batch["position_ids"], batch["labels"], chunk_size=5)
    theirs = model(**batch, use_cache=False).loss
    _close(ours, theirs)
    _close(_grads(ours, weight)[0], _grads(theirs, weight)[0])


def test_the_family_loss_does_not_keep_the_logits():
    """End to end: the model's path saves at least the fp32 logits more than ours does."""
    vocab, tokens = 8192, 256
    model = _tiny(vocab)
    network = lora.create_network(1.0, 4, 4.0, None, None, model)
    network.apply_to(None, model)
    family = LLMFamily(model, None, "tiny")
    batch = _batch(vocab, tokens)
    batch["labels"] = torch.randint(0, vocab, (2, tokens))
    theirs = _saved_bytes(lambda: model(**batch, use_cache=False).loss)
    ours = _saved_bytes(lambda: family.loss(batch, 0))
    assert theirs - ours >= 0.9 * 2 * tokens * vocab * 4, (theirs, ours)


class _QuantizedLike(torch.nn.Linear):
    pass


@pytest.mark.parametrize("change, reason", [
    (lambda m: setattr(m.config, "final_logit_softcapping", 30.0), "final_logit_softcapping"),
    (lambda m: setattr(m.config, "logit_scale", 0.5), "logit_scale"),
    (lambda m: setattr(m.config, "logits_scaling", 4.0), "logits_scaling"),
    (lambda m: setattr(m.config, "model_type", "mystery"), "model type"),
    (lambda m: m.set_output_embeddings(_QuantizedLike(32, 96, bias=False)), "plain nn.Linear"),
    (lambda m: setattr(m.lm_head, "forward", lambda x: x), "patched or hooked"),
    (lambda m: m.lm_head.register_forward_hook(lambda mod, i, o: o * 2), "patched or hooked"),
])
def test_models_the_chunked_loss_would_not_reproduce_fall_back(change, reason):
    model = _tiny()
    assert why_not_chunked(model) is None
    change(model)
    assert reason in why_not_chunked(model)


def test_softcapped_gemma2_keeps_transformers_loss():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, vocab_size=96, final_logit_softcapping=0.5)).eval()
    model.lm_head.weight.data.mul_(50)  # logits well beyond the cap
    assert "not known" in why_not_chunked(model)
    batch = _batch(96)
    theirs = model(**batch, use_cache=False).loss
    assert torch.equal(causal_lm_loss(model, batch["input_ids"], batch["position_ids"], batch["labels"]), theirs)
    hidden = model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).last_hidden_state
    uncapped = causal_lm_loss_from_hidden(hidden, model.lm_head, batch["labels"])
    assert (uncapped - theirs).abs() > 0.1, "soft-capping matters here, so the fallback is what keeps the loss right"


def test_4bit_base_keeps_a_plain_lm_head_and_the_same_loss(tmp_path):
    pytest.importorskip("bitsandbytes")
    from library.families import load_family
    from library.tiny_llm import save_tiny_llm

    folder = save_tiny_llm(tmp_path / "tiny", seed=0)
    family = load_family("llm", str(folder), seed=0, weight_dtype=torch.float32, device="cpu", load_in_4bit=True)
    family.prepare(torch.device("cpu"), torch.float32, True, False)
    assert why_not_chunked(family.model) is None  # bitsandbytes leaves lm_head unquantized
    batch = _batch(family.model.config.vocab_size)
    with torch.no_grad():
        family.model(input_ids=batch["input_ids"])  # bitsandbytes' CPU kernel re-stores absmax on its first call
        ours = family.loss(batch, 0)
        theirs = family.model(**batch, use_cache=False).loss
    _close(ours, theirs, 1e-4)


def test_chunk_size_defaults_and_validation():
    assert default_chunk_size(128256) == 2092 and default_chunk_size(32000) == 8192
    with pytest.raises(ValueError):
        linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), None, torch.zeros(3, dtype=torch.long), -1)
