"""tools/plan.py: the config-only estimate is within 20% of the tensor bytes of a real training step."""

from __future__ import annotations

import json

import pytest
import torch

from library.chunked_ce import causal_lm_loss
from library.tiny_models import save_tiny_sd
from networks import lora
from networks.lora import LoRAModule
from tools import plan


class Measured:
    """Live tensor bytes of a real step: weights, LoRA params, grads, optimizer state, saved activations."""

    def __init__(self, frozen: list[torch.nn.Module], params: list[torch.nn.Parameter]) -> None:
        self.frozen, self.params = frozen, params
        self.exclude = {p.untyped_storage().data_ptr() for m in frozen for p in m.parameters()}
        self.exclude |= {p.untyped_storage().data_ptr() for p in params}
        self.saved: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in self.exclude:
            self.saved[key] = t.untyped_storage().nbytes()
        return t

    def step(self, forward) -> int:
        optimizer = torch.optim.AdamW(self.params, lr=1e-3)
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
            loss = forward()
        activations = sum(self.saved.values())  # everything kept for backward, at its peak
        loss.backward()
        optimizer.step()
        weights = sum(p.numel() * p.element_size() for m in self.frozen for p in m.parameters())
        params = sum(p.numel() * p.element_size() for p in self.params)
        grads = sum(p.grad.numel() * p.grad.element_size() for p in self.params)
        state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                    if torch.is_tensor(v) and v.dim() > 0)  # fmt: skip
        return weights + params + grads + state + activations


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("plan") / "sd")


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("plan") / "llm"
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=101)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def measure_sd(folder, batch, resolution, dim, conv_dim, train_te, mixed) -> int:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    dtype = plan.DTYPES[mixed]
    unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet").to(dtype)
    te = CLIPTextModel.from_pretrained(str(folder), subfolder="text_encoder").to(dtype)
    args = {"conv_dim": str(conv_dim), "conv_alpha": "1"} if conv_dim else {}
    network = lora.create_network(1.0, dim, 1.0, None, te, unet, **args)
    network.apply_to(te, unet, train_te, True)
    unet.requires_grad_(False)
    te.requires_grad_(False)
    w, h = resolution
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, 4, h // 2, w // 2, generator=gen).to(dtype)
    ids = torch.randint(2, 50, (batch, 77), generator=gen)

    def forward():
        with torch.autocast("cpu", dtype=dtype, enabled=mixed != "no"):
            context = te(ids).last_hidden_state
            pred = unet(latents, torch.full((batch,), 10), encoder_hidden_states=context).sample
        return pred.float().pow(2).mean()

    return Measured([unet, te], [p for p in network.parameters() if p.requires_grad]).step(forward)


def measure_llm(folder, batch, seq, dim) -> int:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="sdpa")
    model.requires_grad_(False)
    loras = [LoRAModule(n, m, 1.0, dim, dim) for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]  # fmt: skip
    for module in loras:
        module.apply_to()
    ids = torch.randint(2, 100, (batch, seq), generator=torch.Generator().manual_seed(0))
    params = [p for m in loras for p in m.parameters()]
    # what train_network.py runs: LLMFamily.loss, the chunked cross-entropy (library/chunked_ce.py)
    return Measured([model], params).step(lambda: causal_lm_loss(model, ids, None, ids))


@pytest.mark.parametrize(
    "batch,resolution,dim,conv_dim,train_te,mixed",
    [(1, (64, 64), 4, None, True, "no"), (2, (32, 32), 8, 4, False, "bf16")],
    ids=["fp32-te", "bf16-locon-unet-only"],
)
def test_sd_estimate_within_20_percent(sd_dir, batch, resolution, dim, conv_dim, train_te, mixed):
    measured = measure_sd(sd_dir, batch, resolution, dim, conv_dim, train_te, mixed)
    est = plan.estimate(
        plan.PlanInput(
            str(sd_dir),
            batch,
            resolution,
            network_dim=dim,
            conv_dim=conv_dim,
            mixed_precision=mixed,
            train_text_encoder=train_te,
            cache_latents=True,
        )
    )
    assert abs(est.total / measured - 1) < 0.2, (est, measured)


def test_llm_estimate_within_20_percent(llm_dir):
    measured = measure_llm(llm_dir, batch=2, seq=48, dim=8)
    est = plan.estimate(plan.PlanInput(str(llm_dir), batch_size=2, seq_len=48, network_dim=8))
    assert abs(est.total / measured - 1) < 0.2, (est, measured)


def test_suggestions_reduce_memory_and_json(sd_dir, capsys):
    args = ["--pretrained_model_name_or_path", str(sd_dir), "--resolution", "128", "--train_batch_size", "4"]
    assert plan.main([*args, "--json"]) == 0
    base = json.loads(capsys.readouterr().out)["estimate"]["total"]
    assert plan.main([*args, "--json", "--gradient_checkpointing"]) == 0
    assert json.loads(capsys.readouterr().out)["estimate"]["activations"] < 0.7 * base
    assert plan.main([*args, "--vram", str(base / 2**30 * 0.6)]) == 0
    out = capsys.readouterr().out
    assert "fits in" in out and ": no" in out and "+ --gradient_checkpointing" in out
