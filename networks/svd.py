"""Pure rank math for LoRA tools: factorise a weight delta, pick a rank, re-factorise a LoRA.

A kohya LoRA module stores ``down (r, in[, kh, kw])``, ``up (out, r[, 1, 1])`` and ``alpha``;
its weight delta is ``ΔW = (alpha / r) · up ⊗ down`` (see :mod:`networks.functional`). Every
function here works on the 2-D view ``ΔW (out, in·kh·kw)``: conv kernels ride along with the
input channels, so Linear, 1x1 and kxk Conv2d modules are the same problem.

With ``ΔW = U S Vᵀ`` the best rank-k approximation (Eckart–Young) keeps the k largest singular
values; its relative Frobenius error is ``sqrt(Σ_{i>k} s_i²) / sqrt(Σ s_i²)``. Factors are
written as ``up = U_k √S_k``, ``down = √S_k V_kᵀ`` and ``alpha = k`` (scale 1), which splits the
magnitude evenly between the two (better for fp16/bf16 storage than putting S in one side).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DYNAMIC_METHODS = ("sv_ratio", "sv_cumulative", "sv_fro")


@dataclass(frozen=True)
class LoRAFactors:
    """One module in kohya form: ``ΔW = (alpha / rank) · up ⊗ down``."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def is_kxk(self) -> bool:
        """A conv module with a kernel larger than 1x1 (LoCon): kohya sizes it by conv_dim / conv_alpha."""
        return self.down.dim() == 4 and tuple(self.down.shape[2:]) != (1, 1)

    def delta(self) -> torch.Tensor:
        """ΔW in the original layer's weight shape, float32."""
        from networks.functional import delta_weight

        return delta_weight(self.down.float(), self.up.float(), self.scale)


@dataclass(frozen=True)
class RankReport:
    """How much of a delta a chosen rank keeps."""

    old_rank: int  # the input's rank (the matrix rank bound for a full delta)
    new_rank: int
    retained_fro: float  # ‖ΔW_k‖_F / ‖ΔW‖_F, in [0, 1]
    relative_error: float  # ‖ΔW - ΔW_k‖_F / ‖ΔW‖_F
    max_singular: float


def select_rank(singular: torch.Tensor, max_rank: int, method: str | None = None, param: float | None = None) -> int:
    """How many singular values to keep (at least 1, at most ``max_rank`` and ``len(singular)``).

    ``singular`` is sorted descending. Dynamic methods, as sd-scripts' resize_lora.py defines them:
    - ``sv_ratio``: keep every s_i with ``s_max / s_i <= param`` (param ≥ 1);
    - ``sv_cumulative``: the smallest k with ``Σ_{i<k} s_i / Σ s_i >= param`` (param in (0, 1]);
    - ``sv_fro``: the smallest k with ``sqrt(Σ_{i<k} s_i²) / sqrt(Σ s_i²) >= param`` (param in (0, 1]).
    """
    cap = max(1, min(max_rank, singular.numel()))
    if method is None:
        return cap
    s = singular.double()
    total = float(s.sum())
    if total <= 0:
        return 1
    if method == "sv_ratio":
        k = int((s >= s[0] / param).sum())
    elif method == "sv_cumulative":
        k = _first_reaching(torch.cumsum(s, 0) / total, param)
    elif method == "sv_fro":
        k = _first_reaching(torch.sqrt(torch.cumsum(s * s, 0) / float((s * s).sum())), param)
    else:
        raise ValueError(f"unknown dynamic method {method!r}; expected one of {DYNAMIC_METHODS}")
    return max(1, min(cap, k))


def _first_reaching(curve: torch.Tensor, target: float) -> int:
    # A tiny tolerance so that target 1.0 is reached despite rounding in the cumulative sums.
    reached = (curve >= target - 1e-9).nonzero()
    return int(reached[0]) + 1 if reached.numel() else curve.numel()


def _report(singular: torch.Tensor, old_rank: int, k: int) -> RankReport:
    s2 = singular.double() ** 2
    total = float(s2.sum())
    kept = float(s2[:k].sum())
    if total == 0:
        return RankReport(old_rank, k, 1.0, 0.0, 0.0)
    return RankReport(old_rank, k, (kept / total) ** 0.5, (max(total - kept, 0.0) / total) ** 0.5, float(singular[0]))


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int, weight_shape: torch.Size) -> LoRAFactors:
    root = s[:k].sqrt()
    up = u[:, :k] * root
    down = root[:, None] * vh[:k]
    if len(weight_shape) == 4:
        down = down.reshape(k, *weight_shape[1:])
        up = up.reshape(weight_shape[0], k, 1, 1)
    return LoRAFactors(down.contiguous(), up.contiguous(), float(k))


