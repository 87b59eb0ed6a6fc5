"""Stable Diffusion 1.x / 2.x: a diffusers UNet, one CLIP text encoder, a VAE."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from library.errors import UserError
from library.families import DataRequest
from library.families.diffusion import (
    DRAW_LATENT,
    NoiseSettings,
    draw_noise_and_timesteps,
    per_sample_loss,
    sample_keys,
    weighted_loss,
)
from library.rng import per_sample_randn


def _load(kind: str, loader, *args: Any, **kwargs: Any):
    """Call a from_pretrained loader, turning its failure into a message about the folder."""
    try:
        return loader(*args, **kwargs)
    except (OSError, ValueError) as e:
        where = args[0] if args else kwargs
        raise UserError(f"Cannot load the {kind} from {where}: {e}") from None


@dataclass
class SDFamily:
    """SD 1.x / 2.x training: epsilon or v-prediction, optional cached latents."""

    tokenizer: Any
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    scheduler: Any
    v2: bool
    noise: NoiseSettings
    seed: int
    clip_skip: int | None = None
    train_text_encoder: bool = False
    name: str = "sd"

    @staticmethod
    def load(model_path: str, *, vae_path: str | None = None, tokenizer_path: str | None = None,
             v2: bool | None = None, v_parameterization: bool | None = None,
             noise: NoiseSettings | None = None, seed: int = 0, clip_skip: int | None = None) -> SDFamily:
        """Load a diffusers folder; v2 and v-parameterization default from the model's configs."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        root = Path(model_path)
        tok_dir = Path(tokenizer_path) if tokenizer_path else root / "tokenizer"
        tokenizer = _load("tokenizer", CLIPTokenizer.from_pretrained, str(tok_dir))
        text_encoder = _load("text encoder", CLIPTextModel.from_pretrained, str(root), subfolder="text_encoder")
        unet = _load("UNet", UNet2DConditionModel.from_pretrained, str(root), subfolder="unet")
        if vae_path:
            vae = _load("VAE", AutoencoderKL.from_pretrained, vae_path)
        else:
            vae = _load("VAE", AutoencoderKL.from_pretrained, str(root), subfolder="vae")
        scheduler_config = DDPMScheduler.load_config(str(root), subfolder="scheduler")
        # Training always adds noise with the DDPM schedule the model was trained with.
        scheduler = DDPMScheduler.from_config(scheduler_config, rescale_betas_zero_snr=bool(
            noise and noise.zero_terminal_snr))
        detected_v = scheduler.config.prediction_type == "v_prediction"
        v_param = detected_v if v_parameterization is None else (v_parameterization or detected_v)
        is_v2 = bool(v2) or text_encoder.config.hidden_size == 1024
        base_noise = noise or NoiseSettings()
        noise = NoiseSettings(**{**base_noise.__dict__, "v_parameterization": v_param})
        for module in (text_encoder, vae, unet):
            module.requires_grad_(False)
        return SDFamily(tokenizer, text_encoder, vae, unet, scheduler, is_v2, noise, seed, clip_skip)

    @property
    def prediction_type(self) -> str:
        return "v" if self.noise.v_parameterization else "epsilon"

    @property
    def base_model_version(self) -> str:
        if not self.v2:
            return "sd_v1"
        return "sd_v2_v" if self.noise.v_parameterization else "sd_v2"

    @property
    def modelspec_architecture(self) -> str:
        if not self.v2:
            return "stable-diffusion-v1/lora"
        return "stable-diffusion-v2-768-v/lora" if self.noise.v_parameterization else "stable-diffusion-v2-512/lora"

    @property
    def latent_scale(self) -> int:
        """Pixels per latent: 2 ** (number of VAE down blocks - 1)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def network_inputs(self) -> tuple[Any, Any, torch.nn.Module]:
        return self.vae, self.text_encoder, self.unet

    def build_data(self, request: DataRequest):
        """Image datasets from the kohya TOML (or --train_data_dir), latents cached on request."""
        from library.data.image_data import build_image_data
        from library.dataset_config import config_from_train_data_dir, load_dataset_config

        if request.dataset_config:
            config = load_dataset_config(Path(request.dataset_config), request.defaults)
        elif request.defaults.train_data_dir is not None:
            config = config_from_train_data_dir(request.defaults)
        else:
            raise UserError("No training data: give --dataset_config (a TOML) or --train_data_dir.")
        data = build_image_data(config, seed=request.seed, on_bad_image=request.on_bad_image,
                                num_processes=request.num_processes, rank=request.rank,
                                num_workers=request.num_workers, persistent_workers=request.persistent_workers)
        if request.cache_latents:
            data.cache_latents(self.encode_images, request.vae_batch_size, request.device)
        return data

    def save_network(self, network: Any, path: Path, dtype: torch.dtype | None, metadata: dict[str, str]) -> Path:
        network.save_weights(str(path), dtype, metadata)
        return path

    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.text_encoder]

    def prepare(self, device: torch.device, weight_dtype: torch.dtype, train_text_encoder: bool,
                gradient_checkpointing: bool, vae_dtype: torch.dtype | None = None) -> None:
        self.train_text_encoder = train_text_encoder
        for module, dtype in ((self.unet, weight_dtype), (self.text_encoder, weight_dtype),
                              (self.vae, vae_dtype or weight_dtype)):
            module.to(device)
            if module.dtype != dtype:  # diffusers warns on every .to(dtype), even a no-op one
                module.to(dtype=dtype)
        self.vae.eval()
        # Frozen modules stay in eval mode: their dropout would only add noise to the LoRA's gradient.
        self.unet.eval()
        self.text_encoder.eval()
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            self.unet.train()  # diffusers checkpoints only in training mode; the UNet has no dropout
            if train_text_encoder:
                self.text_encoder.gradient_checkpointing_enable()
                self.text_encoder.train()

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, indices: torch.Tensor, epoch: int = 0) -> torch.Tensor:
        """VAE latents, sampled per image with a generator keyed on the image, times the scaling factor."""
        dist = self.vae.encode(images.to(self.vae.device, self.vae.dtype)).latent_dist
        eps = per_sample_randn(tuple(dist.mean.shape[1:]), sample_keys(self.seed, epoch, indices, DRAW_LATENT))
        latents = dist.mean + dist.std * eps.to(dist.mean.device, dist.mean.dtype)
        if torch.isnan(latents).any():
            raise UserError("The VAE produced NaN latents; try --no_half_vae (fp16 VAEs overflow).")
        return latents * self.vae.config.scaling_factor

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """CLIP hidden states (clip_skip honoured); with gradients only when the encoder trains."""
        # Saved tokenizers sometimes carry a huge model_max_length; the encoder's positions are the limit.
        max_length = min(self.tokenizer.model_max_length, self.text_encoder.config.max_position_embeddings)
        ids = self.tokenizer(captions, padding="max_length", truncation=True, max_length=max_length,
                             return_tensors="pt").input_ids
        ids = ids.to(self.text_encoder.device)
        with torch.set_grad_enabled(self.train_text_encoder):
            if not self.clip_skip or self.clip_skip <= 1:
                return self.text_encoder(ids)[0]
            out = self.text_encoder(ids, output_hidden_states=True)
            hidden = out.hidden_states[-self.clip_skip]
            # transformers 5 flattened CLIPTextModel; older versions nest it under text_model
            inner = getattr(self.text_encoder, "text_model", self.text_encoder)
            return inner.final_layer_norm(hidden)

    def loss(self, batch: dict[str, Any], epoch: int) -> torch.Tensor:
        indices = batch["indices"]
        latents = batch.get("latents")
        if latents is None:
            latents = self.encode_images(batch["images"], indices, epoch)
        latents = latents.to(self.unet.device)
        context = self.encode_text(batch["captions"])
        noise, timesteps = draw_noise_and_timesteps(latents, self.seed, epoch, indices, self.noise)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.noise.v_parameterization:
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        pred = self.unet(noisy.to(self.unet.dtype), timesteps, context.to(self.unet.dtype)).sample
        losses = per_sample_loss(pred, target, self.noise.loss_type, self.noise.huber_c)
        return weighted_loss(losses, batch["is_reg"], timesteps, self.scheduler.alphas_cumprod, self.noise)
