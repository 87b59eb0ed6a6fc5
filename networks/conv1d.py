"""transformers' ``Conv1D`` (GPT-2, GPT-J-style checkpoints): a Linear layer whose weight is stored transposed.

``Conv1D(nf, nx)`` holds ``weight`` of shape ``(in, out)`` and computes ``y = x @ W + b``, where an
``nn.Linear`` holds ``(out, in)`` and computes ``y = x @ Wᵀ + b``. A LoRA is the same on both: its
factors keep Linear's orientation (``lora_down (r, in)``, ``lora_up (out, r)``), so the kohya file and
the PEFT adapter hold the same tensors; only the weight a ΔW ``(out, in)`` is merged into is read
through :func:`linear_weight`, a transposed view. PEFT calls this orientation ``fan_in_fan_out``.

The class is recognised by name (and its ``nf`` attribute), so nothing here imports transformers.
"""

from __future__ import annotations

import torch
from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (weight ``(in, out)``, ``y = x @ W + b``)."""
    weight = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(weight, "dim", lambda: 0)() == 2


def is_linear_like(module: nn.Module) -> bool:
    """An ``nn.Linear`` (bitsandbytes' layers included) or a ``Conv1D``: the layers an LLM LoRA adapts."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or a Conv1D."""
    if is_conv1d(module):
        n_in, n_out = module.weight.shape
        return int(n_in), int(n_out)
    return module.in_features, module.out_features


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight in ``nn.Linear``'s ``(out, in)`` orientation.

    For a Conv1D this is a transposed view of its parameter: ``copy_`` into it writes the parameter
    itself, which is how a ΔW ``(out, in)`` is merged without a second copy of the weight.
    """
    return module.weight.t() if is_conv1d(module) else module.weight
