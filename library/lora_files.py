"""LoRA files on disk: the one place the tools read them, the family a file is for, and writing kohya files.

Every tool reads LoRAs through :func:`load_lora`, so a format or file type added here reaches them
all: ``.safetensors`` (kohya, diffusers, ComfyUI naming), PEFT adapter folders (an LLM's or a
diffusers UNet's), and torch state dicts (the trainer's ``--save_model_as ckpt`` / ``pt`` output,
diffusers' old ``pytorch_lora_weights.bin``; loaded with ``weights_only=True`` so that no pickled
code runs). Other tools' layouts (old diffusers attention processors, PEFT on a UNet, diffusers'
kohya output) are renamed by library/lora_foreign.py. :func:`detect_family` tells from the keys and
metadata which model a file is for (sd1, sdxl, llm); convert names modules by it and merge refuses
to combine families.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from library.errors import UserError
from library.lora_foreign import diffusers_key, foreign_layout, is_unet_adapter, kohya_names, to_diffusers
from library.lora_formats import (
    FAMILIES,
    LoRAState,
    Magnitudes,
    Namer,
    configs_from_diffusers_metadata,
    detect_format,
    read_comfy,
    read_kohya,
    read_lora_a_b,
    write_kohya,
)
from networks.svd import LoRAFactors

PRECISIONS: dict[str, torch.dtype] = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
PEFT_WEIGHTS_BIN = "adapter_model.bin"  # PEFT before safetensors became its default
# the trainer's --save_model_as ckpt / pt, sd-scripts' .pth, diffusers' old pytorch_lora_weights.bin
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


@dataclass
class LoRAFile:
    """A LoRA read from disk: its modules in kohya naming, its metadata and the format it was in."""

    state: LoRAState
    metadata: dict[str, str]
    format: str
    tensors: dict[str, torch.Tensor]  # as stored (for hashes)
    magnitudes: Magnitudes = field(default_factory=dict)  # DoRA; empty for a plain LoRA

    @property
    def is_dora(self) -> bool:
        return bool(self.magnitudes)

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype the file stores its LoRA weights in (the default for files written from it).

        Not simply the first tensor's: safetensors stores 8-byte dtypes first, so a file whose alphas are int64
        (diffusers' convert_state_dict_to_kohya writes them so) would give int64, and casting the weights to
        it rounds them all to zero.
        """
        floats = [t.dtype for t in self.tensors.values() if t.is_floating_point() and t.dim() >= 2]
        return floats[0] if floats else torch.float32


def read_metadata(path: str) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad header
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None


def load_torch_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A ``.ckpt`` / ``.pt`` / ``.bin`` LoRA: a dict of tensors, maybe under ``"state_dict"`` (as sd-scripts nests it).

    ``weights_only=True`` refuses any pickled object that is not plain tensors and containers, so
    a crafted file cannot run code here (KOHYA_COMPAT.md §6).
    """
    import pickle

    if not path.is_file():
        raise UserError(f"LoRA file not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not loadable as weights only ({first}); a .ckpt/.pt/.bin LoRA must be a plain "
                        "state dict of tensors (nothing else is unpickled, so no code in a file runs)") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not data:
        raise UserError(f"{path}: expected a dict of LoRA tensors (a state dict), found {type(data).__name__}")
    bad = [k for k, v in data.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise UserError(f"{path}: entries that are not named tensors, e.g. {bad[0]!r}; is this a LoRA state dict?")
    return data


def read_lora_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of one LoRA file; torch state dicts (``.ckpt`` / ``.pt`` / ``.bin``) carry no metadata."""
    from library.fileio import load_safetensors

    if path.suffix.lower() in PICKLE_SUFFIXES:
        return load_torch_state_dict(path), {}
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"{path}: a LoRA is a .safetensors file, a .ckpt/.pt/.bin state dict or a PEFT adapter folder")
    return load_safetensors(path, "LoRA"), read_metadata(str(path))


# --- which model a file is for ---------------------------------------------------------------

_SGM_BLOCKS = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")
_DIFFUSERS_BLOCKS = ("lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_unet_up_blocks_")


# Blocks only SD 1.x/2.x have: attention at the full-resolution level (SDXL's first level is ResNets only), in
# SGM names (ComfyUI also writes SD 1.x files so) and in diffusers names; and only SDXL has a second transformer
# block in an attention or the added (pooled text, size) embedding.
_SD1_ONLY = re.compile(r"input_blocks[._][12][._]1[._]|output_blocks[._](9|10|11)[._]1[._]|"
                       r"down_blocks[._]0[._]attentions|up_blocks[._]3[._]attentions")
