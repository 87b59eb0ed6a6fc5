"""Regional torch.compile: the frozen model's repeated blocks compiled one by one (--torch_compile,
--dynamo_backend), with a recompile limit sized from the model so bucketed shapes never fall back to eager."""

from __future__ import annotations

import inspect
from typing import Any

import torch

# Repeated blocks compiled one by one ("regional compilation"): each class compiles once and is
# reused, so start-up stays short, and the Python around them (tokenizers, the loss) is not traced.
REGION_CLASSES = ("BasicTransformerBlock", "ResnetBlock2D")  # plus every *DecoderLayer of transformers


def compile_regions(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks regional compilation compiles one by one, outermost first."""
    return [m for m in model.modules()
            if type(m).__name__ in REGION_CLASSES or type(m).__name__.endswith("DecoderLayer")]


def recompile_budget(regions: list[torch.nn.Module]) -> int:
    """Graphs one block class may need: 4 per distinct set of parameter shapes, plus slack.

    Instances of a class share one code object, hence one cache of compiled graphs. Parameters keep static
    shapes, so every distinct channel configuration (SD1.5 has about a dozen kinds of ResnetBlock2D) is its
    own graph, twice: with static shapes, then with dynamic batch / height / width once a second bucket or a
    last short batch arrives (dynamo's automatic dynamic shapes), and again for the first block of a stack
    whose input does not require grad. torch's default limit of 8 would silently run the rest eagerly.
    """
    kinds: dict[str, set] = {}
    for module in regions:
        shapes = tuple((name, tuple(p.shape)) for name, p in module.named_parameters())
        kinds.setdefault(type(module).__name__, set()).add(shapes)
    return 4 * max((len(v) for v in kinds.values()), default=1) + 4


def compile_blocks(model: torch.nn.Module, accelerator: Any) -> tuple[int, int]:
    """torch.compile the frozen model's repeated blocks in place with the dynamo plugin's settings.

    accelerate would otherwise compile the whole training module (loss, tokenizer calls and all);
    its plugin is switched to NO afterwards so that it does not. Returns (blocks compiled, recompile limit
    per block class, see :func:`recompile_budget`).
    """
    from accelerate.utils import DynamoBackend

    plugin = accelerator.state.dynamo_plugin
    if plugin.backend == DynamoBackend.NO:
        return 0, 0
    regions = compile_regions(model)
    limit = recompile_budget(regions)
    kwargs = plugin.to_kwargs()
    if "recompile_limit" in inspect.signature(torch.compile).parameters:  # torch >= 2.9: per compiled region
        kwargs["recompile_limit"] = limit
    else:  # older torch: the global limit per code object (named cache_size_limit before 2.6)
        import torch._dynamo.config as dynamo_config

        name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
        setattr(dynamo_config, name, max(getattr(dynamo_config, name), limit))
    for module in regions:
        module.compile(**kwargs)
    plugin.backend = DynamoBackend.NO
    return len(regions), limit
