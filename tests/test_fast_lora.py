"""The fused forward of networks.lora (networks/fast_lora.py) equals the plain formulation.

Forward outputs and the gradients of the input, ``lora_down`` and ``lora_up`` are compared with
``org(x) + multiplier · (alpha / r) · up(down(x))`` written out here, in fp32 (1e-5 relative) and under
CPU bf16 autocast (bf16 tolerance), on single layers and on whole tiny models with non-zero weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from networks import fast_lora, lora
from networks.targets import TargetSpec


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def adapted(layer: nn.Module, rank: int = 4, alpha: float = 2.0, multiplier: float = 0.7, **kw) -> lora.LoRAModule:
    layer.requires_grad_(False)
    module = lora.LoRAModule("t", layer, multiplier, rank, alpha, **kw)
    with torch.no_grad():
        module.lora_up.weight.normal_()
        module.lora_down.weight.normal_(std=0.2)
    module.apply_to()
    return module


def reference(module: lora.LoRAModule, base: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The plain formula on copies of the weights: output and leaf copies (x, down, up) to read grads from."""
    down = module.lora_down.weight.detach().clone().requires_grad_()
    up = module.lora_up.weight.detach().clone().requires_grad_()
    x = x.detach().clone().requires_grad_()
    if module.is_conv:
        h = F.conv2d(x, down, stride=base.stride, padding=base.padding)
        delta = F.conv2d(h, up)
    else:
        delta = F.linear(F.linear(x, down), up)
    return base(x) + module.multiplier * module.scale * delta, [x, down, up]


# In fp32, layers with more tokens than about their width run the merged-weight form (fast_lora.merge_pays),
# the others add the adapter product in place: both forms are covered for Linear and 1x1 conv, and the merged
# form both with backward merging again and with it reusing forward's merged weight (fast_lora.keep_merged).
LAYERS = {
    "linear": (lambda: nn.Linear(24, 40), (3, 7, 24), "linear"),
    "linear-merged": (lambda: nn.Linear(24, 40), (3, 17, 24), "linear"),
    "linear-merged-kept": (lambda: nn.Linear(24, 40), (4, 45, 24), "linear"),
    "linear-2d": (lambda: nn.Linear(24, 40, bias=False), (5, 24), "linear"),
    "conv1x1": (lambda: nn.Conv2d(24, 40, 1), (2, 24, 5, 6), "conv1x1"),
    "conv1x1-merged-kept": (lambda: nn.Conv2d(24, 40, 1), (2, 24, 10, 10), "conv1x1"),
    "conv1x1-in-place": (lambda: nn.Conv2d(24, 40, 1), (1, 24, 3, 2), "conv1x1"),
    "conv3x3": (lambda: nn.Conv2d(24, 40, 3, padding=1), (2, 24, 5, 6), None),
}


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_forward_and_gradients_match_plain(name, autocast):
    make, shape, kind = LAYERS[name]
    torch.manual_seed(0)
    layer = make()
    base = copy.deepcopy(layer)
    module = adapted(layer)
    assert module._fast == kind
    x = torch.randn(*shape, requires_grad=True)
    if kind is not None:
        tokens = x.numel() // 24
        merged = fast_lora.merge_pays(tokens, 24, 40, torch.bfloat16 if autocast else torch.float32)
        assert merged == (not autocast and ("merged" in name or name == "conv1x1"))
        assert fast_lora.keep_merged(tokens, 40) == name.endswith("-kept")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if kind is not None:  # the fused op really runs (it returns None where it does not apply)
            assert fast_lora.fast_forward(module, x) is not None
        out = layer(x)
        expected, leaves = reference(module, base, x)
    assert out.dtype == expected.dtype
    grad = torch.randn(out.shape)
    (out.float() * grad).sum().backward()
    (expected.float() * grad).sum().backward()
    tol = 2e-2 if autocast else 1e-5
    assert rel_err(out, expected) < tol
    for got, leaf in zip([x.grad, module.lora_down.weight.grad, module.lora_up.weight.grad], leaves, strict=True):
        assert got.dtype == leaf.dtype == torch.float32
        assert rel_err(got, leaf.grad) < tol


def test_frozen_input_gets_no_gradient_and_lora_still_trains():
    torch.manual_seed(0)
    module = adapted(nn.Linear(8, 8))
    x = torch.randn(4, 8)  # does not require grad: the base product's input gradient is skipped
    module.org_module(x).sum().backward()
    assert module.lora_down.weight.grad.abs().sum() > 0 and module.lora_up.weight.grad.abs().sum() > 0
    assert module.org_module.weight.grad is None