_SDXL_ONLY = re.compile(r"transformer_blocks[._][1-9]|add_embedding")


def _family_from_block_names(keys: list[str]) -> tuple[str | None, str]:
    """A UNet-only file (diffusers ``unet.``, ComfyUI ``diffusion_model.``) without metadata, told by blocks only
    one of SD 1.x/2.x and SDXL has; (None, "") when its blocks exist in both."""
    for pattern, family in ((_SDXL_ONLY, "sdxl"), (_SD1_ONLY, "sd1")):
        key = next((k for k in keys if pattern.search(k)), None)
        if key is not None:
            return family, f"key {key} (a block only {family} has)"
    return None, ""


def _family_from_keys(keys: Iterable[str]) -> tuple[str | None, str]:
    """(family, the key that decided it), or (None, "") when the names fit several families."""
    keys = list(keys)
    sd1_sgm = next((k for k in keys if k.startswith(_SGM_BLOCKS) and _SD1_ONLY.search(k)), None)
    if sd1_sgm is not None:  # SD 1.x in the original (SGM) block names, as ComfyUI names every model's LoRA
        return "sd1", sd1_sgm.split(".", 1)[0]
    # diffusers block names under lora_unet_: SD 1.x/2.x for kohya, but diffusers' convert_state_dict_to_kohya
    # writes SDXL so too (and its text encoder as lora_te1_ even for SD 1.x), so the blocks decide first.
    # Files with kohya's own names for either (lora_te_, SGM blocks) need no such help: the loop below decides.
    kohya_own = any(k.startswith(("lora_te_", *_SGM_BLOCKS)) for k in keys)
    diffusers_unet = [] if kohya_own else [k for k in keys if k.startswith(_DIFFUSERS_BLOCKS)]
    for pattern, family in ((_SDXL_ONLY, "sdxl"), (_SD1_ONLY, "sd1")):
        key = next((k for k in diffusers_unet if pattern.search(k)), None)
        if key is not None:
            return family, key.split(".", 1)[0]
    for raw in keys:
        key = raw.split(".", 1)[0] if raw.startswith("lora_") else raw  # kohya: the module name, for messages
        if key.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.", "text_encoders.clip_g.")):
            return "sdxl", key  # a second text encoder: only SDXL has one
        if key.startswith(_SGM_BLOCKS):
            return "sdxl", key  # networks.lora names only the SDXL UNet by its original SGM blocks
        if key.startswith(("lora_te_", *_DIFFUSERS_BLOCKS)):
            return "sd1", key
        if key.startswith("base_model.model."):
            return "llm", key
    if keys and all(k.startswith("lora_unet_") for k in keys):
        return "llm", keys[0]  # kohya names, no UNet block and no text encoder: an LLM through networks.lora
    return None, ""


def _family_from_metadata(metadata: Mapping[str, str]) -> tuple[str | None, str]:
    version = metadata.get("ss_base_model_version") or ""
    architecture = metadata.get("modelspec.architecture") or ""
    if version.startswith("sdxl") or architecture.startswith("stable-diffusion-xl"):
        return "sdxl", f"ss_base_model_version {version}" if version else f"modelspec.architecture {architecture}"
    if version.startswith("sd_v") or architecture.startswith("stable-diffusion-v"):
        return "sd1", f"ss_base_model_version {version}" if version else f"modelspec.architecture {architecture}"
    if version == "llm" or architecture.startswith("llm"):
        return "llm", f"ss_base_model_version {version}" if version else f"modelspec.architecture {architecture}"
    return None, ""


def detect_family(keys: Iterable[str], metadata: Mapping[str, str]) -> tuple[str | None, str]:
    """The FAMILIES name a LoRA is for and why ("sdxl", "key lora_te1_..."), or (None, "") if undecided.

    Key names win (they are what a loader matches); the ``ss_base_model_version`` /
    ``modelspec.architecture`` metadata decides where the names fit several families (a
    diffusers or ComfyUI file with UNet modules only), and without metadata the blocks only one of them has.
    sd1 stands for SD 1.x and 2.x alike.
    """
    keys = [diffusers_key(k) for k in keys]  # other tools' layouts (PEFT on a UNet, old diffusers) as diffusers'
    family, key = _family_from_keys(keys)
    if family is not None:
        return family, f"key {key}"
    family, why = _family_from_metadata(metadata)
    return (family, why) if family is not None else _family_from_block_names(keys)


