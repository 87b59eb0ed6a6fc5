"""What the diffusers-based families (SD 1.x/2.x in sd.py, SDXL in sdxl.py) do the same way.

Loading a component with a readable error, the noise scheduler and prediction type, the image
data, placing frozen modules on the device, VAE latents, and the in-memory cache of text
encoder outputs. Each family composes these; none of them knows which family calls it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from library.errors import UserError
from library.families import DataRequest
from library.families.diffusion import DRAW_LATENT, NoiseSettings, sample_keys
from library.rng import per_sample_randn


def load_part(kind: str, loader: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a from_pretrained loader, turning its failure into a message about the folder."""
    try:
        return loader(*args, **kwargs)
    except (OSError, ValueError) as e:
        where = args[0] if args else kwargs
        raise UserError(f"Cannot load the {kind} from {where}: {e}") from None


def load_vae(root: Path, vae_path: str | None, allow_pickle: bool = False) -> torch.nn.Module:
    """The model's own VAE, or the separate one given with ``--vae`` (a folder or a file)."""
    from diffusers import AutoencoderKL

    if vae_path and Path(vae_path).is_file():  # a single-file VAE; its architecture is the model's
        from library.single_file import load_vae_path

        return load_vae_path(vae_path, root, allow_pickle)
    if vae_path:
        return load_part("VAE", AutoencoderKL.from_pretrained, vae_path)
    return load_part("VAE", AutoencoderKL.from_pretrained, str(root), subfolder="vae")


def load_scheduler(root: Path, v_parameterization: bool | None, noise: NoiseSettings | None,
                   scheduler_config: dict[str, Any] | None = None) -> tuple[Any, NoiseSettings]:
    """The DDPM training schedule from the model's scheduler config, and the noise settings with
    ``v_parameterization`` defaulted from its ``prediction_type`` (a user's True always wins).
    ``scheduler_config``: a config already read (single-file checkpoints); ``root`` is then unused."""
    from diffusers import DDPMScheduler

    if scheduler_config is None:
        scheduler_config = load_part("scheduler config", DDPMScheduler.load_config, str(root), subfolder="scheduler")
    # Training always adds noise with the DDPM schedule the model was trained with, whatever
    # sampler the folder names (SDXL ships an Euler config with the same betas).
    scheduler = DDPMScheduler.from_config(scheduler_config, rescale_betas_zero_snr=bool(
        noise and noise.zero_terminal_snr))
    detected_v = scheduler.config.prediction_type == "v_prediction"
    v_param = detected_v if v_parameterization is None else (v_parameterization or detected_v)
    base = noise or NoiseSettings()
    return scheduler, NoiseSettings(**{**base.__dict__, "v_parameterization": v_param})


def load_single_file(root: Path, kind: str, *, tokenizer_path: str | None, model_config_dir: str | None,
                     allow_pickle: bool, vae_path: str | None, v_parameterization: bool | None,
                     noise: NoiseSettings | None):
    """A single-file checkpoint as frozen diffusers modules, with its training scheduler: (checkpoint,
    scheduler, noise settings). The families build themselves from ``checkpoint``'s parts."""
    from library.single_file import load_checkpoint

    ckpt = load_checkpoint(root, kind, tokenizer_path=tokenizer_path, model_config_dir=model_config_dir,
                           allow_pickle=allow_pickle, vae_path=vae_path)
    scheduler, noise = load_scheduler(root, v_parameterization, noise, ckpt.scheduler_config)
    for module in (*ckpt.text_encoders, ckpt.vae, ckpt.unet):
        module.requires_grad_(False)
    return ckpt, scheduler, noise


def image_dataset_config(request: DataRequest):
    """The run's DatasetGroupConfig from the kohya TOML or the legacy --train_data_dir."""
    from library.dataset_config import config_from_train_data_dir, load_dataset_config

    if request.dataset_config:
        config = load_dataset_config(Path(request.dataset_config), request.defaults)
    elif request.defaults.train_data_dir is not None:
        config = config_from_train_data_dir(request.defaults)
    else:
        raise UserError("No training data: give --dataset_config (a TOML) or --train_data_dir.")
    return with_loss_masks(config, request.masked_loss)


def with_loss_masks(config: Any, masked_loss: bool) -> Any:
    """``config`` as ``--masked_loss`` uses it: masks required with it, and left unread without it."""
    import dataclasses
    import logging

    from library.data.masks import has_mask

    masked = [subset.name for dataset in config.datasets for subset in dataset.subsets if has_mask(subset)]
    if masked_loss and not masked:
        raise UserError(f"--masked_loss: no subset of {config.source or 'the dataset'} has a mask. Set alpha_mask = "
                        "true (each image's transparency) or conditioning_data_dir (a folder of mask images named "
                        "like the images) in the dataset TOML, or pass --alpha_mask.")
    if masked_loss or not masked:
        return config
    logging.getLogger(__name__).warning(
        "%s: alpha_mask / conditioning_data_dir without --masked_loss: the masks are not used", ", ".join(masked))
    datasets = tuple(dataclasses.replace(d, subsets=tuple(
        dataclasses.replace(s, alpha_mask=False, conditioning_data_dir=None) for s in d.subsets))
        for d in config.datasets)
    return dataclasses.replace(config, datasets=datasets)


