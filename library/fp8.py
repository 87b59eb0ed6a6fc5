"""--fp8_base: keep the frozen base weights in float8 (half the memory of bf16), compute in bf16/fp16.

Each frozen Linear / Conv2d (and transformers' Conv1D, GPT-2's) keeps its weight as float8_e4m3fn
and upcasts it for the call, so matmuls run in the compute dtype on any device. It must be applied
before the network wraps the modules: the LoRA then adds its product to the upcast base output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from networks.conv1d import is_conv1d

FP8 = torch.float8_e4m3fn


def _linear_forward(module: nn.Linear, compute_dtype: torch.dtype):
    def forward(x: torch.Tensor) -> torch.Tensor:
        bias = module.bias.to(compute_dtype) if module.bias is not None else None
        return F.linear(x.to(compute_dtype), module.weight.to(compute_dtype), bias)

    forward.fp8_compute_dtype = compute_dtype  # networks/fast_lora.py fuses this layer with its LoRA
    return forward


def _conv_forward(module: nn.Conv2d, compute_dtype: torch.dtype):
    def forward(x: torch.Tensor) -> torch.Tensor:
        bias = module.bias.to(compute_dtype) if module.bias is not None else None
        return module._conv_forward(x.to(compute_dtype), module.weight.to(compute_dtype), bias)

    forward.fp8_compute_dtype = compute_dtype
    return forward


def _conv1d_forward(module: nn.Module, compute_dtype: torch.dtype):
    def forward(x: torch.Tensor) -> torch.Tensor:  # Conv1D: y = x @ W + b with W (in, out), i.e. linear with Wᵀ
        bias = module.bias.to(compute_dtype) if module.bias is not None else None
        return F.linear(x.to(compute_dtype), module.weight.to(compute_dtype).t(), bias)

    forward.fp8_compute_dtype = compute_dtype
    return forward


@torch.no_grad()
def store_in_fp8(model: nn.Module, compute_dtype: torch.dtype) -> int:
    """Convert every Linear / Conv2d / Conv1D weight of ``model`` to float8 storage; returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            make = _linear_forward
        elif isinstance(module, nn.Conv2d):
            make = _conv_forward
        elif is_conv1d(module):
            make = _conv1d_forward
        else:
            continue
        module.weight.data = module.weight.data.to(FP8)
        module.forward = make(module, compute_dtype)
        count += 1
    # diffusers' model.dtype reports its first parameter's dtype, float8 now; callers ask compute_dtype_of
    model._fp8_compute_dtype = compute_dtype
    return count


def compute_dtype_of(model: nn.Module) -> torch.dtype:
    """The dtype a model's inputs should have: its weights' dtype, or the compute dtype under --fp8_base."""
    return getattr(model, "_fp8_compute_dtype", None) or model.dtype
