"""Diffusion training math shared by the SD and SDXL families: noise, timesteps, targets, loss.

Pure functions over tensors; randomness comes from per-sample keys (library/rng.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from library.rng import per_sample_randint, per_sample_randn, sample_generator

# Purposes mixed into the per-sample keys so that each kind of draw is independent.
DRAW_NOISE, DRAW_TIMESTEP, DRAW_OFFSET, DRAW_LATENT, DRAW_MULTIRES, DRAW_STRENGTH = 1, 2, 3, 4, 5, 6
DRAW_IP_NOISE, DRAW_IP_STRENGTH = 7, 8
HUBER_LOSSES = ("huber", "smooth_l1")


@dataclass(frozen=True)
class NoiseSettings:
    """Loss and noise options of the diffusion families."""

    noise_offset: float | None = None
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float = 0.3
    debiased_estimation_loss: bool = False
    scale_v_pred_loss_like_noise_pred: bool = False
    zero_terminal_snr: bool = False
    min_timestep: int = 0
    max_timestep: int = 1000
    min_snr_gamma: float | None = None
    loss_type: str = "l2"
    huber_c: float = 0.1
    huber_schedule: str = "snr"
    huber_scale: float = 1.0
    ip_noise_gamma: float | None = None
    ip_noise_gamma_random_strength: bool = False
    prior_loss_weight: float = 1.0
    v_parameterization: bool = False
    v_pred_like_loss: float | None = None
    masked_loss: bool = False  # weigh the element loss by the batch's "masks" (library/data/masks.py)


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
        strength = torch.full((len(indices), 1, 1, 1), s.noise_offset)
        if s.noise_offset_random_strength:
            strength = strength * per_sample_uniform(sample_keys(seed, epoch, indices, DRAW_STRENGTH)).view(-1, 1, 1, 1)
        if s.adaptive_noise_scale:
            # sd-scripts: more offset for channels whose mean is far from zero (per sample and channel), never
            # a negative strength. One small (batch, channels) copy from the device.
            mean = latents.detach().float().mean(dim=(2, 3), keepdim=True).abs().cpu()
            strength = (strength + s.adaptive_noise_scale * mean).clamp(min=0.0)
        noise = noise + strength * offset
    if s.multires_noise_iterations:
        noise = multires_noise(noise, s.multires_noise_iterations, s.multires_noise_discount,
                               sample_keys(seed, epoch, indices, DRAW_MULTIRES))
    timesteps = per_sample_randint(s.min_timestep, s.max_timestep, sample_keys(seed, epoch, indices, DRAW_TIMESTEP))
    return noise.to(latents.device, latents.dtype), timesteps.to(latents.device)


def per_sample_uniform(keys: list[tuple[int, ...]]) -> torch.Tensor:
    """One number in [0, 1) per key tuple (a random strength)."""
    return torch.stack([torch.rand(1, generator=sample_generator(*k)) for k in keys]).view(-1)


def perturbed_noise(noise: torch.Tensor, seed: int, epoch: int, indices: torch.Tensor,
                    s: NoiseSettings) -> torch.Tensor:
    """Input perturbation (Ning et al. 2023): ``noise + gamma · randn``, its own keyed draw per sample.

    Only the model input is noised with it; the target stays ``noise``. With random strength, gamma
    is scaled per sample by a uniform draw in [0, 1).
    """
    if not s.ip_noise_gamma:
        return noise
    extra = per_sample_randn(tuple(noise.shape[1:]), sample_keys(seed, epoch, indices, DRAW_IP_NOISE))
    strength = torch.full((len(indices),), float(s.ip_noise_gamma))
    if s.ip_noise_gamma_random_strength:
        strength = strength * per_sample_uniform(sample_keys(seed, epoch, indices, DRAW_IP_STRENGTH))
    extra = strength.view(-1, *([1] * (noise.dim() - 1))) * extra
    return (noise.float() + extra.to(noise.device)).to(noise.dtype)


def multires_noise(noise: torch.Tensor, iterations: int, discount: float,
                   keys: list[tuple[int, ...]]) -> torch.Tensor:
    """Pyramid ("multires") noise: add upsampled coarser noise, weight discount**i at level i, renormalise.

    Level i has a resolution 1 / r**i of the latents, with r drawn per sample in [2, 4) so the
    pyramid does not always line up with powers of two.
    """
    out = []
    for sample, key in zip(noise, keys, strict=True):
        gen = sample_generator(*key)
        channels, height, width = sample.shape
        result = sample.clone()
        r = 2.0 + 2.0 * torch.rand(1, generator=gen).item()
        for i in range(1, iterations + 1):
            h, w = max(1, int(height / r**i)), max(1, int(width / r**i))
            coarse = torch.randn(1, channels, h, w, generator=gen)
            result += discount**i * F.interpolate(coarse, size=(height, width), mode="bilinear")[0]
            if h == 1 or w == 1:
                break
        out.append(result / result.std())
    return torch.stack(out)


def huber_c_at(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, huber_c: float, schedule: str,
               scale: float = 1.0) -> torch.Tensor:
    """sd-scripts' ``--huber_schedule``: the huber / smooth_l1 parameter of each sample at its timestep.

    constant: ``huber_c · scale``; exponential: ``huber_c ** (t / T) · scale`` (``scale`` at t = 0,
    ``huber_c · scale`` at t = T, T the number of training timesteps); snr: ``(1 - huber_c) / (1 + sigma_t)**2
    + huber_c`` with ``sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)`` (near 1 at low noise, ``huber_c`` at
    high noise). ``scale`` is ``--huber_scale``, which sd-scripts applies to the first two schedules only.
    """
    t = timesteps.float()
    if schedule == "constant":
        return torch.full_like(t, huber_c * scale)
    if schedule == "exponential":
        return torch.exp(math.log(huber_c) / len(alphas_cumprod) * t) * scale
    if schedule == "snr":
        a = alphas_cumprod.to(timesteps.device)[timesteps].float()
        sigmas = ((1.0 - a) / a) ** 0.5
        return (1.0 - huber_c) / (1.0 + sigmas) ** 2 + huber_c
    raise ValueError(f"unknown huber_schedule {schedule!r}")


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str,
                    huber_c: float | torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Element loss averaged over all but the batch dimension, in float32.

    ``huber_c`` is one number, or one per sample (a tensor of the batch size, see :func:`huber_c_at`).
    ``mask`` ([B, 1, H, W], 0..1, pixel or latent grid) weighs each latent position before the mean, as
    sd-scripts' ``--masked_loss`` does: the mean stays over every position, so a masked-out area adds nothing.
    """
    pred, target = pred.float(), target.float()
    if isinstance(huber_c, torch.Tensor):
        huber_c = huber_c.float().to(pred.device).view(-1, *([1] * (pred.dim() - 1)))
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
    if mask is not None:
        from library.data.masks import to_latent_grid

        loss = loss * to_latent_grid(mask.to(loss.device), tuple(loss.shape[-2:])).float()
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
    if s.min_snr_gamma or s.scale_v_pred_loss_like_noise_pred or s.debiased_estimation_loss or s.v_pred_like_loss:
        # zero-terminal-SNR schedules reach SNR 0 at the last step; keep the weights finite there
        snr_t = snr(alphas_cumprod, timesteps).clamp(min=1e-6)
        if s.min_snr_gamma:
            weights = weights * min_snr_weight(snr_t, s.min_snr_gamma, s.v_parameterization)
        if s.scale_v_pred_loss_like_noise_pred:
            # v-loss = (SNR + 1) * eps-loss; this brings it back to the eps scale
            weights = weights * snr_t / (snr_t + 1.0)
        if s.debiased_estimation_loss:
            weights = weights * debiased_weight(snr_t, s.v_parameterization)
        if s.v_pred_like_loss:
            weights = weights * v_pred_like_factor(snr_t, s.v_pred_like_loss)
    return (losses * weights).mean()