def scan_images(request: DataRequest) -> tuple[Any, Any]:
    """(config, ImageData) of the request's image datasets: listed, captioned and bucketed; no latents yet."""
    from library.data.image_data import build_image_data

    if request.scanned is not None:  # scanned before the model loaded
        return request.scanned
    config = image_dataset_config(request)
    return config, build_image_data(config, seed=request.seed, on_bad_image=request.on_bad_image,
                                    num_processes=request.num_processes, rank=request.rank,
                                    num_workers=request.num_workers, persistent_workers=request.persistent_workers,
                                    accumulation=request.accumulation)


def build_images(request: DataRequest, data: Any,
                 encode_images: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    """The scanned image data (scan_images) for this process, latents cached on request."""
    if request.cache_latents or request.cache_latents_to_disk:
        from library.data.image_data import vae_fingerprint

        vae = getattr(getattr(encode_images, "__self__", None), "vae", None)
        data.cache_latents(encode_images, request.vae_batch_size, request.device,
                           to_disk=request.cache_latents_to_disk,
                           vae_fingerprint=vae_fingerprint(vae) if vae is not None else "",
                           num_processes=request.num_processes, rank=request.rank, barrier=request.barrier)
        if vae is not None and data.validation_loader is None:
            # Every training latent is cached and no validation image needs encoding: the VAE leaves the
            # accelerator (160 MB for SDXL in bf16); sample images bring it back for a moment.
            vae.to("cpu")
    return data


def place_modules(device: torch.device, weight_dtype: torch.dtype, vae_dtype: torch.dtype | None,
                  unet: torch.nn.Module, text_encoders: Sequence[torch.nn.Module], vae: torch.nn.Module,
                  train_text_encoder: bool, gradient_checkpointing: bool) -> None:
    """Move and cast the frozen models, set eval/train modes and gradient checkpointing."""
    for module, dtype in ((unet, weight_dtype), *((te, weight_dtype) for te in text_encoders),
                          (vae, vae_dtype or weight_dtype)):
        module.to(device)
        if module.dtype != dtype:  # diffusers warns on every .to(dtype), even a no-op one
            module.to(dtype=dtype)
    # Frozen modules stay in eval mode: their dropout would only add noise to the LoRA's gradient.
    for module in (vae, unet, *text_encoders):
        module.eval()
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()  # diffusers checkpoints only in training mode; the UNet has no dropout
        if train_text_encoder:
            from library.checkpointing import enable_checkpointing

            for te in text_encoders:  # non-reentrant, in eval mode (library/checkpointing.py)
                enable_checkpointing(te)


def latent_scale(vae: torch.nn.Module) -> int:
    """Pixels per latent: 2 ** (number of VAE down blocks - 1)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def encode_latents(vae: torch.nn.Module, images: torch.Tensor, seed: int, epoch: int,
                   indices: torch.Tensor) -> torch.Tensor:
    """VAE latents, sampled per image with a generator keyed on the image, times the scaling factor."""
    dist = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
    eps = per_sample_randn(tuple(dist.mean.shape[1:]), sample_keys(seed, epoch, indices, DRAW_LATENT))
    latents = dist.mean + dist.std * eps.to(dist.mean.device, dist.mean.dtype)
    bad = (~torch.isfinite(latents.flatten(1))).any(dim=1)
    if bad.any():
        raise NonFiniteLatents(bad.nonzero().flatten().tolist())
    return latents * vae.config.scaling_factor


class NonFiniteLatents(UserError):
    """The VAE gave NaN/inf latents for some images of a batch (positions in the batch)."""

    def __init__(self, positions: list[int], paths: list[str] | None = None) -> None:
        self.positions = positions
        named = ", ".join(paths) if paths else f"batch positions {positions}"
        super().__init__(f"The VAE produced NaN/inf latents for {named}. With an fp16 VAE use --no_half_vae; "
                         "otherwise check or remove the image (it is never silently replaced by zeros).")

    def with_paths(self, paths: list[str]) -> NonFiniteLatents:
        return NonFiniteLatents(self.positions, [paths[i] for i in self.positions])


def tokenize(tokenizer: Any, encoder: torch.nn.Module, captions: list[str]) -> torch.Tensor:
    """Token ids padded to the encoder's context length, on the encoder's device."""
    # Saved tokenizers sometimes carry a huge model_max_length; the encoder's positions are the limit.
    max_length = min(tokenizer.model_max_length, encoder.config.max_position_embeddings)
    ids = tokenizer(captions, padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="pt").input_ids
    return ids.to(encoder.device)


def token_chunks(tokenizer: Any, encoder: torch.nn.Module, captions: list[str],
                 max_token_length: int | None) -> list[torch.Tensor]:
    """Token ids as CLIP-sized chunks: one chunk normally, 2 or 3 for --max_token_length 150 / 225.

    Each chunk is <bos> + 75 tokens + an end token, so every encoder call sees the context length it was
    trained on (kohya's scheme; A1111 splits long prompts the same way at inference). The end token is the
    long sequence's last one (<pad> or <eos>), made <eos> where the chunk's text runs up to it, and a chunk
    with no text at all starts <bos> <eos> <pad>...: sd-scripts' layout, which matters where the tokenizer
    pads with something other than <eos> (SDXL's second tokenizer pads with "!").
    """
    if not max_token_length or max_token_length <= 75:
        return [tokenize(tokenizer, encoder, captions)]
    ids = tokenizer(captions, padding="max_length", truncation=True, max_length=max_token_length + 2,
                    return_tensors="pt").input_ids
    eos = tokenizer.eos_token_id
    pad = eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    chunks = []
    for i in range(max_token_length // 75):
        chunk = torch.cat([ids[:, :1], ids[:, 1 + 75 * i:1 + 75 * (i + 1)], ids[:, -1:]], dim=1)
        chunk[(chunk[:, -2] != eos) & (chunk[:, -2] != pad), -1] = eos  # text up to the end: close it
        chunk[chunk[:, 1] == pad, 1] = eos  # no text in this chunk: <bos> <eos> <pad>...
        chunks.append(chunk.to(encoder.device))
    return chunks


def merge_chunks(states: list[torch.Tensor]) -> torch.Tensor:
    """Hidden states of the chunks as one sequence: the first <bos>, every chunk's 75 tokens, the last <eos>."""
    if len(states) == 1:
        return states[0]
    return torch.cat([states[0][:, :1], *(h[:, 1:-1] for h in states), states[-1][:, -1:]], dim=1)


# --- --cache_text_encoder_outputs ------------------------------------------------------------

TextOutputs = tuple[torch.Tensor, ...]  # per caption, without the batch dimension


def fixed_captions(data: Any) -> list[str]:
    """Every distinct caption the run trains with, when captions never change between epochs.

    A caption that is shuffled or dropped differs per sample and epoch, so its encoder output
    cannot be computed once: such subsets are refused with the option to remove.
    """
    from library.data.captions import process_caption

    captions: dict[str, None] = {}
    # The held-out images of validation_split are captioned the same way and need their outputs too.
    validation = getattr(data, "validation_loader", None)
    held_out = list(getattr(validation.dataset, "parts", [])) if validation is not None else []
    for dataset in [*data.datasets, *held_out]:
        for subset in dataset.config.subsets:
            varying = [name for name, on in (
                ("shuffle_caption", subset.shuffle_caption), ("caption_dropout_rate", subset.caption_dropout_rate),
                ("caption_tag_dropout_rate", subset.caption_tag_dropout_rate),
                ("caption_dropout_every_n_epochs", subset.caption_dropout_every_n_epochs),
                ("enable_wildcard", subset.enable_wildcard)) if on]
            if varying:
                raise UserError(f"{subset.name}: --cache_text_encoder_outputs encodes each caption once, but "
                                f"{', '.join(varying)} changes the captions every epoch; turn "
                                f"{'it' if len(varying) == 1 else 'them'} off or drop --cache_text_encoder_outputs.")
        for record in dataset.records:
            options = dataset.config.subsets[record.subset_index].caption_options
            # Without shuffle or dropout the caption is the same for every epoch; the rng is unused.
            captions[process_caption(record.caption, options, random.Random(0), 1)] = None
    return list(captions)


@torch.no_grad()
def cache_text_outputs(captions: list[str], encode: Callable[[list[str]], TextOutputs],
                       batch_size: int) -> dict[str, TextOutputs]:
    """caption → the encoder outputs for it (on the CPU), encoding ``batch_size`` captions per call."""
    cache: dict[str, TextOutputs] = {}
    step = max(batch_size, 1)
    for start in range(0, len(captions), step):
        chunk = captions[start:start + step]
        outputs = [t.cpu() for t in encode(chunk)]
        for i, caption in enumerate(chunk):
            cache[caption] = tuple(t[i] for t in outputs)
    return cache


def cached_text_outputs(cache: dict[str, TextOutputs], captions: list[str],
                        device: torch.device) -> TextOutputs:
    """The cached outputs of a batch's captions, stacked and on ``device``."""
    try:
        rows = [cache[c] for c in captions]
    except KeyError as e:
        raise RuntimeError(f"caption {e} was not in the text encoder cache") from None
    return tuple(torch.stack(parts).to(device) for parts in zip(*rows, strict=True))