def test_fallbacks_stay_exact():
    torch.manual_seed(0)
    # A channels-last input, a base weight that trains, and multiplier 0 take the plain path.
    layer = nn.Conv2d(8, 6, 1)
    base = copy.deepcopy(layer).requires_grad_(False)
    conv = adapted(layer)
    x = torch.randn(2, 8, 3, 3).to(memory_format=torch.channels_last)
    assert fast_lora.fast_forward(conv, x) is None
    expected, _ = reference(conv, base, x)
    assert rel_err(conv.org_module(x), expected) < 1e-6

    lin = adapted(nn.Linear(8, 6))
    lin.org_module.weight.requires_grad_(True)
    x = torch.randn(3, 8)
    assert fast_lora.fast_forward(lin, x) is None
    lin.org_module(x).sum().backward()
    assert lin.org_module.weight.grad is not None

    # A bias that trains (the weight frozen) must get its gradient too: the fused op gives none.
    biased = adapted(nn.Linear(8, 6))
    biased.org_module.bias.requires_grad_(True)
    assert fast_lora.fast_forward(biased, x) is None
    biased.org_module(x).sum().backward()
    assert torch.allclose(biased.org_module.bias.grad, torch.full((6,), 3.0))

    lin.multiplier = 0.0
    assert torch.equal(lin.org_module(x), F.linear(x, lin.org_module.weight, lin.org_module.bias))


def test_stacked_loras_and_dora_use_the_plain_path():
    torch.manual_seed(0)
    layer = nn.Linear(8, 8)
    base = copy.deepcopy(layer).requires_grad_(False)
    first, second = adapted(layer), adapted(layer, rank=2)
    assert first._fast == "linear" and second._fast is None  # the second wraps the first's forward
    x = torch.randn(3, 8)
    d1 = first.multiplier * first.scale * F.linear(F.linear(x, first.lora_down.weight), first.lora_up.weight)
    d2 = second.multiplier * second.scale * F.linear(F.linear(x, second.lora_down.weight), second.lora_up.weight)
    assert rel_err(layer(x), base(x) + d1 + d2) < 1e-6

    from networks.lora_variants import DoRAModule

    dora = DoRAModule("d", nn.Linear(8, 8), lora_dim=2)
    dora.apply_to()
    assert dora._fast is None


def test_training_dropouts_take_the_plain_path_and_stay_random(monkeypatch):
    torch.manual_seed(0)
    calls = []
    monkeypatch.setattr(fast_lora, "fast_forward", lambda *a: calls.append(1))
    x = torch.randn(16, 8)
    for kwargs in ({"dropout": 0.5}, {"rank_dropout": 0.5}):
        module = adapted(nn.Linear(8, 8), **kwargs)
        module.train()
        outs = [module.org_module(x) for _ in range(3)]
        assert not torch.allclose(outs[0], outs[1]) or not torch.allclose(outs[1], outs[2]), kwargs
    assert calls == []
    module = adapted(nn.Linear(8, 8), dropout=0.5)
    module.eval()
    module.org_module(x)
    assert calls == [1], "in eval mode the dropouts are off and the fused op runs"


# --- whole tiny models --------------------------------------------------------------------------


def _tiny(kind: str) -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    if kind == "unet":
        from library.tiny_models import tiny_unet

        model = tiny_unet()
        inputs = {"sample": torch.randn(2, 4, 16, 16), "timestep": torch.tensor([10, 500]),
                  "encoder_hidden_states": torch.randn(2, 77, 32)}
    else:
        from library.tiny_llm import tiny_llama

        model = tiny_llama(vocab_size=96)
        inputs = {"input_ids": torch.randint(0, 96, (2, 24))}
    return model, inputs


def _network(kind: str, fast: bool):
    model, inputs = _tiny(kind)
    model.requires_grad_(False)
    network = lora.create_network(0.8, 4, 2.0, None, None, model, conv_dim="4", conv_alpha="2")
    network.apply_to(None, model, apply_text_encoder=False)
    torch.manual_seed(1)
    with torch.no_grad():
        for module in network.all_loras():
            module.lora_up.weight.normal_(std=0.3)
    if not fast:
        for handle in network._copy_hooks:
            handle.remove()
        for module in network.all_loras():
            module._fast, module._copies = None, None
    return model, network, inputs


def _run(kind: str, model: nn.Module, inputs: dict, autocast: bool) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if kind == "unet":
            out = model(**inputs).sample
        else:
            out = model(**inputs).logits
    (out.float() ** 2).mean().backward()
    return out