def factorize(
    delta: torch.Tensor,
    max_rank: int,
    method: str | None = None,
    param: float | None = None,
    clamp_quantile: float | None = None,
) -> tuple[LoRAFactors, RankReport]:
    """A LoRA (alpha = rank) approximating a full weight delta (Linear ``(out, in)`` or conv ``(out, in, kh, kw)``).

    ``clamp_quantile`` (sd-scripts' extract option, e.g. 0.99) clips the factors' entries to that
    quantile of their absolute values; off by default because it adds error to every module.
    """
    matrix = delta.detach().float().flatten(1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    k = select_rank(s, max_rank, method, param)
    factors = _split(u, s, vh, k, delta.shape)
    if clamp_quantile is not None and clamp_quantile < 1.0:
        factors = _clamped(factors, clamp_quantile)
        approx = factors.delta().flatten(1)
        err = float(torch.linalg.norm(matrix - approx) / torch.linalg.norm(matrix).clamp_min(1e-30))
        rep = _report(s, min(matrix.shape), k)
        return factors, RankReport(rep.old_rank, k, rep.retained_fro, err, rep.max_singular)
    return factors, _report(s, min(matrix.shape), k)


def _clamped(factors: LoRAFactors, quantile: float) -> LoRAFactors:
    both = torch.cat([factors.up.flatten(), factors.down.flatten()])
    # torch.quantile refuses very large inputs; a sorted-index lookup is the same thing.
    limit = float(both.abs().sort().values[min(both.numel() - 1, int(quantile * both.numel()))])
    return LoRAFactors(factors.down.clamp(-limit, limit), factors.up.clamp(-limit, limit), factors.alpha)


def low_rank_svd(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD of ``up @ down`` (``up (out, r)``, ``down (r, n)``) without forming the product.

    QR of both factors reduces it to the SVD of an r×r matrix: ``up = Q₁R₁``, ``downᵀ = Q₂R₂``,
    ``up @ down = Q₁ (R₁R₂ᵀ) Q₂ᵀ``. Exact, and cheap even for 1280×11520 conv deltas.
    """
    q1, r1 = torch.linalg.qr(up.double())
    q2, r2 = torch.linalg.qr(down.double().T)
    u, s, vh = torch.linalg.svd(r1 @ r2.T)
    return (q1 @ u).float(), s.float(), (vh @ q2.T).float()


def refactorize(
    factors: LoRAFactors, max_rank: int, method: str | None = None, param: float | None = None
) -> tuple[LoRAFactors, RankReport]:
    """A LoRA of rank ≤ ``max_rank`` closest to ``factors``' delta (resize, SVD merge).

    ``factors`` may have any rank (e.g. several LoRAs concatenated); the result has alpha = rank.
    """
    shape = factors.delta().shape if factors.down.dim() == 4 else (factors.up.shape[0], factors.down.shape[1])
    up = factors.up.float().flatten(1) * factors.scale
    down = factors.down.float().flatten(1)
    u, s, vh = low_rank_svd(up, down)
    k = select_rank(s, max_rank, method, param)
    return _split(u, s, vh, k, torch.Size(shape)), _report(s, factors.rank, k)


def concatenate(parts: list[tuple[LoRAFactors, float]]) -> LoRAFactors:
    """One LoRA whose delta is ``Σ weight_i · ΔW_i`` exactly: the ranks are stacked.

    Each part's scale and weight are folded into its ``up``; the result has alpha = total rank.
    """
    downs = [f.down.float() for f, _ in parts]
    ups = [f.up.float() * (f.scale * w) for f, w in parts]
    down = torch.cat(downs, 0)
    up = torch.cat(ups, 1)
    return LoRAFactors(down, up, float(down.shape[0]))


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a - b‖_F / max(‖b‖_F, tiny): the error measure every tool reports and checks."""
    a64, b64 = a.double(), b.double()
    return float(torch.linalg.norm(a64 - b64) / torch.linalg.norm(b64).clamp_min(1e-30))


def with_scale(factors: LoRAFactors, scale: float) -> LoRAFactors:
    """The same ΔW stored with ``alpha = scale · rank`` (e.g. to keep a file's alpha/dim ratio)."""
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    root = (factors.scale / scale) ** 0.5
    return LoRAFactors(factors.down * root, factors.up * root, scale * factors.rank)
