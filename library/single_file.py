"""Single-file Stable Diffusion checkpoints (original LDM/SGM key layout) → diffusers modules, offline.

A ``.safetensors`` file (or, only with ``--allow_pickle``, a ``.ckpt``/``.pt`` pickle) as
Stability, A1111, ComfyUI and kohya write it holds the UNet under ``model.diffusion_model.``,
the VAE under ``first_stage_model.`` and the text encoder(s); which ones tells the kind:

=========  ===========================================================  ==============================
kind       text encoder keys                                            diffusers text encoder(s)
=========  ===========================================================  ==============================
sd_v1      ``cond_stage_model.transformer.`` (Hugging Face CLIP names)  CLIPTextModel (ViT-L/14)
sd_v2      ``cond_stage_model.model.`` (OpenCLIP names)                 CLIPTextModel (ViT-H/14, 23 layers)
sdxl_base  ``conditioner.embedders.0.transformer.`` and                 CLIPTextModel + CLIPTextModelWithProjection
           ``conditioner.embedders.1.model.`` (OpenCLIP bigG)
=========  ===========================================================  ==============================

The architecture is not in the file. ``configs/architectures/<kind>/`` ships the diffusers
configs of the real models (SD 1.x, SD 2.x, SDXL base); a checkpoint of another shape is
described by a diffusers-style folder (``unet/config.json``, ``vae/config.json``,
``text_encoder[_2]/config.json``, ``scheduler/scheduler_config.json``, weights not needed)
given as ``model_config_dir`` or as the ``--tokenizer_cache_dir`` folder. Keys are converted
with diffusers' own single-file converters and loaded strictly, so a config that does not fit
the checkpoint is an error that names both. Nothing is downloaded: tokenizers come from
``--tokenizer_cache_dir``, the config folder, or the local Hugging Face cache.

Prediction type. The keys cannot tell SD 2.x 768-v (v-prediction) from 512-base (epsilon).
The rule: ``--v_parameterization`` always wins; a ``v_pred`` key (the marker ComfyUI and
others write) means v; for SD 2.x the spread of ``output_blocks.11.1.transformer_blocks.0.
norm1.bias`` decides (std > 0.09 is v, ComfyUI's heuristic, right for the released 2.0/2.1
checkpoints); otherwise epsilon. The choice is logged.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from library.errors import UserError
from library.weights_check import check_weight_file

ARCHITECTURES = Path(__file__).resolve().parent.parent / "configs" / "architectures"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
CHECKPOINT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)

UNET = "model.diffusion_model."
VAE = "first_stage_model."
SD1_TE = "cond_stage_model.transformer."
SD2_TE = "cond_stage_model.model."
SDXL_TE1 = "conditioner.embedders.0.transformer."
SDXL_TE2 = "conditioner.embedders.1.model."
V_PRED_MARKER = "v_pred"
SD2_V_PROBE = UNET + "output_blocks.11.1.transformer_blocks.0.norm1.bias"


@dataclass(frozen=True)
class Kind:
    """What a checkpoint is: its family (``--model_type``), config folder name and text encoder prefixes."""

    family: str  # "sd" | "sdxl"
    name: str  # "sd_v1" | "sd_v2" | "sdxl_base": the folder under configs/architectures
    title: str
    text_encoders: tuple[tuple[str, str, str], ...]  # (key prefix, key style "clip"/"open_clip", subfolder)
    tokenizers: tuple[tuple[str, str], ...]  # (subfolder, Hugging Face id of the tokenizer it was trained with)


SD_V1 = Kind("sd", "sd_v1", "SD 1.x", ((SD1_TE, "clip", "text_encoder"),),
             (("tokenizer", "openai/clip-vit-large-patch14"),))
SD_V2 = Kind("sd", "sd_v2", "SD 2.x", ((SD2_TE, "open_clip", "text_encoder"),),
             (("tokenizer", "stabilityai/stable-diffusion-2"),))
SDXL_BASE = Kind("sdxl", "sdxl_base", "SDXL base",
                 ((SDXL_TE1, "clip", "text_encoder"), (SDXL_TE2, "open_clip", "text_encoder_2")),
                 (("tokenizer", "openai/clip-vit-large-patch14"),
                  ("tokenizer_2", "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k")))


# --- reading -----------------------------------------------------------------------------------


def read_checkpoint(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint file; pickles only with ``allow_pickle`` and ``weights_only=True``."""
    path = Path(path)
    check_weight_file(path)  # git-lfs pointers, truncated safetensors
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if suffix not in PICKLE_SUFFIXES:
        raise UserError(f"{path}: not a checkpoint file; expected one of {', '.join(CHECKPOINT_SUFFIXES)}.")
    if not allow_pickle:
        raise UserError(f"{path} is a pickle single-file checkpoint ({path.suffix}); unpickling can run arbitrary "
                        "code, so it is refused unless you pass --allow_pickle (it is then loaded with "
                        "torch.load(weights_only=True), tensors only). Better: a .safetensors version of the model.")
    with open(path, "rb") as f:
        zipped = f.read(2) == b"PK"
    if zipped and not zipfile.is_zipfile(path):
        raise UserError(f"{path} is truncated (its zip directory is missing): download or copy it again.")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: refused even with --allow_pickle: it holds objects other than tensors, "
                        f"which weights_only loading does not run ({reason[:300]}). Convert it to .safetensors "
                        "with a tool you trust.") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise UserError(f"{path}: cannot read it as a torch checkpoint ({e}); it may be truncated.") from None
    while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise UserError(f"{path}: holds a {type(data).__name__}, not a dict of tensors.")
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _key_reader(path: Path, allow_pickle: bool) -> tuple[list[str], Callable[[str], torch.Tensor]]:
    """The key names and a tensor getter; a safetensors file is not read beyond what is asked."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        check_weight_file(path)
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())

        def get(key: str) -> torch.Tensor:
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor(key)

        return keys, get
    state = read_checkpoint(path, allow_pickle)
    return list(state), state.__getitem__


# --- detection ---------------------------------------------------------------------------------


def detect_kind(keys: Iterable[str], get: Callable[[str], torch.Tensor], source: str = "checkpoint") -> Kind:
    """SD 1.x, SD 2.x or SDXL base from the key names; a UserError for anything else."""
    keys = list(keys)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if not has(UNET):
        if any(k.startswith(("lora_", "lycoris_")) for k in keys):
            raise UserError(f"{source} is a LoRA/network file, not a model: give the base model there (training: "
                            "--pretrained_model_name_or_path, a LoRA to continue from in --network_weights; "
                            "tools/merge.py: --sd_model, the LoRAs in --models).")
        if has("down_blocks.") or has("unet.") or has("encoder.down_blocks."):
            raise UserError(f"{source} holds diffusers-named weights, not an original single-file checkpoint: "
                            "give the diffusers model folder instead.")
        raise UserError(f"{source}: no UNet weights ({UNET}*); not a Stable Diffusion checkpoint "
                        f"(first keys: {', '.join(sorted(keys)[:3]) or 'none'}).")
    conv_in = UNET + "input_blocks.0.0.weight"
    if conv_in in keys and get(conv_in).shape[1] != 4:
        raise UserError(f"{source}: the UNet takes {get(conv_in).shape[1]} input channels (an inpainting or "
                        "other special model); LoRA training here supports the 4-channel text-to-image models.")
    if has(SDXL_TE2):
        kind = SDXL_BASE
    elif has("conditioner.embedders.0.model."):
        raise UserError(f"{source} is an SDXL refiner checkpoint; train LoRAs on the SDXL base model.")
    elif has(SD2_TE):
        kind = SD_V2
    elif has(SD1_TE):
        kind = SD_V1
    else:
        raise UserError(f"{source}: no text encoder weights ({SD1_TE}*, {SD2_TE}* or conditioner.embedders.*); "
                        "the checkpoint is incomplete.")
    missing = [prefix for prefix, _, _ in kind.text_encoders if not has(prefix)]
    if missing:
        raise UserError(f"{source}: an {kind.title} checkpoint without its {', '.join(missing)}* weights.")
    return kind


def detect_v_prediction(kind: Kind, keys: Iterable[str], get: Callable[[str], torch.Tensor]) -> tuple[bool, str]:
    """(v-prediction?, why) by the rule of the module docstring (the caller applies ``--v_parameterization``)."""
    keys = set(keys)
    if V_PRED_MARKER in keys:
        return True, f"its '{V_PRED_MARKER}' key"
    if kind is SD_V2 and SD2_V_PROBE in keys:
        spread = float(torch.std(get(SD2_V_PROBE).float(), unbiased=False))
        return spread > 0.09, f"SD 2.x rule: std {spread:.3f} of a norm bias {'>' if spread > 0.09 else '<='} 0.09"
    return False, "no v-prediction marker"


def detect_checkpoint(path: str | Path, allow_pickle: bool = False) -> Kind:
    """The kind of a single-file checkpoint, from its keys."""
    path = Path(path)
    keys, get = _key_reader(path, allow_pickle)
    return detect_kind(keys, get, str(path))


# --- configs and tokenizers --------------------------------------------------------------------


def config_folder(kind: Kind, model_config_dir: str | None = None, tokenizer_path: str | None = None) -> Path:
    """The diffusers-style folder whose configs describe the checkpoint (see the module docstring)."""
    if model_config_dir:
        folder = Path(model_config_dir)
        if not (folder / "unet" / "config.json").is_file():
            raise UserError(f"model config folder {folder}: expected unet/config.json, vae/config.json, "
                            "text_encoder/config.json (a diffusers model folder without weights will do).")
        return folder
    if tokenizer_path and (Path(tokenizer_path) / "unet" / "config.json").is_file():
        return Path(tokenizer_path)
    return ARCHITECTURES / kind.name


def _cached_tokenizer(hub_id: str) -> Path | None:
    """The tokenizer folder of ``hub_id`` in the local Hugging Face cache, if it is there (never a download)."""
    from huggingface_hub import try_to_load_from_cache

    sub = "tokenizer/" if hub_id == "stabilityai/stable-diffusion-2" else ""
    found = try_to_load_from_cache(hub_id, f"{sub}vocab.json")
    return Path(found).parent if isinstance(found, str) else None


def load_tokenizers(kind: Kind, tokenizer_path: str | None, configs: Path) -> list[Any]:
    """Each text encoder's tokenizer from local files only (a single file holds none)."""
    from transformers import CLIPTokenizer

    found = []
    for subfolder, hub_id in kind.tokenizers:
        # --tokenizer_cache_dir as a diffusers folder, as sd-scripts' cache (<id with _>), or the tokenizer itself
        base = Path(tokenizer_path) if tokenizer_path else None
        candidates = [base / subfolder, base / hub_id.replace("/", "_")] if base else []
        if base and len(kind.tokenizers) == 1:
            candidates.append(base)
        candidates.append(configs / subfolder)
        folder = next((c for c in candidates if (c / "vocab.json").is_file() or (c / "tokenizer.json").is_file()),
                      None) or _cached_tokenizer(hub_id)
        # transformers 5 quietly builds an empty tokenizer from a folder without files: look before loading
        tokenizer = CLIPTokenizer.from_pretrained(str(folder)) if folder else None
        if tokenizer is None or len(tokenizer) <= 2:
            tried = ", ".join(str(c) for c in candidates)
            raise UserError(f"No {subfolder} for the {kind.title} checkpoint (a single file holds none): tried "
                            f"{tried} and the local Hugging Face cache of {hub_id}. Give --tokenizer_cache_dir: a "
                            f"folder with {' and '.join(s for s, _ in kind.tokenizers)} (vocab.json and merges.txt, or "
                            "tokenizer.json), e.g. a diffusers model folder of the same family.")
        found.append(tokenizer)
    return found


