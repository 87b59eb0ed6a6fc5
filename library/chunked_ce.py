"""Causal-LM cross-entropy without the (tokens x vocab) logits tensor.

transformers computes the loss from the full logits, upcast to fp32: for Llama-3 (128k vocab) and
8k tokens that is 4 GiB, kept for backward, often more than the LoRA's whole activation memory.
Here only the label tokens (labels != -100 after the shift) are projected, a chunk of tokens at a
time, and each chunk's logits become its gradient right away instead of being kept for backward. The result is the same
mean over label tokens, with transformers' semantics: ``hidden[:, t]`` predicts ``labels[:, t + 1]``,
logits are computed in the weights' (or autocast's) dtype and upcast to fp32 before the softmax.
Where CUDA is present and ``liger_kernel`` is installed, its fused Triton kernel does the same work.

The chunked path is used only for models known to compute ``logits = lm_head(hidden)`` and nothing
more (:func:`why_not_chunked`); any other model keeps transformers' own loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
# Elements of one chunk's fp32 logits (1 GiB): 2048 tokens for a 128k vocabulary, 8192 for 32k.
LOGITS_BUDGET = 2**28
MAX_CHUNK_TOKENS = 8192

# Model types whose transformers ForCausalLM.forward is exactly `logits = self.lm_head(outputs of
# self.model)` followed by the standard causal-LM loss (checked against transformers 5.x sources).
# Gemma2/3 (soft-capping), Cohere (logit_scale), Granite (logits_scaling) are deliberately absent.
SAFE_MODEL_TYPES = frozenset({
    "llama", "mistral", "ministral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi", "phi3",
    "gemma", "starcoder2", "olmo", "olmo2", "olmo3", "stablelm", "smollm3", "glm", "glm4", "helium",
    "seed_oss", "exaone4", "apertus", "arcee",
})
# Config attributes that mean the logits are post-processed; any of them set (not None) falls back.
LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "logit_scaling",
                        "logits_scale", "lm_head_multiplier", "output_multiplier_scale", "scale_width")


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk so that one chunk's fp32 logits stay within LOGITS_BUDGET elements."""
    return max(1, min(MAX_CHUNK_TOKENS, LOGITS_BUDGET // max(1, vocab_size)))


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean CE of ``linear(hidden, weight, bias)`` over all rows, chunk by chunk, gradients made in forward.

    Each chunk's logits are computed once: forward turns them into the loss and, when gradients are wanted,
    straight away into ``softmax - onehot`` and the input gradient ``(softmax - onehot) @ weight`` (and the
    weight/bias gradients where those train), so the lm_head costs two products as on transformers' path,
    not three as recomputing the logits in backward would. Those gradients are kept unnormalized (entries
    of ``softmax - onehot`` lie in [-1, 1], safe to cast to fp16/bf16); backward only multiplies them by
    ``grad_output / n`` in fp32, so fp16 loss scaling still reaches them before the cast to the input dtype.
    Nothing logits-sized outlives a chunk; the saved input gradient is the size of ``hidden``, which then
    need not be kept.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, chunk_size: int, wants: tuple[bool, bool, bool]) -> torch.Tensor:
        n = hidden.shape[0]
        need_hidden, need_weight, need_bias = wants
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # Accumulated in the weight's dtype: an fp32 copy of a 128k x 4k lm_head would cost 2 GiB (a LoRA
        # leaves lm_head frozen, so this is rarely computed at all).
        grad_weight = torch.zeros_like(weight) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            h, t = hidden[start:end], targets[start:end]
            logits = F.linear(h, weight, bias).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if need_hidden or need_weight or need_bias:
                grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                grad[torch.arange(end - start, device=grad.device), t] -= 1.0
                if need_bias:
                    grad_bias += grad.sum(0)
                grad = grad.to(weight.dtype)
                if need_hidden:
                    torch.mm(grad, weight, out=grad_hidden[start:end])
                if need_weight:
                    grad_weight.addmm_(grad.t(), h)
            del logits
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.n, ctx.dtypes = n, (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total / n  # 0 / 0 = nan without label tokens, as F.cross_entropy(reduction="mean")

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):  # type: ignore[override]
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_output.float() / max(ctx.n, 1)
        grads = [None if g is None else (g.float() * scale).to(dtype)
                 for g, dtype in zip((grad_hidden, grad_weight, grad_bias), ctx.dtypes, strict=True)]
        return grads[0], grads[1], grads[2], None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T + bias`` (rows N x H) against ``targets`` (N), all counted.

    Chunks of ``chunk_size`` rows (default :func:`default_chunk_size`); the logits are never held
    for more than one chunk.
    """
    size = chunk_size or default_chunk_size(weight.shape[0])
    if size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    grad_on = torch.is_grad_enabled()  # inside the Function, needs_input_grad ignores no_grad
    wants = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
             grad_on and bias is not None and bias.requires_grad)
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, size, wants)


def liger_available(device: torch.device) -> bool:
    """Whether liger-kernel's fused linear cross-entropy can run on ``device`` (CUDA with Triton)."""
    if device.type != "cuda":
        return False
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss  # noqa: F401
    except Exception:  # not installed, or installed without a working Triton
        return False
    return True


def _liger_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor) -> torch.Tensor:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    out = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="mean")(weight, hidden, targets, bias)
    return out[0] if isinstance(out, tuple) else getattr(out, "loss", out)