def file_family(path: str) -> tuple[str | None, str]:
    """:func:`detect_family` of a file or PEFT folder (a PEFT folder is an LLM adapter unless it adapts a UNet)."""
    p = Path(path)
    if p.is_dir():
        tensors, metadata, config = read_peft_folder(p)
        if is_unet_adapter(tensors, config):
            family, why = detect_family(tensors, metadata)
            return (family, why) if family else ("sd1", "a PEFT adapter of a UNet (SD 1.x/2.x unless --family)")
        return "llm", "a PEFT adapter folder"
    if p.suffix.lower() == ".safetensors" and p.is_file():
        from safetensors import safe_open

        metadata = read_metadata(str(p))
        with safe_open(str(p), framework="pt") as f:  # the header only: no tensor is read
            return detect_family(list(f.keys()), metadata)
    tensors, metadata = read_lora_tensors(p)
    return detect_family(tensors, metadata)


def base_model_of(lora: LoRAFile) -> str | None:
    """The base model a file declares (``ss_base_model_version``, else the ModelSpec architecture)."""
    version = lora.metadata.get("ss_base_model_version")
    return version or (lora.metadata.get("modelspec.architecture") or "").removesuffix("/lora") or None


def _base_model_kind(declared: str) -> str:
    """sd-scripts' and ModelSpec's names for one base model as one name: files that write only one of the two
    keys (``sd_v1`` / ``stable-diffusion-v1``) are for the same model."""
    for prefixes, kind in ((("sdxl", "stable-diffusion-xl"), "sdxl"), (("sd_v2", "stable-diffusion-v2"), "sd2"),
                           (("sd_v1", "stable-diffusion-v1"), "sd1")):
        if declared.startswith(prefixes):
            return kind
    return declared


def check_same_family(paths: list[str], files: list[LoRAFile], model: tuple[str, str] | None = None) -> None:
    """Refuse to combine LoRAs made for different models: their ΔW would land on unrelated weights.

    Families come from :func:`detect_family`; files that both declare a base model must declare
    the same one (sd_v1 and sd_v2 share key names but not weights). ``model``: (how the model
    was given, its family) when the LoRAs are baked into one, or ("--family sdxl", "sdxl") when the
    user named the family of files it cannot be told of.
    """
    seen: list[tuple[str, str, str]] = []  # (path, family, why)
    for path, lora in zip(paths, files, strict=True):
        family, why = detect_family(lora.tensors, lora.metadata)
        if family is None:
            continue
        if model is not None and family != model[1] and model[0].startswith("--family"):
            raise UserError(f"{path} is a LoRA for {family} ({why}), not {model[1]} as {model[0]} says; "
                            "leave --family out or give the family the files were made for")  # fmt: skip
        if model is not None and family != model[1]:
            raise UserError(f"{path} is a LoRA for {family} ({why}) but {model[0]} is a {model[1]} model; "
                            "give the model the LoRA was trained on")  # fmt: skip
        other = next((s for s in seen if s[1] != family), None)
        if other is not None:
            raise UserError(f"{other[0]} is a LoRA for {other[1]} ({other[2]}) but {path} is one for {family} "
                            f"({why}); LoRAs for different model families cannot be combined: use files made "
                            "for the same base model")  # fmt: skip
        seen.append((path, family, why))
    declared = [(p, base_model_of(f)) for p, f in zip(paths, files, strict=True) if base_model_of(f)]
    for path, base in declared[1:]:
        if _base_model_kind(base) != _base_model_kind(declared[0][1]):
            raise UserError(f"{declared[0][0]} was trained on {declared[0][1]} but {path} on {base} "
                            "(ss_base_model_version / modelspec.architecture); LoRAs for different base "
                            "models cannot be combined")  # fmt: skip


# --- reading and writing ------------------------------------------------------------------


