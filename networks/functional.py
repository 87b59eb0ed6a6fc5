"""Pure LoRA weight math, apart from any module surgery.

A LoRA on a layer with weight ``W`` computes

    y = W x + multiplier · (alpha / r) · up(down(x))

where ``down`` maps the input to ``r`` channels (a Linear ``(r, in)`` or a Conv2d ``(r, in, kh, kw)``
with the original layer's kernel, stride and padding) and ``up`` maps them back (a Linear
``(out, r)`` or a 1x1 Conv2d ``(out, r, 1, 1)``). Because ``up`` is linear and 1x1, the two compose
into one layer of the original shape, so the same output comes from the merged weight

    W' = W + multiplier · scale · (up ⊗ down),   scale = alpha / r,

with ``(up ⊗ down)[o, i, ...] = Σ_r up[o, r] · down[r, i, ...]``.
"""

from __future__ import annotations

import torch


def delta_weight(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale · (up ⊗ down)``: the weight delta in the shape of the original layer's weight.

    Linear: ``down (r, in)``, ``up (out, r)`` → ``(out, in)``.
    Conv2d: ``down (r, in, kh, kw)`` (1x1 or kxk), ``up (out, r, 1, 1)`` → ``(out, in, kh, kw)``.
    """
    if down.dim() not in (2, 4) or up.dim() != down.dim():
        raise ValueError(
            f"expected 2D or 4D LoRA weights of the same rank, got {tuple(down.shape)} and {tuple(up.shape)}"
        )
    if up.shape[1] != down.shape[0]:
        raise ValueError(f"rank mismatch: lora_up {tuple(up.shape)} vs lora_down {tuple(down.shape)}")
    if up.dim() == 4 and up.shape[2:] != (1, 1):
        raise ValueError(f"lora_up of a conv LoRA must be 1x1, got {tuple(up.shape)}")
    # One matmul covers every case: the kernel dimensions ride along with the input channels.
    delta = up.flatten(1) @ down.flatten(1)
    return delta.reshape(up.shape[0], *down.shape[1:]) * scale


def merged_weight(
    weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor, scale: float, multiplier: float = 1.0
) -> torch.Tensor:
    """``W + multiplier · scale · (up ⊗ down)``, computed in float32, returned in ``weight``'s dtype and device."""
    delta = delta_weight(down.float(), up.float(), scale).to(weight.device)
    if delta.shape != weight.shape:
        raise ValueError(f"LoRA delta {tuple(delta.shape)} does not fit weight {tuple(weight.shape)}")
    return (weight.float() + multiplier * delta).to(weight.dtype)


def delta_norm(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """The Frobenius norm of ``scale · (up ⊗ down)`` (a 0-dim float32 tensor), without forming the delta.

    ``‖U D‖² = Σ (UᵀU) ⊙ (D Dᵀ)``: two r × r products instead of an out × in matrix per layer.
    """
    u, d = up.detach().flatten(1).float(), down.detach().flatten(1).float()
    return ((u.T @ u) * (d @ d.T)).sum().clamp(min=0).sqrt() * abs(scale)


def max_norm_ratios(norms: torch.Tensor, max_norm: float) -> torch.Tensor:
    """sd-scripts' max-norm rule: the factor taking each norm above ``max_norm`` down to it, 1 elsewhere.

    Scaling both ``up`` and ``down`` by the square root of the factor scales the delta by the factor.
    """
    clamped = norms.clamp(min=max_norm / 2)
    return clamped.clamp(max=max_norm) / clamped
