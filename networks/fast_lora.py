"""The fast eager forward of :class:`networks.lora.LoRAModule`: a frozen layer and its LoRA as one autograd op.

The math is the plain one, ``y = W x + b + s · B A x`` with ``s = multiplier · alpha / r``, computed so that
the big tensors (the activations ``x`` and ``y`` and their gradients) are touched as few times as possible:

- ``s`` never touches a big tensor: it is the ``alpha`` of the products with ``B`` (fp32, no copy of ``B``), or
  folded into the compute-dtype copy of ``B`` that a cast makes anyway (``B_s = s · B``, r × out);
- the adapter product is added into the base output in place (``addmm_`` / ``baddbmm_``), and in backward
  into the base input gradient in place, so no separate ``out + delta`` / ``gx + gx_lora`` passes;
- under autocast the input is cast to the compute dtype once and shared by the base and ``down`` products
  (autocast alone casts it twice), and the adapter weights are cast once per model forward for all modules
  together (:class:`ComputeCopies`, two multi-tensor kernels) instead of per call;
- the custom :class:`torch.autograd.Function` saves ``x``, the small ``h = A x`` and references to the
  weights (in fp32 also the merged weight where it is small, :func:`keep_merged`); it never saves the base
  output, and the frozen base weight gets no gradient.

Gradients: with ``g = dL/dy``, ``dL/dh = B_s^T g``; ``dL/dx = W^T g + A^T (B_s^T g)``; ``dL/dA = (B_s^T g) x^T``;
``dL/dB = s · g h^T``. Applies to ``nn.Linear``, transformers' ``Conv1D`` (its ``(in, out)`` weight passed as the
transposed view ``W = weight.t()``, so the op is the Linear one; no copy) and 1x1 ``nn.Conv2d`` (stride 1, no
padding, one group) with their own forward, in eager mode, without element/rank dropout; everything else (kxk
convs, quantized layers, dropouts, ``torch.compile``, a base weight or bias that trains) takes the plain path in
networks/lora.py, which ``torch.compile`` traces without graph breaks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from networks.conv1d import is_conv1d

FAST_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn)


def fast_kind(org_module: nn.Module, org_forward: object) -> str | None:
    """``"linear"`` / ``"conv1d"`` / ``"conv1x1"`` when the fused op reproduces ``org_forward`` exactly, else None.

    That is the layer's own forward, or library/fp8.py's (a float8 weight upcast to its compute dtype, which
    the fused op does as well: it casts the base weight to the dtype it computes in).
    """
    own_forward = getattr(org_forward, "__func__", None)
    fp8 = getattr(org_forward, "fp8_compute_dtype", None) is not None
    if type(org_module) is nn.Linear and (own_forward is nn.Linear.forward or fp8):
        return "linear"
    if is_conv1d(org_module) and (own_forward is type(org_module).forward or fp8):  # x @ W + b == F.linear(x, Wᵀ, b)
        return "conv1d"
    if (
        type(org_module) is nn.Conv2d and (own_forward is nn.Conv2d.forward or fp8)
        and tuple(org_module.kernel_size) == (1, 1) and tuple(org_module.stride) == (1, 1)
        and tuple(org_module.padding) == (0, 0) and tuple(org_module.dilation) == (1, 1)
        and org_module.groups == 1 and org_module.padding_mode == "zeros"
    ):  # fmt: skip
        return "conv1x1"
    return None


def compute_dtype(device_type: str, fallback: torch.dtype) -> torch.dtype:
    """The dtype matmuls run in: autocast's when it is on for this device type, else ``fallback``."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except RuntimeError:  # a device type autocast does not know (e.g. "meta" in tools/plan.py)
        pass
    return fallback