def load_lora(path: str, namer: Namer | None = None, allow_dora: bool = False) -> LoRAFile:
    """Read a LoRA file or PEFT folder (format detected); module names in kohya naming, as the trainer writes them.

    Other tools' layouts (library/lora_foreign.py: old diffusers keys, PEFT on a UNet, diffusers' kohya output)
    are read as the modules they stand for.

    Without ``namer``, diffusers and ComfyUI names are mapped with the family :func:`detect_family`
    finds (sd1 when undecided). DoRA is refused unless ``allow_dora``: a tool working on ΔW alone
    would silently drop the magnitudes.
    """
    try:
        lora = _read_any(Path(path), namer)
    except UserError as e:  # with several --models, say which file
        raise (e if str(path) in str(e) else UserError(f"{path}: {e}")) from None
    check_factors(path, lora.state)
    if lora.is_dora and not allow_dora:
        raise UserError(f"{path} is a DoRA adapter ({len(lora.magnitudes)} modules with a magnitude vector); "
                        "this tool handles plain LoRAs only (tools/show.py and convert.py read DoRA, "
                        "merge.py bakes it into a model)")  # fmt: skip
    return lora


def _read_any(p: Path, namer: Namer | None) -> LoRAFile:
    """A PEFT folder or a LoRA file in any format :func:`load_lora` reads."""
    if p.is_dir():
        tensors, metadata, config = read_peft_folder(p)
        if is_unet_adapter(tensors, config):  # PEFT on a diffusers UNet: read as diffusers' unet.* keys
            lora = _read_foreign(tensors, metadata, namer, "peft", {"unet": config})
        else:
            namer = namer or Namer(FAMILIES["llm"])
            comp = next((c for c in namer.family.components if c.peft_prefix), None)
            if comp is None:
                raise UserError(f"{p} is a PEFT adapter folder (an LLM adapter), but the {namer.family.name} "
                                "family has no PEFT naming; use --family llm")  # fmt: skip
            state, magnitudes = read_lora_a_b(tensors, namer, "peft_prefix", {comp.name: config})
            lora = LoRAFile(state, metadata, "peft", tensors, magnitudes)
    else:
        tensors, metadata = read_lora_tensors(p)
        layout = foreign_layout(tensors)
        if layout is not None:
            lora = _read_foreign(tensors, metadata, namer, layout, {})
        else:
            lora = _read_format(tensors, metadata, namer)
    return lora


def check_factors(path: str | Path, state: Mapping[str, LoRAFactors]) -> None:
    """Every module's lora_up and lora_down of one rank and finite: a damaged or diverged file is named here,
    not met as a traceback or written on as if it were fine (sd-scripts users run check_lora_weights.py for it)."""
    ranks = [f"{n} (lora_down {tuple(f.down.shape)}, lora_up {tuple(f.up.shape)})" for n, f in state.items()
             if f.up.dim() < 2 or f.up.shape[1] != f.down.shape[0]]
    if ranks:
        raise UserError(f"{path}: lora_up and lora_down of {len(ranks)} modules have different ranks, e.g. "
                        f"{'; '.join(ranks[:3])}: the file is damaged or not a LoRA.")
    broken = [n for n, f in state.items() if not (math.isfinite(f.alpha) and bool(torch.isfinite(f.down).all())
                                                   and bool(torch.isfinite(f.up).all()))]
    if broken:
        raise UserError(f"{path}: {len(broken)} modules hold NaN/inf values (e.g. {', '.join(broken[:3])}); the "
                        "LoRA is broken (a run whose loss diverged, or an fp16 overflow): use an earlier file.")


def _read_format(tensors: dict[str, torch.Tensor], metadata: dict[str, str], namer: Namer | None) -> LoRAFile:
    """A file in one of lora_formats' FORMATS; kohya names diffusers writes are renamed to the trainer's."""
    fmt = detect_format(tensors)
    if namer is None:
        family = detect_family(tensors, metadata)[0]
        namer = Namer(FAMILIES[family or ("llm" if fmt == "peft" else "sd1")])
    magnitudes: Magnitudes = {}
    if fmt == "kohya":
        state, magnitudes = kohya_names(*read_kohya(tensors), namer)
    elif fmt == "diffusers":
        configs = configs_from_diffusers_metadata(metadata)
        state, magnitudes = read_lora_a_b(tensors, namer, "diffusers_prefix", configs)
    elif fmt == "comfyui":
        state = read_comfy(tensors, namer)
    else:
        state, magnitudes = read_lora_a_b(tensors, namer, "peft_prefix", {})
    return LoRAFile(state, metadata, fmt, tensors, magnitudes)