def v_pred_like_factor(snr_t: torch.Tensor, amount: float) -> torch.Tensor:
    """sd-scripts' ``--v_pred_like_loss``: adds ``amount`` times the loss scaled like a v-prediction loss.

    A v-prediction loss is the noise-prediction loss times ``(SNR + 1) / SNR`` (SNR capped at 1000, as sd-scripts
    does), so the factor on the loss is ``1 + amount · (SNR + 1) / SNR``.
    """
    snr_t = torch.clamp(snr_t, max=1000.0)
    return 1.0 + amount * (snr_t + 1.0) / snr_t


def debiased_weight(snr_t: torch.Tensor, v_prediction: bool) -> torch.Tensor:
    """Debiased estimation (Yu et al. 2023): 1/sqrt(SNR) for epsilon, 1/(SNR + 1) for v; SNR capped at 1000."""
    snr_t = torch.clamp(snr_t, max=1000.0)
    return 1.0 / (snr_t + 1.0) if v_prediction else 1.0 / torch.sqrt(snr_t)


def denoising_loss(
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], latents: torch.Tensor, indices: torch.Tensor,
    is_reg: torch.Tensor, seed: int, epoch: int, scheduler: Any, s: NoiseSettings,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """One diffusion training loss: noise the latents at per-sample timesteps, predict, weight.

    ``predict(noisy_latents, timesteps)`` is the model call (the families add their conditioning);
    the target is the noise, or the velocity ``sqrt(a) · noise - sqrt(1 - a) · latents`` for v-prediction
    (with ``ip_noise_gamma`` the input is noised with the perturbed noise, the target keeps the plain one).
    ``mask``: the batch's loss masks, used with ``s.masked_loss``.
    """
    noise, timesteps = draw_noise_and_timesteps(latents, seed, epoch, indices, s)
    noisy = scheduler.add_noise(latents, perturbed_noise(noise, seed, epoch, indices, s), timesteps)
    target = scheduler.get_velocity(latents, noise, timesteps) if s.v_parameterization else noise
    pred = predict(noisy, timesteps)
    huber_c = (huber_c_at(timesteps, scheduler.alphas_cumprod, s.huber_c, s.huber_schedule, s.huber_scale)
               if s.loss_type in HUBER_LOSSES else s.huber_c)
    losses = per_sample_loss(pred, target, s.loss_type, huber_c, mask if s.masked_loss else None)
    return weighted_loss(losses, is_reg, timesteps, scheduler.alphas_cumprod, s)
