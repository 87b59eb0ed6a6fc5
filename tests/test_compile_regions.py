"""Regional torch.compile with buckets: the number of compiled graphs is bounded and every block stays compiled.

Blocks of one class share a code object and so one cache of graphs; SD1.5 has 12 distinct ResnetBlock2D
channel configurations, so torch's default limit of 8 graphs per code object silently left blocks eager.
``recompile_budget`` sizes the limit from the model; these tests run bucket-like shape changes (height,
width, a short last batch) with dynamo's "eager" backend (tracing without code
generation) through a stack of ResnetBlock2Ds and make dynamo raise if any block would fall back.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from diffusers.models.resnet import ResnetBlock2D
from torch import nn
from torch._dynamo.utils import counters

from library.regional_compile import compile_regions, recompile_budget
from library.tiny_models import tiny_unet
from networks import lora

SHAPES = [(2, 8, 8), (2, 8, 12), (1, 8, 8), (1, 12, 16)]


class _ResnetStack(nn.Module):
    """A UNet's down path in miniature: ResnetBlock2Ds of 4 channel configurations and a 1x1 conv LoRA'd."""

    def __init__(self) -> None:
        super().__init__()
        chans = [(8, 8), (8, 16), (16, 16), (16, 8)]
        self.blocks = nn.ModuleList(ResnetBlock2D(in_channels=i, out_channels=o, temb_channels=None, groups=4)
                                    for i, o in chans)
        self.proj = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        for block in self.blocks:
            x = block(x, None)
        return x


def _compiled_stack(limit: int | None):
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = _ResnetStack()
    model.requires_grad_(False)
    module = lora.LoRAModule("lora_proj", model.proj, 1.0, 4, 4.0)
    module.apply_to()
    regions = compile_regions(model)
    limit = recompile_budget(regions) if limit is None else limit
    for region in regions:
        region.compile(backend="eager", recompile_limit=limit)
    return model, limit


def _step(model, batch: int, height: int, width: int) -> None:
    model(torch.randn(batch, 8, height, width)).mean().backward()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield
    torch._dynamo.reset()


def test_budget_counts_distinct_parameter_shapes():
    unet = tiny_unet()
    regions = compile_regions(unet)
    kinds = {type(m).__name__ for m in regions}
    assert kinds == {"BasicTransformerBlock", "ResnetBlock2D"}
    resnet_shapes = {tuple(p.shape for p in m.parameters()) for m in regions if type(m).__name__ == "ResnetBlock2D"}
    assert recompile_budget(regions) == 4 * len(resnet_shapes) + 4 > 8


def test_buckets_compile_a_bounded_number_of_graphs_and_no_block_falls_back():
    model, limit = _compiled_stack(None)
    for shape in SHAPES:  # the first epoch: every bucket shape once
        _step(model, *shape)
    graphs = counters["stats"]["unique_graphs"]
    assert 8 < graphs <= limit  # more than torch's default allows, within the budget
    for shape in SHAPES:  # later epochs: nothing new to compile
        _step(model, *shape)
    assert counters["stats"]["unique_graphs"] == graphs


def test_torch_default_limit_would_leave_blocks_eager():
    model, _limit = _compiled_stack(8)
    with pytest.raises(Exception, match="recompile_limit|cache_size_limit|FailOnRecompileLimitHit"):
        for shape in SHAPES:
            _step(model, *shape)
