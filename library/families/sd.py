"""Stable Diffusion 1.x / 2.x: a diffusers UNet, one CLIP text encoder, a VAE."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from library.arg_checks import check_sd_sides
from library.errors import UserError
from library.families import DataRequest
from library.families.diffusion import NoiseSettings, denoising_loss
from library.families.diffusion_parts import (
    build_images,
    encode_latents,
    latent_scale,
    load_scheduler,
    load_single_file,
    load_vae,
    merge_chunks,
    place_modules,
    scan_images,
    token_chunks,
)
from library.families.diffusion_parts import load_part as _load
from library.fp8 import compute_dtype_of
from library.prompt_weighting import apply_weights, chunk_budget, encoder_inputs, weighted_chunks


def _check_clip_skip(clip_skip: int | None, text_encoder: Any) -> None:
    """--clip_skip N reads the N-th last layer: more than the encoder has is an error now, not an IndexError at
    the first step."""
    layers = text_encoder.config.num_hidden_layers
    if clip_skip and clip_skip > layers:
        raise UserError(f"--clip_skip {clip_skip}: the text encoder has {layers} layers; use 1 (the last layer) to "
                        f"{layers} (2 is the usual value for anime-style SD 1.x models).")


def check_text_caching(cache_text_encoder_outputs: bool) -> None:
    """--cache_text_encoder_outputs is refused for SD 1.x/2.x (checked before the model loads, too)."""
    if cache_text_encoder_outputs:
        raise UserError("--cache_text_encoder_outputs is for SDXL (as in sd-scripts); SD 1.x/2.x encodes "
                        "captions with one small text encoder per step. Remove the option.")


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
    max_token_length: int | None = None  # 150 / 225: prompts encoded in 75-token chunks
    weighted_captions: bool = False  # training captions parsed for A1111 weighting (--weighted_captions)

    @staticmethod
    def load(model_path: str, *, vae_path: str | None = None, tokenizer_path: str | None = None,
             v2: bool | None = None, v_parameterization: bool | None = None,
             noise: NoiseSettings | None = None, seed: int = 0, clip_skip: int | None = None,
             max_token_length: int | None = None, allow_pickle: bool = False,
             model_config_dir: str | None = None) -> SDFamily:
        """Load a diffusers folder or a single-file checkpoint (library/single_file.py); v2 and
        v-parameterization default from the model's configs (a file: from its keys)."""
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        root = Path(model_path)
        if root.is_file():
            ckpt, scheduler, noise = load_single_file(
                root, "sd", tokenizer_path=tokenizer_path, model_config_dir=model_config_dir,
                allow_pickle=allow_pickle, vae_path=vae_path, v_parameterization=v_parameterization, noise=noise)
            if v2 and ckpt.kind.name == "sd_v1":
                raise UserError(f"--v2 says {model_path} is SD 2.x, but its keys are SD 1.x's (CLIP ViT-L text "
                                "encoder); remove --v2 (it is detected from the model).")
            _check_clip_skip(clip_skip, ckpt.text_encoders[0])
            return SDFamily(ckpt.tokenizers[0], ckpt.text_encoders[0], ckpt.vae, ckpt.unet, scheduler,
                            bool(v2) or ckpt.kind.name == "sd_v2", noise, seed, clip_skip,
                            max_token_length=max_token_length)
        tok_dir = Path(tokenizer_path) if tokenizer_path else root / "tokenizer"
        tokenizer = _load("tokenizer", CLIPTokenizer.from_pretrained, str(tok_dir))
        text_encoder = _load("text encoder", CLIPTextModel.from_pretrained, str(root), subfolder="text_encoder")
        unet = _load("UNet", UNet2DConditionModel.from_pretrained, str(root), subfolder="unet")
        vae = load_vae(root, vae_path, allow_pickle)
        scheduler, noise = load_scheduler(root, v_parameterization, noise)
        if v2 and text_encoder.config.hidden_size == 768:  # SD 1.x's CLIP ViT-L; SD 2.x's OpenCLIP is 1024 wide
            raise UserError(f"--v2 says {model_path} is SD 2.x, but its text encoder is SD 1.x's (768 wide, CLIP "
                            "ViT-L); remove --v2 (it is detected from the model).")
        _check_clip_skip(clip_skip, text_encoder)
        is_v2 = bool(v2) or text_encoder.config.hidden_size == 1024
        for module in (text_encoder, vae, unet):
            module.requires_grad_(False)
        return SDFamily(tokenizer, text_encoder, vae, unet, scheduler, is_v2, noise, seed, clip_skip,
                        max_token_length=max_token_length)

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
        return latent_scale(self.vae)

    def network_inputs(self) -> tuple[Any, Any, torch.nn.Module]:
        return self.vae, self.text_encoder, self.unet

    def build_data(self, request: DataRequest):
        """Image datasets from the kohya TOML (or --train_data_dir), latents cached on request."""
        check_text_caching(request.cache_text_encoder_outputs)
        config, data = scan_images(request)
        check_sd_sides(config, self.unet.config, self.latent_scale)
        return build_images(request, data, self.encode_images)

    def save_network(self, network: Any, path: Path, dtype: torch.dtype | None, metadata: dict[str, str]) -> Path:
        network.save_weights(str(path), dtype, metadata)
        return path

    def sample_pipeline(self) -> Any:
        """A StableDiffusionPipeline over this family's modules (the LoRA is patched into them)."""
        from diffusers import StableDiffusionPipeline

        from library.sampling import build_pipeline

        return build_pipeline(StableDiffusionPipeline, self.prediction_type, self.scheduler, vae=self.vae,
                              text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
                              safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    def sample_embeds(self, prompt: str, negative: str) -> dict[str, torch.Tensor]:
        """The pipeline's prompt embeddings, encoded as training encodes captions (--max_token_length chunks,
        --clip_skip), so a long prompt is not cut at 77 tokens as the pipeline's own encoding would; A1111
        weighting such as ``(word:1.2)`` and ``BREAK`` applies (library/prompt_weighting.py)."""
        with torch.no_grad():
            context = self._weighted_context([prompt, negative])
        return {"prompt_embeds": context[:1], "negative_prompt_embeds": context[1:]}

    def _weighted_context(self, texts: list[str], training: bool = False) -> torch.Tensor:
        """Hidden states of ``texts`` with A1111 weighting (library/prompt_weighting.py); for text without the
        syntax exactly :meth:`encode_text`'s plain encoding. ``training``: captions keep the training length
        (BREAK cannot extend them) and are not rescaled to their mean, as sd-scripts' training encodes them."""
        prompts = [weighted_chunks(self.tokenizer, text, self.max_token_length, not training) for text in texts]
        count = chunk_budget(self.max_token_length) if training else max(chunk_budget(self.max_token_length),
                                                                          *map(len, prompts))
        ids, weights = encoder_inputs(self.tokenizer, prompts, count, self.text_encoder.device)
        return apply_weights(merge_chunks([self._hidden(chunk) for chunk in ids]), weights, rescale=not training)

    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.text_encoder]

    def prepare(self, device: torch.device, weight_dtype: torch.dtype, train_text_encoder: bool,
                gradient_checkpointing: bool, vae_dtype: torch.dtype | None = None) -> None:
        self.train_text_encoder = train_text_encoder
        place_modules(device, weight_dtype, vae_dtype, self.unet, [self.text_encoder], self.vae,
                      train_text_encoder, gradient_checkpointing)

    def encode_images(self, images: torch.Tensor, indices: torch.Tensor, epoch: int = 0) -> torch.Tensor:
        """VAE latents, sampled per image with a generator keyed on the image, times the scaling factor."""
        return encode_latents(self.vae, images, self.seed, epoch, indices)

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """CLIP hidden states (clip_skip honoured); with gradients only when the encoder trains."""
        with torch.set_grad_enabled(self.train_text_encoder and torch.is_grad_enabled()):
            if self.weighted_captions:  # --weighted_captions: (word:1.2) in captions, as sd-scripts trains them
                return self._weighted_context(captions, training=True)
            chunks = token_chunks(self.tokenizer, self.text_encoder, captions, self.max_token_length)
            return merge_chunks([self._hidden(ids) for ids in chunks])

    def _hidden(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.clip_skip or self.clip_skip <= 1:
            return self.text_encoder(ids)[0]
        out = self.text_encoder(ids, output_hidden_states=True)
        # transformers 5 flattened CLIPTextModel; older versions nest it under text_model
        inner = getattr(self.text_encoder, "text_model", self.text_encoder)
        return inner.final_layer_norm(out.hidden_states[-self.clip_skip])

    def loss(self, batch: dict[str, Any], epoch: int) -> torch.Tensor:
        indices = batch["indices"]
        latents = batch.get("latents")
        if latents is None:
            latents = self.encode_images(batch["images"], indices, epoch)
        latents = latents.to(self.unet.device)
        dtype = compute_dtype_of(self.unet)
        context = self.encode_text(batch["captions"]).to(dtype)

        def predict(noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            return self.unet(noisy.to(dtype), timesteps, context).sample

        return denoising_loss(predict, latents, indices, batch["is_reg"], self.seed, epoch, self.scheduler, self.noise,
                              batch.get("masks"))