class ComputeCopies:
    """Compute-dtype copies of the adapter weights of the LoRAs inside one root model, scale folded into ``up``.

    Refreshed by a forward pre-hook on the root (the UNet, a text encoder, the LLM) and valid only until that
    forward returns, so an optimizer step, ``load_state_dict`` or ``set_multiplier`` between two forwards can
    never leave a stale copy; a LoRA called outside its root's forward (or a recomputation under gradient
    checkpointing) casts for itself. The copies are detached: gradients still reach the fp32 parameters
    through the autograd function's ``down`` / ``up`` inputs.
    """

    def __init__(self, loras: Sequence[nn.Module]) -> None:
        self.loras = list(loras)
        for index, lora in enumerate(self.loras):
            lora._copies = (self, index)
        self.depth = 0
        self.dtype: torch.dtype | None = None
        self.scales: list[float] = []
        self.alphas: list[float] = []
        self.downs: list[torch.Tensor] = []
        self.ups: list[torch.Tensor] = []

    def lookup(self, index: int, dtype: torch.dtype, scale: float) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(down, up, alpha): ``alpha`` is the scale still to apply (1.0 where it is folded into ``up``)."""
        if self.depth > 0 and self.dtype == dtype and self.scales[index] == scale:
            return self.downs[index], self.ups[index], self.alphas[index]
        return None

    @torch.no_grad()
    def refresh(self) -> None:
        # Fresh tensors each time: a copy saved for the backward of an earlier forward is never overwritten.
        downs = [lora.lora_down.weight for lora in self.loras]
        ups = [lora.lora_up.weight for lora in self.loras]
        dtype = compute_dtype(downs[0].device.type, downs[0].dtype)
        self.scales = [lora.multiplier * lora.scale for lora in self.loras]
        self.dtype = dtype
        if all(p.dtype == dtype for p in downs):
            self.downs = [p.detach() for p in downs]
        else:
            self.downs = [torch.empty_like(p, dtype=dtype, memory_format=torch.contiguous_format) for p in downs]
            torch._foreach_copy_(self.downs, downs)
        if all(p.dtype == dtype for p in ups):
            # No cast needed: use the parameters as they are and apply the scale as the products' alpha
            # (a scaled copy would cost a kernel per module and memory saved for backward, over PEFT's).
            self.ups, self.alphas = [p.detach() for p in ups], list(self.scales)
        else:  # the cast copy carries the scale: scaled in the parameters' precision, then rounded once
            self.ups = [torch.empty_like(p, dtype=dtype, memory_format=torch.contiguous_format) for p in ups]
            torch._foreach_copy_(self.ups, torch._foreach_mul([p.detach() for p in ups], self.scales))
            self.alphas = [1.0] * len(ups)

    def _enter(self, _module: nn.Module, _args: object) -> None:
        if torch.compiler.is_compiling():
            return
        self.depth += 1
        if self.depth == 1:
            self.refresh()

    def _exit(self, _module: nn.Module, _args: object, _output: object) -> None:
        if torch.compiler.is_compiling():
            return
        self.depth = max(0, self.depth - 1)
        if self.depth == 0:  # drop the references so the copies never outlive a forward
            self.downs, self.ups = [], []


def install_compute_copies(loras: Iterable[nn.Module], roots: Iterable[nn.Module | None]) -> list[RemovableHandle]:
    """One :class:`ComputeCopies` per root model holding fast-path LoRAs; returns the hook handles."""
    loras = [lora for lora in loras if getattr(lora, "_fast", None)]
    handles: list[RemovableHandle] = []
    for root in roots:
        if root is None or not loras:
            continue
        inside = {id(m) for m in root.modules()}
        mine = [lora for lora in loras if id(lora.org_module) in inside]
        if not mine:
            continue
        copies = ComputeCopies(mine)
        handles.append(root.register_forward_pre_hook(copies._enter))
        handles.append(root.register_forward_hook(copies._exit, always_call=True))
    return handles


def merge_pays(tokens: int, in_features: int, out_features: int, dtype: torch.dtype) -> bool:
    """Whether to run the base product with the merged weight ``W + B_s A`` instead of adding ``B_s (A x)``.

    Merging replaces two skinny products over the activations (``B_s h`` in forward, ``A^T (B_s^T g)`` in
    backward: ``tokens · r · (in + out)`` multiply-adds) by two over the weight (the merge, done again in
    backward instead of keeping a weight-sized copy: ``2 · out · r · in``). It pays when there are more tokens
    than about the layer's width, as in every UNet level and LLM batch. Only in fp32: in bf16/fp16 ``W + δ``
    would round the adapter's delta at the base weight's precision (2^-8 relative), losing most of it.
    """
    return dtype == torch.float32 and tokens * (in_features + out_features) > 2 * in_features * out_features


def keep_merged(tokens: int, out_features: int) -> bool:
    """Whether backward reuses forward's merged weight instead of merging again: when the weight is at most a
    quarter of the input the op saves anyway (``4 · out ≤ tokens``), so the extra memory stays below 25%."""
    return 4 * out_features <= tokens


def _mm(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha · a @ b``; the factor goes on the small result."""
    out = torch.mm(a, b)
    return out if alpha == 1.0 else out.mul_(alpha)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype is dtype else t.to(dtype)


