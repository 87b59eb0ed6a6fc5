"""Diffusion training math shared by the SD and SDXL families: noise, timesteps, targets, loss.

Pure functions over tensors; randomness comes from per-sample keys (library/rng.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from library.rng import per_sample_randint, per_sample_randn

# Purposes mixed into the per-sample keys so that each kind of draw is independent.
DRAW_NOISE, DRAW_TIMESTEP, DRAW_OFFSET, DRAW_LATENT = 1, 2, 3, 4


@dataclass(frozen=True)
class NoiseSettings:
    """Loss and noise options of the diffusion families."""

    noise_offset: float | None = None
    min_timestep: int = 0
    max_timestep: int = 1000
    min_snr_gamma: float | None = None
    loss_type: str = "l2"
    huber_c: float = 0.1
    prior_loss_weight: float = 1.0
    v_parameterization: bool = False


def sample_keys(seed: int, epoch: int, indices: torch.Tensor, purpose: int) -> list[tuple[int, ...]]:
    """Key tuples for one draw per sample: (seed, epoch, sample index, purpose)."""
    return [(seed, epoch, int(i), purpose) for i in indices.tolist()]


def draw_noise_and_timesteps(
    latents: torch.Tensor, seed: int, epoch: int, indices: torch.Tensor, s: NoiseSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian noise (plus the optional offset noise) and integer timesteps, per sample."""
    noise = per_sample_randn(tuple(latents.shape[1:]), sample_keys(seed, epoch, indices, DRAW_NOISE))
    if s.noise_offset:
        # Offset noise shifts whole channels, so the model learns to change overall brightness.
        offset = per_sample_randn((latents.shape[1], 1, 1), sample_keys(seed, epoch, indices, DRAW_OFFSET))
        noise = noise + s.noise_offset * offset
    timesteps = per_sample_randint(s.min_timestep, s.max_timestep, sample_keys(seed, epoch, indices, DRAW_TIMESTEP))
    return noise.to(latents.device, latents.dtype), timesteps.to(latents.device)


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str, huber_c: float) -> torch.Tensor:
    """Element loss averaged over all but the batch dimension, in float32."""
    pred, target = pred.float(), target.float()
    if loss_type == "l2":
        loss = F.mse_loss(pred, target, reduction="none")
    elif loss_type == "l1":
        loss = F.l1_loss(pred, target, reduction="none")
    elif loss_type == "huber":
        loss = 2 * huber_c * (torch.sqrt((pred - target) ** 2 + huber_c**2) - huber_c)
    elif loss_type == "smooth_l1":
        loss = 2 * (torch.sqrt((pred - target) ** 2 + huber_c**2) - huber_c)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return loss.mean(dim=tuple(range(1, loss.ndim)))


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep."""
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return a / (1.0 - a)


def min_snr_weight(snr_t: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023): min(SNR, gamma) / SNR, or / (SNR + 1) for v."""
    clipped = torch.clamp(snr_t, max=gamma)
    return clipped / (snr_t + 1.0) if v_prediction else clipped / snr_t


def weighted_loss(
    losses: torch.Tensor, is_reg: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
    s: NoiseSettings,
) -> torch.Tensor:
    """Apply prior-preservation and min-SNR weights to per-sample losses and average."""
    weights = torch.where(is_reg.to(losses.device), s.prior_loss_weight, 1.0).to(losses.dtype)
    if s.min_snr_gamma:
        weights = weights * min_snr_weight(snr(alphas_cumprod, timesteps), s.min_snr_gamma, s.v_parameterization)
    return (losses * weights).mean()