def read_peft_folder(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], dict]:
    """(tensors, metadata, adapter_config.json) of a PEFT adapter folder."""
    weights = next((folder / n for n in (PEFT_WEIGHTS, PEFT_WEIGHTS_BIN) if (folder / n).is_file()), None)
    if weights is None or not (folder / PEFT_CONFIG).is_file():
        raise UserError(f"{folder}: a PEFT adapter folder needs {PEFT_WEIGHTS} (or {PEFT_WEIGHTS_BIN}) and "
                        f"{PEFT_CONFIG}")  # fmt: skip
    try:
        config = json.loads((folder / PEFT_CONFIG).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{folder / PEFT_CONFIG}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise UserError(f"{folder / PEFT_CONFIG}: expected a JSON object (a LoraConfig)")
    from networks.peft_export import check_peft_folder

    check_peft_folder(folder)  # modules_to_save copies: said as such, not as an unexpected key
    return *read_lora_tensors(weights), config


def _read_foreign(tensors: dict[str, torch.Tensor], metadata: dict[str, str], namer: Namer | None, layout: str,
                  configs: dict[str, dict]) -> LoRAFile:  # fmt: skip
    """A file in another tool's layout (library/lora_foreign.py), read as the diffusers keys it stands for.

    ``configs``: component → LoraConfig (a PEFT folder's adapter_config.json); the alphas the file stores and the
    diffusers metadata are added to it.
    """
    renamed, alphas = to_diffusers(tensors)
    merged = configs_from_diffusers_metadata(metadata)
    for comp, cfg in [*configs.items(), *alphas.items()]:
        base = merged.setdefault(comp, {})
        patterns = {**(base.get("alpha_pattern") or {}), **(cfg.get("alpha_pattern") or {})}
        base.update(cfg)
        base["alpha_pattern"] = patterns
    if namer is None:
        namer = Namer(FAMILIES[detect_family(tensors, metadata)[0] or "sd1"])
    state, magnitudes = read_lora_a_b(renamed, namer, "diffusers_prefix", merged)
    return LoRAFile(state, metadata, layout, tensors, magnitudes)


def shape_metadata(metadata: Mapping[str, str], state: Mapping[str, LoRAFactors]) -> dict[str, str]:
    """``metadata`` with ``ss_network_dim`` / ``ss_network_alpha`` and ``ss_network_args``' conv_dim / conv_alpha
    as the modules of ``state`` are ("Dynamic" where modules differ).

    A tool that changes ranks or alphas (convert folding alpha into lora_up, ...) would otherwise pass on the
    numbers of the file it read, and a kohya loader that trusts them scales the LoRA wrongly. Keys the metadata
    lacks are not added: a file without ss_* keys stays without."""
    meta = dict(metadata)

    def one(values: set) -> str:
        return str(next(iter(values))) if len(values) == 1 else "Dynamic"

    linear = [f for f in state.values() if not f.is_kxk]
    convs = [f for f in state.values() if f.is_kxk]
    if linear and "ss_network_dim" in meta:
        meta["ss_network_dim"] = one({f.rank for f in linear})
    if linear and "ss_network_alpha" in meta:
        meta["ss_network_alpha"] = one({float(f.alpha) for f in linear})
    try:
        net_args = json.loads(meta["ss_network_args"]) if meta.get("ss_network_args") else None
    except json.JSONDecodeError:
        net_args = None  # not ours to repair; left as it was
    if isinstance(net_args, dict):
        for key in ("conv_dim", "conv_alpha"):
            net_args.pop(key, None)
        if convs:
            net_args["conv_dim"] = one({f.rank for f in convs})
            net_args["conv_alpha"] = one({float(f.alpha) for f in convs})
        meta["ss_network_args"] = json.dumps(net_args)
    return meta


def check_new_output(path: str, overwrite: bool) -> None:
    """Refuse to replace an existing output unless asked; the folder must exist."""
    if os.path.exists(path) and not overwrite:
        raise UserError(f"{path} already exists; pass --overwrite to replace it")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UserError(f"output folder {parent} does not exist")


def save_kohya_file(
    path: str, state: Mapping[str, LoRAFactors], metadata: Mapping[str, str] | None, dtype: torch.dtype | None,
    magnitudes: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Write a kohya file atomically; with metadata, the sshs hashes are recomputed for these tensors."""
    from library.fileio import atomic_save_safetensors
    from library.metadata import add_hashes

    tensors = write_kohya(state, dtype, magnitudes)
    meta = None
    if metadata is not None:
        clean = {k: v for k, v in metadata.items() if not k.startswith("sshs_")}
        meta = add_hashes(tensors, clean)
    atomic_save_safetensors(tensors, path, meta)