def causal_lm_loss_from_hidden(hidden_states: torch.Tensor, lm_head: torch.nn.Linear, labels: torch.Tensor, *,
                               chunk_size: int | None = None, use_liger: bool | None = None,
                               positions: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' causal-LM loss from the decoder's last hidden states (B, T, H) and labels (B, T).

    ``hidden_states[:, t]`` predicts ``labels[:, t + 1]``; labels equal to -100 are ignored and their
    positions are never projected. The mean is over the remaining tokens (nan when there are none, like
    transformers). ``use_liger`` None means: liger where it is available, chunked PyTorch otherwise.
    ``positions``: the flat (batch x position) indices of exactly those predictions, when the caller has them
    (the LLM collate finds them on the CPU): selecting by index needs no device sync, a boolean mask does.
    """
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    if positions is not None:
        positions = positions.to(hidden_states.device)
        hidden = hidden_states.reshape(-1, hidden_states.shape[-1]).index_select(0, positions)
        targets = shifted.reshape(-1).index_select(0, positions.to(shifted.device))
    else:
        keep = shifted != IGNORE_INDEX
        hidden = hidden_states[keep]
        targets = shifted[keep]
    weight, bias = lm_head.weight, lm_head.bias
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        # Cast as autocast would cast the lm_head's matmul, then run without autocast so that the
        # forward and backward of every chunk see the same dtypes.
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    elif hidden.dtype != weight.dtype:
        raise RuntimeError(f"hidden states are {hidden.dtype} but lm_head is {weight.dtype}")
    with torch.autocast(device_type, enabled=False):
        if use_liger is None:
            # fp16: liger scales (softmax - onehot) by 1/tokens in its fp16 buffer before the loss scaler
            # multiplies it, so small gradients underflow to zero; the PyTorch chunks keep them (fp32 logits)
            use_liger = liger_available(hidden.device) and hidden.dtype != torch.float16
        if use_liger and targets.numel():
            return _liger_loss(hidden, weight, bias, targets)
        return linear_cross_entropy(hidden, weight, bias, targets, chunk_size)


def why_not_chunked(model: torch.nn.Module) -> str | None:
    """None when the chunked loss equals this model's own loss; otherwise the reason it may not.

    Conservative: a known model type, transformers' own class (not a subclass or remote code),
    a plain ``nn.Linear`` lm_head with no hooks or patched forward (a quantized, dispatched or
    LoRA-wrapped head is not), the standard causal-LM loss, no logit post-processing in the config
    and no router auxiliary loss.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SAFE_MODEL_TYPES:
        return f"model type {model_type!r} is not known to compute plain logits"
    if not (type(model).__module__.startswith(f"transformers.models.{model_type}.")
            and type(model).__name__.endswith("ForCausalLM")):
        return f"{type(model).__qualname__} is not transformers' own class"
    for name in LOGIT_POSTPROCESSING:
        if getattr(config, name, None) is not None:
            return f"the config sets {name} (the logits are post-processed)"
    if getattr(config, "output_router_logits", False):
        return "the loss includes the router's auxiliary loss"
    base = getattr(model, "model", None)
    if not isinstance(base, torch.nn.Module) or base is model or getattr(model, "base_model_prefix", "") != "model":
        return "no decoder at .model"
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear:
        return f"the output projection is {type(head).__name__}, not a plain nn.Linear"
    if "forward" in vars(head) or head._forward_hooks or head._forward_pre_hooks or hasattr(head, "_hf_hook"):
        return "the output projection's forward is patched or hooked"
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except ImportError:
        return "transformers has no ForCausalLMLoss"
    if getattr(model, "loss_function", None) is not ForCausalLMLoss:
        return "the model does not use transformers' ForCausalLMLoss"
    return None


def causal_lm_loss(model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor | None,
                   labels: torch.Tensor, *, chunk_size: int | None = None, use_liger: bool | None = None,
                   positions: torch.Tensor | None = None) -> torch.Tensor:
    """``model(input_ids, position_ids=..., labels=...).loss`` without materialising the logits where exact.

    Models that :func:`why_not_chunked` rejects get transformers' loss unchanged. ``positions``: see
    :func:`causal_lm_loss_from_hidden`.
    """
    if why_not_chunked(model) is not None:
        return model(input_ids=input_ids, position_ids=position_ids, labels=labels, use_cache=False).loss
    out = model.model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return causal_lm_loss_from_hidden(hidden, model.get_output_embeddings(), labels, chunk_size=chunk_size,
                                      use_liger=use_liger, positions=positions)