class _LinearLoRA(torch.autograd.Function):
    """``F.linear(x, W, b) + (x A^T) B_s^T`` for a frozen ``W`` (see the module docstring for the gradients).

    Autograd sees only ``x`` and the two adapter parameters; everything else (the frozen weight and bias, the
    compute copies, the scales) rides in ``rest``: fewer inputs are fewer per-call checks, which matters when
    a model has hundreds of adapted layers.
    """

    @staticmethod
    def forward(ctx, x, down, up, rest):  # noqa: ARG004  (down/up: their gradients are returned)
        weight, bias, down_c, up_s, scale, alpha = rest
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        b = None if bias is None else _cast(bias, dtype)
        w = _cast(weight, dtype)
        tokens, out_features = x2.shape[0], weight.shape[0]
        merged = merge_pays(tokens, x2.shape[1], out_features, dtype)
        h = F.linear(x2, down_c)
        kept = None
        if merged:
            w = torch.addmm(w, up_s, down_c, alpha=alpha)
            out = F.linear(x, w, b)
            kept = w if keep_merged(tokens, out_features) else None
        else:
            out = F.linear(x, w, b)
            out.view(-1, out_features).addmm_(h, up_s.t(), alpha=alpha)
        ctx.save_for_backward(x2, weight, down_c, up_s, h, kept)
        ctx.scale, ctx.alpha, ctx.x_shape, ctx.merged = scale, alpha, x.shape, merged
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x2, weight, down_c, up_s, h, kept = ctx.saved_tensors
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        alpha = ctx.alpha
        gh = torch.mm(g2, up_s)  # dL/dh / alpha: small, (tokens, r); alpha goes on the small results below
        grad_x = grad_down = grad_up = None
        needs = ctx.needs_input_grad
        if needs[0]:
            if ctx.merged:  # W^T g + A^T (B_s^T g) = (W + B_s A)^T g
                merged = kept if kept is not None else torch.addmm(_cast(weight, g2.dtype), up_s, down_c, alpha=alpha)
                grad_x = torch.mm(g2, merged).view(ctx.x_shape)
            else:
                gx = torch.mm(g2, _cast(weight, g2.dtype))
                grad_x = gx.addmm_(gh, down_c, alpha=alpha).view(ctx.x_shape)
        if needs[1]:
            grad_down = _mm(gh.t(), x2, alpha)
        if needs[2]:
            # (h^T g)^T rather than g^T h: with g on the right the wide operand streams row-major (1.6-1.9x faster
            # on a CPU for out >> r); autograd lays the transposed result out like the parameter.
            grad_up = _mm(h.t(), g2, ctx.scale).t()
        return grad_x, grad_down, grad_up, None


class _Conv1x1LoRA(torch.autograd.Function):
    """The same for a frozen 1x1 conv on NCHW: per sample, ``y_n = W x_n + b + B_s (A x_n)`` over H·W columns."""

    @staticmethod
    def forward(ctx, x, down, up, rest):  # noqa: ARG004
        weight, bias, down_c, up_s, scale, alpha = rest
        dtype = x.dtype
        n, c, o, r = x.shape[0], x.shape[1], weight.shape[0], down_c.shape[0]
        x3 = x.reshape(n, c, -1)
        b = None if bias is None else _cast(bias, dtype)
        tokens = n * x3.shape[2]
        merged = merge_pays(tokens, c, o, dtype)
        h = torch.matmul(down_c.reshape(r, c), x3)  # (n, r, H·W)
        kept = None
        if merged:
            w = torch.addmm(_cast(weight.reshape(o, c), dtype), up_s.reshape(o, r), down_c.reshape(r, c), alpha=alpha)
            out = F.conv2d(x, w.view(o, c, 1, 1), b)
            kept = w if keep_merged(tokens, o) else None
        else:
            out = F.conv2d(x, _cast(weight, dtype), b).contiguous()
            out.view(n, o, -1).baddbmm_(up_s.reshape(o, r).expand(n, o, r), h, alpha=alpha)
        ctx.save_for_backward(x3, weight, down_c, up_s, h, kept)
        ctx.scale, ctx.alpha, ctx.x_shape, ctx.merged = scale, alpha, x.shape, merged
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x3, weight, down_c, up_s, h, kept = ctx.saved_tensors
        n, c = x3.shape[:2]
        o, r = up_s.shape[0], down_c.shape[0]
        alpha = ctx.alpha
        g3 = grad_out.reshape(n, o, -1)
        up2, down2 = up_s.reshape(o, r), down_c.reshape(r, c)
        gh = torch.matmul(up2.t(), g3)  # (n, r, H·W), without alpha (applied to the small results)
        grad_x = grad_down = grad_up = None
        needs = ctx.needs_input_grad
        if needs[0]:
            w = _cast(weight.reshape(o, c), g3.dtype)
            if ctx.merged:
                merged = kept if kept is not None else torch.addmm(w, up2, down2, alpha=alpha)
                grad_x = torch.matmul(merged.t(), g3).view(ctx.x_shape)
            else:
                grad_x = torch.matmul(w.t(), g3).baddbmm_(down2.t().expand(n, c, r), gh, alpha=alpha)
                grad_x = grad_x.view(ctx.x_shape)
        if needs[1]:
            grad_down = torch.matmul(gh, x3.transpose(1, 2)).sum(0).mul_(alpha).view(r, c, 1, 1)
        if needs[2]:
            grad_up = torch.matmul(g3, h.transpose(1, 2)).sum(0).mul_(ctx.scale).view(o, r, 1, 1)
        return grad_x, grad_down, grad_up, None