def _grads(network: lora.LoRANetwork) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in network.named_parameters()}


@pytest.mark.parametrize("kind", ["unet", "llm"])
def test_whole_model_matches_plain_fp32(kind):
    fast_model, fast_net, inputs = _network(kind, fast=True)
    plain_model, plain_net, _ = _network(kind, fast=False)
    kinds = {m._fast for m in fast_net.all_loras()}
    assert "linear" in kinds and (kind == "llm" or {"conv1x1", None} <= kinds)  # UNet: 1x1 proj and LoCon 3x3
    assert rel_err(_run(kind, fast_model, inputs, False), _run(kind, plain_model, inputs, False)) < 1e-5
    fast, plain = _grads(fast_net), _grads(plain_net)
    for name in plain:
        assert fast[name] is not None and fast[name].abs().sum() > 0, name
        assert rel_err(fast[name], plain[name]) < 1e-5, name


@pytest.mark.parametrize("kind", ["unet", "llm"])
def test_whole_model_under_bf16_autocast_is_as_close_to_fp32_as_plain(kind):
    # bf16 tolerance, measured against an fp32 run: over all gradients together the fused path errs about as
    # much as the plain one (measured 0.98-1.25x); a single small tensor's error is bf16 noise that moves with
    # the CPU's bf16 kernels (1-4x either way), so it only has to stay within a few times plain's.
    runs = {}
    for name, fast, autocast in (("fast", True, True), ("plain", False, True), ("fp32", False, False)):
        model, network, inputs = _network(kind, fast)
        runs[name] = (_run(kind, model, inputs, autocast), _grads(network))
    (out_fast, g_fast), (out_plain, g_plain), (out_ref, g_ref) = runs["fast"], runs["plain"], runs["fp32"]
    assert rel_err(out_fast, out_ref) <= max(2 * rel_err(out_plain, out_ref), 1e-2)

    def flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([grads[name].flatten() for name in g_ref])

    assert rel_err(flat(g_fast), flat(g_ref)) <= 1.5 * rel_err(flat(g_plain), flat(g_ref))
    for name in g_ref:
        assert rel_err(g_fast[name], g_ref[name]) <= max(5 * rel_err(g_plain[name], g_ref[name]), 2e-2), name


def _spied_llm():
    """A tiny LLM with the fused op; every ComputeCopies lookup of its first LoRA's root is recorded in ``seen``."""
    model, network, inputs = _network("llm", fast=True)
    probe = network.all_loras()[0]
    copies, index = probe._copies
    seen = []
    real_lookup = copies.lookup
    copies.lookup = lambda *a: seen.append(r := real_lookup(*a)) or r
    return model, network, inputs, probe, copies, index, seen


