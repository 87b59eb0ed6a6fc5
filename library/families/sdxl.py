"""Stable Diffusion XL: a diffusers UNet conditioned on two CLIP text encoders and the image size.

What differs from SD 1.x/2.x (sd.py), and only that, lives here:
- the context is the penultimate hidden layer of both encoders (CLIP ViT-L and OpenCLIP bigG),
  concatenated on the feature axis; the pooled, projected output of encoder 2 (``text_embeds``)
  conditions the UNet's added embedding together with the six size ids
  ``(original h, original w, crop top, crop left, target h, target w)`` of each sample;
- LoRA key names: ``lora_te1_`` / ``lora_te2_`` and the UNet's original SGM block names
  (networks/sgm_names.py, picked by networks.targets for any UNet with ``text_time`` conditioning);
- image sides must be multiples of 32 (the VAE's 8 times the UNet's two downsamplings);
- ``--cache_text_encoder_outputs``: with frozen encoders, each distinct caption is encoded once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from library.errors import UserError
from library.families import DataRequest
from library.families.diffusion import NoiseSettings, denoising_loss
from library.families.diffusion_parts import (
    TextOutputs,
    build_images,
    cache_text_outputs,
    cached_text_outputs,
    encode_latents,
    fixed_captions,
    latent_scale,
    load_part,
    load_scheduler,
    load_single_file,
    load_vae,
    merge_chunks,
    place_modules,
    scan_images,
    token_chunks,
)
from library.fp8 import compute_dtype_of
from library.prompt_weighting import apply_weights, chunk_budget, encoder_inputs, weighted_chunks

# Pixel sides must divide by this: SDXL's VAE downsamples by 8 and its UNet twice more by 2.
SIDE_MULTIPLE = 32


def size_conditioning(original_sizes: list[tuple[int, int]], crop_top_lefts: list[tuple[int, int]],
                      target_size: tuple[int, int]) -> torch.Tensor:
    """SDXL's ``time_ids`` [B, 6]: (orig h, orig w, crop top, crop left, target h, target w) per sample.

    ``original_sizes`` are (width, height) as the dataset reports them; ``crop_top_lefts`` are
    (top, left) in the resized image; ``target_size`` is the batch's (height, width).
    """
    rows = [(h, w, top, left, *target_size) for (w, h), (top, left) in zip(original_sizes, crop_top_lefts,
                                                                           strict=True)]
    return torch.tensor(rows, dtype=torch.float32)


def check_sides(config: Any) -> None:
    """Every bucket side a multiple of 32: bucket steps with bucketing, the resolution without."""
    for dataset in config.datasets:
        if dataset.enable_bucket:
            if dataset.bucket_reso_steps % SIDE_MULTIPLE:
                raise UserError(
                    f"{dataset.name}: bucket_reso_steps = {dataset.bucket_reso_steps}, but SDXL needs image "
                    f"sides that are multiples of {SIDE_MULTIPLE}; set bucket_reso_steps to 32, 64 or another "
                    f"multiple of {SIDE_MULTIPLE} (--bucket_reso_steps or the dataset TOML).")
        elif any(side % SIDE_MULTIPLE for side in dataset.resolution):
            w, h = dataset.resolution
            raise UserError(f"{dataset.name}: resolution {w}x{h} is not a multiple of {SIDE_MULTIPLE} on both "
                            f"sides, which SDXL needs; use e.g. {w // SIDE_MULTIPLE * SIDE_MULTIPLE or 32}x"
                            f"{h // SIDE_MULTIPLE * SIDE_MULTIPLE or 32}, or enable_bucket.")


def check_text_caching(cache_text_encoder_outputs: bool, train_text_encoder: bool) -> None:
    """--cache_text_encoder_outputs needs frozen text encoders (checked before the model loads, too)."""
    if cache_text_encoder_outputs and train_text_encoder:
        raise UserError("--cache_text_encoder_outputs needs frozen text encoders: add "
                        "--network_train_unet_only (the text encoder LoRA cannot train on cached outputs).")


@dataclass
class SDXLFamily:
    """SDXL training: epsilon or v-prediction, optional cached latents and text encoder outputs."""

    tokenizer: Any
    tokenizer_2: Any
    text_encoder: torch.nn.Module  # CLIPTextModel (ViT-L)
    text_encoder_2: torch.nn.Module  # CLIPTextModelWithProjection (bigG): pooled text_embeds
    vae: torch.nn.Module
    unet: torch.nn.Module
    scheduler: Any
    noise: NoiseSettings
    seed: int
    train_text_encoder: bool = False
    text_cache: dict[str, TextOutputs] | None = field(default=None, repr=False)
    name: str = "sdxl"
    max_token_length: int | None = None  # 150 / 225: prompts encoded in 75-token chunks
    weighted_captions: bool = False  # training captions parsed for A1111 weighting (--weighted_captions)
    v2: bool = False  # read by the run's metadata; SDXL is never an SD 2.x model
    base_model_version: str = "sdxl_base_v1-0"
    modelspec_architecture: str = "stable-diffusion-xl-v1-base/lora"

    @staticmethod
    def load(model_path: str, *, vae_path: str | None = None, tokenizer_path: str | None = None,
             v2: bool | None = None, v_parameterization: bool | None = None,
             noise: NoiseSettings | None = None, seed: int = 0, clip_skip: int | None = None,
             max_token_length: int | None = None, allow_pickle: bool = False,
             model_config_dir: str | None = None) -> SDXLFamily:
        """Load an SDXL diffusers folder or single-file checkpoint (library/single_file.py);
        v-parameterization defaults from its scheduler config (a file: from its keys).

        ``tokenizer_path``: a folder holding ``tokenizer`` and ``tokenizer_2`` subfolders (like the model).
        """
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        if v2:
            raise UserError("--v2 selects an SD 2.x model; it does not apply to SDXL (--model_type sdxl).")
        if clip_skip == 1:  # the kohya_ss GUI's default, written for SDXL runs too; sd-scripts ignores it there
            logging.getLogger(__name__).warning(
                "--clip_skip 1 is ignored for SDXL: it always uses the penultimate text encoder layer, as it was "
                "trained; leave --clip_skip out.")
        elif clip_skip not in (None, 2):
            raise UserError(f"--clip_skip {clip_skip}: SDXL always uses the penultimate text encoder layer, as it "
                            "was trained (that is --clip_skip 2); leave --clip_skip out.")
        root = Path(model_path)
        if root.is_file():
            ckpt, scheduler, noise = load_single_file(
                root, "sdxl", tokenizer_path=tokenizer_path, model_config_dir=model_config_dir,
                allow_pickle=allow_pickle, vae_path=vae_path, v_parameterization=v_parameterization, noise=noise)
            return SDXLFamily(*ckpt.tokenizers, *ckpt.text_encoders, ckpt.vae, ckpt.unet, scheduler, noise, seed,
                              max_token_length=max_token_length)
        tok_root = Path(tokenizer_path) if tokenizer_path else root
        tokenizers = [load_part("tokenizer", CLIPTokenizer.from_pretrained, str(tok_root / sub))
                      for sub in ("tokenizer", "tokenizer_2")]
        text_encoder = load_part("text encoder", CLIPTextModel.from_pretrained, str(root),
                                 subfolder="text_encoder")
        text_encoder_2 = load_part("second text encoder", CLIPTextModelWithProjection.from_pretrained, str(root),
                                   subfolder="text_encoder_2")
        unet = load_part("UNet", UNet2DConditionModel.from_pretrained, str(root), subfolder="unet")
        if unet.config.addition_embed_type != "text_time":
            raise UserError(f"{root}: the UNet has no SDXL size/pooled-text conditioning "
                            "(addition_embed_type 'text_time'); is this an SD 1.x/2.x model? Use --model_type sd.")
        vae = load_vae(root, vae_path, allow_pickle)
        scheduler, noise = load_scheduler(root, v_parameterization, noise)
        for module in (text_encoder, text_encoder_2, vae, unet):
            module.requires_grad_(False)
        return SDXLFamily(*tokenizers, text_encoder, text_encoder_2, vae, unet, scheduler, noise, seed,
                          max_token_length=max_token_length)

    @property
    def prediction_type(self) -> str:
        return "v" if self.noise.v_parameterization else "epsilon"

    @property
    def latent_scale(self) -> int:
        return latent_scale(self.vae)

    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.text_encoder, self.text_encoder_2]

    def network_inputs(self) -> tuple[Any, list[torch.nn.Module], torch.nn.Module]:
        # Two encoders: networks.lora names them lora_te1_ / lora_te2_.
        return self.vae, self.text_encoders(), self.unet

    def prepare(self, device: torch.device, weight_dtype: torch.dtype, train_text_encoder: bool,
                gradient_checkpointing: bool, vae_dtype: torch.dtype | None = None) -> None:
        self.train_text_encoder = train_text_encoder
        place_modules(device, weight_dtype, vae_dtype, self.unet, self.text_encoders(), self.vae,
                      train_text_encoder, gradient_checkpointing)

    def build_data(self, request: DataRequest):
        """Image datasets (sides checked), latents and text encoder outputs cached on request."""
        check_text_caching(request.cache_text_encoder_outputs, self.train_text_encoder)
        config, data = scan_images(request)
        check_sides(config)
        data = build_images(request, data, self.encode_images)
        if request.cache_text_encoder_outputs:
            self.cache_text(fixed_captions(data), data.batch_size)
        return data

    def cache_text(self, captions: list[str], batch_size: int) -> None:
        """Encode each caption once; the encoders then leave the accelerator (they are not needed again)."""
        self.text_cache = cache_text_outputs(captions, self.encode_text, batch_size)
        for encoder in self.text_encoders():
            encoder.to("cpu")

    def save_network(self, network: Any, path: Path, dtype: torch.dtype | None, metadata: dict[str, str]) -> Path:
        network.save_weights(str(path), dtype, metadata)
        return path

    def sample_pipeline(self) -> Any:
        """A StableDiffusionXLPipeline over this family's modules (the LoRA is patched into them)."""
        from diffusers import StableDiffusionXLPipeline

        from library.sampling import build_pipeline

        # (encoders parked on the CPU by --cache_text_encoder_outputs visit the GPU for sampling: sampling.on_device)
        return build_pipeline(StableDiffusionXLPipeline, self.prediction_type, self.scheduler, vae=self.vae,
                              text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2,
                              tokenizer=self.tokenizer, tokenizer_2=self.tokenizer_2, unet=self.unet,
                              add_watermarker=False)

    def sample_embeds(self, prompt: str, negative: str) -> dict[str, torch.Tensor]:
        """The pipeline's prompt embeddings, encoded as training encodes captions (--max_token_length chunks);
        an empty negative prompt is zeros, as the SDXL pipeline's ``force_zeros_for_empty_prompt`` makes it.

        A1111 weighting such as ``(word:1.2)`` and ``BREAK`` applies to both encoders' hidden states, each rescaled
        to its own unweighted mean (library/prompt_weighting.py); the pooled embedding stays unweighted, as in
        sd-scripts."""
        with torch.no_grad():
            context, pooled = self._weighted_context([prompt, negative])
        if not negative:
            context[1:].zero_()
            pooled[1:].zero_()
        return {"prompt_embeds": context[:1], "negative_prompt_embeds": context[1:],
                "pooled_prompt_embeds": pooled[:1], "negative_pooled_prompt_embeds": pooled[1:]}

    def encode_images(self, images: torch.Tensor, indices: torch.Tensor, epoch: int = 0) -> torch.Tensor:
        return encode_latents(self.vae, images, self.seed, epoch, indices)

    def _weighted_context(self, texts: list[str], training: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(context, pooled) of ``texts`` with A1111 weighting on both encoders' hidden states, each rescaled to its
        own unweighted mean (library/prompt_weighting.py); the pooled embedding stays unweighted, as in sd-scripts.
        For text without the syntax exactly :meth:`encode_text`'s plain encoding. ``training``: captions keep the
        training length and are not rescaled, as sd-scripts' training encodes them."""
        pairs = ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2))
        prompts = [[weighted_chunks(tokenizer, text, self.max_token_length, not training) for text in texts]
                   for tokenizer, _ in pairs]
        # One length for both encoders: their contexts are concatenated feature-wise.
        count = chunk_budget(self.max_token_length) if training else max(
            chunk_budget(self.max_token_length), *(len(chunks) for both in prompts for chunks in both))
        hidden = []
        for (tokenizer, encoder), chunks in zip(pairs, prompts, strict=True):
            ids, weights = encoder_inputs(tokenizer, chunks, count, encoder.device)
            outs = [encoder(chunk, output_hidden_states=True) for chunk in ids]
            hidden.append(apply_weights(merge_chunks([out.hidden_states[-2] for out in outs]), weights,
                                        rescale=not training))
        return torch.cat(hidden, dim=-1), outs[0].text_embeds  # the first chunk's pooled output, as in encode_text

    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(context [B, 77, w1 + w2], pooled text_embeds [B, p]); with gradients only when the encoders train."""
        hidden = []
        with torch.set_grad_enabled(self.train_text_encoder and torch.is_grad_enabled()):
            if self.weighted_captions:  # --weighted_captions: (word:1.2) in captions, as sd-scripts trains them
                return self._weighted_context(captions, training=True)
            for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
                outs = [encoder(ids, output_hidden_states=True)
                        for ids in token_chunks(tokenizer, encoder, captions, self.max_token_length)]
                # SDXL was trained on the penultimate layer, without the final layer norm.
                hidden.append(merge_chunks([out.hidden_states[-2] for out in outs]))
            pooled = outs[0].text_embeds  # the pooled embedding of the first chunk, as kohya does
        return torch.cat(hidden, dim=-1), pooled

    def loss(self, batch: dict[str, Any], epoch: int) -> torch.Tensor:
        indices = batch["indices"]
        latents = batch.get("latents")
        if latents is None:
            latents = self.encode_images(batch["images"], indices, epoch)
        latents = latents.to(self.unet.device)
        if self.text_cache is not None:
            context, pooled = cached_text_outputs(self.text_cache, batch["captions"], self.unet.device)
        else:
            context, pooled = self.encode_text(batch["captions"])
        target_size = (latents.shape[-2] * self.latent_scale, latents.shape[-1] * self.latent_scale)
        dtype = compute_dtype_of(self.unet)
        conditioning = {
            "text_embeds": pooled.to(self.unet.device, dtype),
            "time_ids": size_conditioning(batch["original_sizes"], batch["crop_top_lefts"],
                                          target_size).to(self.unet.device, dtype),
        }

        def predict(noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            return self.unet(noisy.to(dtype), timesteps, context.to(self.unet.device, dtype),
                             added_cond_kwargs=conditioning).sample

        return denoising_loss(predict, latents, indices, batch["is_reg"], self.seed, epoch, self.scheduler, self.noise,
                              batch.get("masks"))