def fast_forward(lora: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``org(x) + multiplier · scale · up(down(x))`` through the fused op, or None where it does not apply."""
    org = lora._org[0]
    # A Conv1D's weight (in, out) enters as its transposed view: the fused Linear op is then exactly its forward.
    weight, bias = (org.weight.t() if lora._fast == "conv1d" else org.weight), org.bias
    if weight.requires_grad or weight.dtype not in FAST_FLOAT_DTYPES or (bias is not None and bias.requires_grad):
        return None  # a base layer that trains needs autograd's own ops for its gradients
    conv = lora._fast == "conv1x1"
    if conv and (x.dim() != 4 or not x.is_contiguous()):
        return None
    down, up = lora.lora_down.weight, lora.lora_up.weight
    # an fp8-stored base computes in the dtype it was given (library/fp8.py), like its own forward
    dtype = getattr(lora.org_forward, "fp8_compute_dtype", None) or compute_dtype(x.device.type, x.dtype)
    scale = lora.multiplier * lora.scale
    copies = lora._copies
    cached = copies[0].lookup(copies[1], dtype, scale) if copies is not None else None
    if cached is not None:
        down_c, up_c, alpha = cached
    elif up.dtype == dtype:  # no cast: the scale goes into the products (ComputeCopies.refresh does the same)
        down_c, up_c, alpha = _cast(down.detach(), dtype), up.detach(), scale
    else:
        down_c, up_c, alpha = down.detach().to(dtype), (up.detach() * scale).to(dtype), 1.0
    fn = _Conv1x1LoRA if conv else _LinearLoRA
    return fn.apply(_cast(x, dtype), down, up, (weight, bias, down_c, up_c, scale, alpha))


def lora_forward(lora: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """:meth:`LoRAModule.forward`: the fused op where it applies, else ``org(x) + plain_delta(x)``."""
    if lora.multiplier == 0:
        return lora.org_forward(x, *args, **kwargs)
    eager = not torch.compiler.is_compiling()
    if lora.training and lora.module_dropout > 0 and eager and torch.rand(()).item() < lora.module_dropout:
        return lora.org_forward(x, *args, **kwargs)
    if lora._fast and eager and not args and not kwargs and not (
        lora.training and (lora.dropout > 0 or lora.rank_dropout > 0)
    ):
        out = fast_forward(lora, x)
        if out is not None:
            return out
    out, delta = lora.org_forward(x, *args, **kwargs), plain_delta(lora, x)
    if lora.training and lora.module_dropout > 0 and not eager:
        # Compiled: the skip is a 0/1 factor, so no data-dependent branch breaks the graph.
        delta = delta * (torch.rand((), device=x.device) >= lora.module_dropout).to(delta.dtype)
    return out + delta


def plain_delta(lora: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``multiplier · scale · up(down(x))`` with the training-time dropouts, as separate ops (any layer)."""
    h = lora.lora_down(x)
    scale = lora.multiplier * lora.scale
    if lora.training:
        if lora.dropout > 0:
            h = F.dropout(h, p=lora.dropout)
        if lora.rank_dropout > 0:
            h = h * rank_mask(h, lora.rank_dropout, lora.is_conv)
            scale = scale / (1.0 - lora.rank_dropout)
    up = lora.lora_up.weight * scale  # the scale folded into the small matrix, not the big output
    return F.conv2d(h, up) if lora.is_conv else F.linear(h, up)


def rank_mask(h: torch.Tensor, p: float, is_conv: bool) -> torch.Tensor:
    """One keep/drop decision per (sample, rank); ranks are dim 1 for conv, the last dim for Linear."""
    shape = [1] * h.dim()
    rank_dim = 1 if is_conv else h.dim() - 1
    shape[rank_dim] = h.shape[rank_dim]
    if h.dim() > 1:
        shape[0] = h.shape[0]
    return (torch.rand(shape, device=h.device) >= p).to(h.dtype)