def test_compute_copies_live_for_one_forward_and_follow_updates():
    model, network, inputs, probe, copies, index, seen = _spied_llm()
    plain_model, plain_net, _ = _network("llm", fast=False)
    opts = [torch.optim.SGD(n.parameters(), lr=0.5) for n in (network, plain_net)]
    for step in range(3):
        outs = [_run("llm", m, inputs, autocast=True) for m in (model, plain_model)]
        assert rel_err(outs[0], outs[1]) < 3e-2, step
        assert seen and all(r is not None for r in seen), "inside the model's forward the copies are used"
        assert copies.depth == 0 and copies.ups == [], "the copies never outlive the forward"
        for opt in opts:
            opt.step()
            opt.zero_grad()
        seen.clear()
    network.set_multiplier(0.25)
    plain_net.set_multiplier(0.25)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert rel_err(model(**inputs).logits, plain_model(**inputs).logits) < 3e-2
    # Outside the model's forward a LoRA casts for itself.
    assert copies.lookup(index, torch.bfloat16, probe.multiplier * probe.scale) is None
    # The scaled bf16 copy of up is s·B rounded once, as the plain path's autocast cast of (B·s) is (scaling
    # after the cast would round twice). 0.3 x alpha/dim is no power of two, so the two differ.
    network.set_multiplier(0.3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        copies.depth = 1
        copies.refresh()
        _, up_s, alpha = copies.lookup(index, torch.bfloat16, probe.multiplier * probe.scale)
        copies.depth = 0
    assert alpha == 1.0
    assert torch.equal(up_s, (probe.lora_up.weight.detach() * (probe.multiplier * probe.scale)).to(torch.bfloat16))


# --- torch.compile --------------------------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj_in = nn.Conv2d(8, 16, 1)
        self.ff = nn.Linear(16, 16)
        self.proj_out = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj_in(x)
        h = self.ff(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.proj_out(F.gelu(h))


def _block_network(**dropouts) -> tuple[nn.Module, lora.LoRANetwork]:
    torch.manual_seed(0)
    block = _Block().requires_grad_(False)
    spec = TargetSpec("lora_unet", ("_Block",), ("_Block",))
    network = lora.LoRANetwork([], block, lora_dim=4, alpha=2.0, conv_lora_dim=2, conv_alpha=1.0, unet_spec=spec,
                               **dropouts)
    network.apply_to(None, block)
    assert len(network.all_loras()) == 3
    return block, network


@pytest.mark.parametrize("dropouts", [{}, {"dropout": 0.1, "rank_dropout": 0.2, "module_dropout": 0.3}],
                         ids=["plain", "dropouts"])
def test_compiles_without_graph_breaks(dropouts):
    import torch._dynamo

    block, network = _block_network(**dropouts)
    network.train()
    x = torch.randn(2, 8, 4, 4)
    explanation = torch._dynamo.explain(block)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    network.eval()  # deterministic: the compiled forward and gradients equal the eager (fused) ones
    out = compiled(x)
    out.sum().backward()
    grads = [p.grad.clone() for p in network.parameters()]
    network.zero_grad()
    eager = block(x)
    eager.sum().backward()
    assert rel_err(out, eager) < 1e-5
    for got, want in zip(grads, [p.grad for p in network.parameters()], strict=True):
        assert rel_err(got, want) < 1e-5
    torch._dynamo.reset()


# --- --fp8_base ----------------------------------------------------------------------------------


def _gpt2_conv1d() -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(40, 24)  # nf (out), nx (in): weight (24, 40)
    nn.init.normal_(layer.weight, std=0.1)
    nn.init.normal_(layer.bias, std=0.1)
    return layer


@pytest.mark.parametrize("name", ["linear", "conv1x1", "conv1d"])
def test_fp8_stored_base_takes_the_fused_path_with_the_same_result(name):
    from library.fp8 import store_in_fp8

    make, shape, _kind = LAYERS[name] if name != "conv1d" else (_gpt2_conv1d, (3, 7, 24), "conv1d")
    torch.manual_seed(0)
    holder = nn.Sequential(make())
    store_in_fp8(holder, torch.bfloat16)
    layer = holder[0]
    module = adapted(layer)
    assert module._fast == _kind
    x = torch.randn(*shape, requires_grad=True)
    assert fast_lora.fast_forward(module, x) is not None
    out = layer(x)
    assert out.dtype == torch.bfloat16
    # the reference: the same math with the fp8 weight upcast to bf16, the adapter in bf16
    w = layer.weight.to(torch.bfloat16)
    w = w.t() if name == "conv1d" else w  # Conv1D stores (in, out)
    b = layer.bias.to(torch.bfloat16)
    x2 = x.detach().to(torch.bfloat16).requires_grad_()
    down = module.lora_down.weight.detach().to(torch.bfloat16).requires_grad_()
    up = module.lora_up.weight.detach().to(torch.bfloat16).requires_grad_()
    s = module.multiplier * module.scale
    if name == "conv1x1":
        expected = F.conv2d(x2, w, b) + s * F.conv2d(F.conv2d(x2, down), up)
    else:
        expected = F.linear(x2, w, b) + s * F.linear(F.linear(x2, down), up)
    assert rel_err(out, expected) < 2e-2
    grad = torch.randn(out.shape)
    (out.float() * grad).sum().backward()
    (expected.float() * grad).sum().backward()
    assert module.lora_down.weight.grad.dtype == torch.float32
    pairs = ((x.grad, x2.grad), (module.lora_down.weight.grad, down.grad), (module.lora_up.weight.grad, up.grad))
    for got, want in pairs:
        assert rel_err(got, want) < 3e-2
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight.grad is None


def test_fp32_uses_the_parameters_and_applies_the_scale_as_alpha():
    # no cast needed: no scaled copy of lora_up per forward (it would also be saved for backward, over PEFT)
    model, network, inputs, probe, copies, index, seen = _spied_llm()
    _run("llm", model, inputs, autocast=False)
    down, up, alpha = seen[index]
    assert up.data_ptr() == probe.lora_up.weight.data_ptr() and down.data_ptr() == probe.lora_down.weight.data_ptr()
    assert alpha == probe.multiplier * probe.scale != 1.0
