"""Tiny, randomly initialised models built from configs in code.

The demo, the tests and the CPU benchmarks use these instead of downloaded weights: they
exercise the real loading code (a diffusers folder written with ``save_pretrained``) while
staying small enough to train in seconds on two CPU cores.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

# Characters the offline CLIP tokenizer knows; anything else becomes <|endoftext|> (unk).
_TOKEN_CHARS = string.ascii_lowercase + string.digits + ",.!-"


def tiny_clip_tokenizer():
    """A CLIPTokenizer with a hand-written character vocabulary (no merges, no download)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _TOKEN_CHARS:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def tiny_clip_text_encoder(vocab_size: int, seed: int = 0):
    """A two-layer CLIP text encoder with hidden size 32."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=vocab_size,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(config)


def tiny_unet(seed: int = 0, prediction_cross_dim: int = 32):
    """An SD1-style UNet2DConditionModel: two levels, one cross-attention level."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=prediction_cross_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def tiny_vae(seed: int = 0):
    """An AutoencoderKL that downsamples by 2 (64-px images give 32x32 latents)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
    )


def tiny_sd2_unet(seed: int = 4):
    """An SD 2.x-style tiny UNet: linear projections in the transformer blocks (SD 1.x uses 1x1 convs)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16, layers_per_block=1, block_out_channels=(32, 64), cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8)


def tiny_sd_pipeline(seed: int = 0, prediction_type: str = "epsilon"):
    """A complete StableDiffusionPipeline of tiny random models."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    tokenizer = tiny_clip_tokenizer()
    scheduler = DDPMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    return StableDiffusionPipeline(
        unet=tiny_unet(seed),
        vae=tiny_vae(seed + 1),
        text_encoder=tiny_clip_text_encoder(len(tokenizer), seed + 2),
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_sd(folder: str | Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Write a tiny SD1-style model as a diffusers folder and return its path."""
    folder = Path(folder)
    tiny_sd_pipeline(seed, prediction_type).save_pretrained(folder)
    return folder


def write_synthetic_images(folder: str | Path, count: int = 8, size: int = 64, seed: int = 0) -> Path:
    """Write ``count`` PNG images with simple coloured shapes and a caption file each."""
    from PIL import Image, ImageDraw

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    colours = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
    names = list(colours)
    for i in range(count):
        name = names[i % len(names)]
        background = tuple(int(v) for v in torch.randint(0, 80, (3,), generator=gen))
        image = Image.new("RGB", (size, size), background)
        draw = ImageDraw.Draw(image)
        x0, y0 = (int(v) for v in torch.randint(0, size // 2, (2,), generator=gen))
        shape = "circle" if i % 2 else "square"
        box = (x0, y0, x0 + size // 2, y0 + size // 2)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colours[name])
        image.save(folder / f"img_{i:03d}.png")
        (folder / f"img_{i:03d}.caption").write_text(f"sks {name} {shape}", encoding="utf-8")
    return folder


def tiny_clip_text_encoder_with_projection(vocab_size: int, seed: int = 0):
    """SDXL's second text encoder in miniature: CLIP with a 32-wide text projection (pooled ``text_embeds``)."""
    from transformers import CLIPTextModelWithProjection

    config = tiny_clip_text_encoder(vocab_size, seed).config
    config.projection_dim = 32
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(config)


def tiny_sdxl_unet(seed: int = 0):
    """An SDXL-style UNet (TINY_MODELS.md): two levels, text_time conditioning, SGM block numbering.

    ``layers_per_block=2`` keeps the numbering of SDXL's original blocks (input_blocks.4.1 is the
    first transformer), so LoRA key names look exactly like a real SDXL file's.
    """
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # pooled text (32) + 6 time ids x 8
        cross_attention_dim=64,  # two text encoders of width 32, concatenated
    )


def tiny_sdxl_pipeline(seed: int = 0, prediction_type: str = "epsilon"):
    """A complete StableDiffusionXLPipeline of tiny random models."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    tokenizer = tiny_clip_tokenizer()
    scheduler = EulerDiscreteScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type=prediction_type,
    )
    return StableDiffusionXLPipeline(
        vae=tiny_vae(seed + 1),
        text_encoder=tiny_clip_text_encoder(len(tokenizer), seed + 2),
        text_encoder_2=tiny_clip_text_encoder_with_projection(len(tokenizer), seed + 3),
        tokenizer=tokenizer,
        tokenizer_2=tiny_clip_tokenizer(),
        unet=tiny_sdxl_unet(seed),
        scheduler=scheduler,
        add_watermarker=False,
    )


def save_tiny_sdxl(folder: str | Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Write a tiny SDXL-style model as a diffusers folder and return its path."""
    folder = Path(folder)
    tiny_sdxl_pipeline(seed, prediction_type).save_pretrained(folder)
    return folder