def scheduler_config(configs: Path, v_prediction: bool) -> dict[str, Any]:
    """The noise schedule config of the folder, with the checkpoint's prediction type."""
    from diffusers import DDPMScheduler

    config = dict(DDPMScheduler.load_config(str(configs), subfolder="scheduler"))
    config["prediction_type"] = "v_prediction" if v_prediction else "epsilon"
    return config


# --- key conversion and strict loading ---------------------------------------------------------


def _strip(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


_ADVICE = ("For a non-standard model, give a diffusers-style config folder (unet/, vae/, text_encoder/ config.json "
           "files; a diffusers folder of the model will do) as --model_config_dir.")


def _convert(what: str, configs: Path, convert: Callable[..., dict[str, torch.Tensor]], *args: Any,
             **kwargs: Any) -> dict[str, torch.Tensor]:
    """diffusers' key converters index blocks by the config; a config of another shape fails inside them."""
    try:
        return convert(*args, **kwargs)
    except (KeyError, IndexError, ValueError, RuntimeError) as e:
        raise UserError(f"The checkpoint's {what} does not fit the architecture in {configs} (converting its "
                        f"keys failed at {e!r}). {_ADVICE}") from None


def _load_strict(model: torch.nn.Module, weights: dict[str, torch.Tensor], what: str, configs: Path,
                 ignore: Callable[[str], bool] = lambda k: False) -> torch.nn.Module:
    """Load every parameter of ``model`` (built on the meta device) from ``weights``, as float32."""
    expected = model.state_dict()
    weights = {k: v for k, v in weights.items() if k in expected or not ignore(k)}
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(k for k in set(weights) & set(expected) if weights[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        def some(names: list[str]) -> str:
            return ", ".join(names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")

        problems = [f"{n} {label}: {some(v)}" for n, label, v in (
            (len(missing), "missing", missing), (len(unexpected), "unexpected", unexpected),
            (len(wrong), "with another shape", wrong)) if v]
        raise UserError(f"The checkpoint's {what} does not fit the architecture in {configs}: {'; '.join(problems)}. "
                        f"{_ADVICE}")
    floats = {k: v.float() if v.is_floating_point() and v.dtype != torch.float32 else v for k, v in weights.items()}
    model.load_state_dict(floats, strict=True, assign=True)
    return model.eval()


def _empty(factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on the meta device: the checkpoint's tensors are assigned
        return factory()


def load_unet(state: Mapping[str, torch.Tensor], configs: Path) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = UNet2DConditionModel.load_config(str(configs), subfolder="unet")
    model = _empty(lambda: UNet2DConditionModel.from_config(config))
    weights = _convert("UNet", configs, convert_ldm_unet_checkpoint, dict(state), config)
    return _load_strict(model, weights, "UNet", configs)


def load_vae(state: Mapping[str, torch.Tensor], configs: Path, source: str) -> torch.nn.Module:
    """The VAE of a checkpoint (``first_stage_model.``/``vae.`` keys, bare LDM keys, or diffusers keys)."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = AutoencoderKL.load_config(str(configs), subfolder="vae")
    if not any(k.startswith((VAE, "vae.", "encoder.", "decoder.")) for k in state):
        raise UserError(f"{source} holds no VAE (first_stage_model.*); give one with --vae.")
    if any(k.startswith("encoder.down_blocks.") for k in state):  # already diffusers names (a --vae file)
        weights = dict(state)
    else:
        weights = _convert("VAE", configs, convert_ldm_vae_checkpoint, dict(state), config)
    model = _empty(lambda: AutoencoderKL.from_config(config))
    return _load_strict(model, weights, "VAE", configs)


def load_text_encoder(state: Mapping[str, torch.Tensor], prefix: str, style: str, configs: Path,
                      subfolder: str) -> torch.nn.Module:
    """A CLIP text encoder from Hugging Face CLIP names (``clip``) or OpenCLIP names (``open_clip``)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig.from_pretrained(str(configs / subfolder))
    cls = CLIPTextModelWithProjection if "CLIPTextModelWithProjection" in (config.architectures or []) \
        else CLIPTextModel
    model = _empty(lambda: cls(config))
    if style == "clip":
        weights = _strip(state, prefix)
    else:
        from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

        # SD 2.x conditions on the penultimate layer: diffusers' encoder has one layer fewer than OpenCLIP's.
        layer = re.compile(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
        kept = {k: v for k, v in state.items() if k.startswith(prefix)
                and not ((m := layer.match(k)) and int(m[1]) >= config.num_hidden_layers)}
        weights = _convert(subfolder, configs, convert_open_clip_checkpoint, model, kept, prefix=prefix)
    # transformers 5 flattened CLIPTextModel (no ``text_model.`` level); the checkpoints keep it.
    if not hasattr(model, "text_model"):
        weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
    return _load_strict(model, weights, f"{subfolder} ({prefix}*)", configs,
                        ignore=lambda k: k.endswith(("position_ids", "logit_scale")))


@dataclass
class Checkpoint:
    """The diffusers modules of a single-file checkpoint and what the family needs besides."""

    kind: Kind
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    tokenizers: list[Any]
    scheduler_config: dict[str, Any]
    configs: Path


def load_checkpoint(path: str | Path, family: str, *, tokenizer_path: str | None = None,
                    model_config_dir: str | None = None, allow_pickle: bool = False,
                    vae_path: str | None = None) -> Checkpoint:
    """Every module of a single-file checkpoint of ``family`` ("sd" or "sdxl"), offline."""
    path = Path(path)
    state = read_checkpoint(path, allow_pickle)
    kind = detect_kind(state, state.__getitem__, str(path))
    if kind.family != family:
        raise UserError(f"{path} is an {kind.title} checkpoint; use --model_type {kind.family} (or auto).")
    configs = config_folder(kind, model_config_dir, tokenizer_path)
    tokenizers = load_tokenizers(kind, tokenizer_path, configs)  # before the weights: a cheap failure first
    v_prediction, why = detect_v_prediction(kind, state, state.__getitem__)
    if os.environ.get("RANK", "0") == "0":  # once per run, not once per process
        print(f"{path.name}: {kind.title} single-file checkpoint, architecture from {configs}, "
              f"{'v' if v_prediction else 'epsilon'} prediction ({why}; --v_parameterization forces v)")
    text_encoders = [load_text_encoder(state, prefix, style, configs, sub) for prefix, style, sub in kind.text_encoders]
    unet = load_unet(state, configs)
    if vae_path:
        vae = load_vae_path(vae_path, configs, allow_pickle)
    else:
        vae = load_vae(_strip(state, VAE), configs, str(path))
    del state
    return Checkpoint(kind, unet, vae, text_encoders, tokenizers, scheduler_config(configs, v_prediction), configs)


def load_vae_path(vae_path: str | Path, configs: Path, allow_pickle: bool = False) -> torch.nn.Module:
    """``--vae``: a diffusers VAE folder or a VAE file (LDM or diffusers key names)."""
    from diffusers import AutoencoderKL

    from library.families.diffusion_parts import load_part

    if Path(vae_path).is_dir():
        return load_part("VAE", AutoencoderKL.from_pretrained, str(vae_path))
    state = read_checkpoint(vae_path, allow_pickle)
    prefix = next((p for p in (VAE, "vae.") if any(k.startswith(p) for k in state)), "")
    return load_vae(_strip(state, prefix), configs, str(vae_path))


# --- writing (diffusers → original layout) -----------------------------------------------------

_VAE_RENAMES = [  # diffusers → LDM, applied in order to each key
    (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.mid.attn_1."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
    (r"\.group_norm\.", ".norm."), (r"\.to_q\.", ".q."), (r"\.to_k\.", ".k."), (r"\.to_v\.", ".v."),
    (r"\.to_out\.0\.", ".proj_out."),
]


def _vae_key(key: str, up_blocks: int) -> str:
    key = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.",
                 key)
    # the LDM decoder numbers its levels from the lowest resolution up, diffusers from the top down
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.",
                 lambda m: f"decoder.up.{up_blocks - 1 - int(m[1])}.{'block' if m[2] == 'resnets' else 'upsample'}.",
                 key)
    for pattern, repl in _VAE_RENAMES:
        key = re.sub(pattern, repl, key)
    return key


def _open_clip_weights(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """Hugging Face CLIP → OpenCLIP names: fused q/k/v ``in_proj``, ``text_projection`` transposed."""
    state = {k.removeprefix("text_model."): v for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    simple = {"embeddings.token_embedding.weight": "token_embedding.weight",
              "embeddings.position_embedding.weight": "positional_embedding",
              "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
    inner = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for key, value in state.items():
        if key in simple:
            out[prefix + simple[key]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        elif m := re.match(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", key):
            block, name, param = m.groups()
            base = f"{prefix}transformer.resblocks.{block}."
            if name == "self_attn.q_proj":  # k and v are fused with it here
                qkv = [state[f"encoder.layers.{block}.self_attn.{p}_proj.{param}"] for p in "qkv"]
                out[f"{base}attn.in_proj_{param}"] = torch.cat(qkv)
            elif name in inner:
                out[f"{base}{inner[name]}.{param}"] = value
            elif name not in ("self_attn.k_proj", "self_attn.v_proj"):
                raise ValueError(f"no OpenCLIP name for {key}")
        elif not key.endswith("position_ids"):
            raise ValueError(f"no OpenCLIP name for {key}")
    return out


def original_state_dict(unet: torch.nn.Module, vae: torch.nn.Module, text_encoders: list[torch.nn.Module],
                        v2: bool = False) -> dict[str, torch.Tensor]:
    """diffusers modules → one state dict in the original LDM (SD 1.x/2.x) or SGM (SDXL) layout."""
    from networks.sgm_names import UNetLayout, block_table, is_sdxl_unet, to_sgm

    table = block_table(UNetLayout.from_config(unet.config))
    out = {UNET + to_sgm(k, table): v for k, v in unet.state_dict().items()}
    up_blocks = len(vae.config.up_block_types)
    for key, value in vae.state_dict().items():
        if ".mid_block.attentions." in key and key.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # the LDM VAE's attention projections are 1x1 convolutions
        out[VAE + _vae_key(key, up_blocks)] = value
    kind = SDXL_BASE if is_sdxl_unet(unet) else SD_V2 if v2 else SD_V1
    for (prefix, style, _), encoder in zip(kind.text_encoders, text_encoders, strict=True):
        if style == "open_clip":
            out.update(_open_clip_weights(encoder, prefix))
        else:
            out.update({prefix + "text_model." + k.removeprefix("text_model."): v
                        for k, v in encoder.state_dict().items() if not k.endswith("position_ids")})
    return out


def save_original(path: str | Path, unet: torch.nn.Module, vae: torch.nn.Module,
                  text_encoders: list[torch.nn.Module], v2: bool = False, v_prediction: bool = False,
                  dtype: torch.dtype | None = None) -> Path:
    """Write diffusers modules as one original-layout ``.safetensors`` (``v_pred`` marker when asked)."""
    from safetensors.torch import save_file

    state = original_state_dict(unet, vae, text_encoders, v2)
    if v_prediction:
        state[V_PRED_MARKER] = torch.tensor([])
    state = {k: (v.to(dtype) if dtype and v.is_floating_point() else v).contiguous() for k, v in state.items()}
    path = Path(path)
    save_file(state, str(path))
    return path
