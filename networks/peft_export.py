"""The PEFT adapter folder (KOHYA_COMPAT.md §5), written from and read back into our LoRA networks.

A folder ``{output_dir}/{output_name}/`` holds

- ``adapter_model.safetensors``: ``base_model.model.<module path>.lora_A.weight`` (= our
  ``lora_down``, ``(r, in)``), ``.lora_B.weight`` (= ``lora_up``, ``(out, r)``) and, for DoRA,
  ``.lora_magnitude_vector`` (``(out,)``);
- ``adapter_config.json``: ``r``, ``lora_alpha`` (alpha is kept, not folded into the weights),
  ``target_modules``, ``rank_pattern`` / ``alpha_pattern`` for modules that differ from the most
  common rank / alpha, ``use_rslora``, ``use_dora``, ``task_type`` ``CAUSAL_LM``, ``base_model_name_or_path``,
  and ``fan_in_fan_out: true`` when the adapted layers are transformers' ``Conv1D`` (GPT-2 style), as PEFT
  itself writes for them: the A/B tensors keep Linear's orientation either way (networks/conv1d.py), the flag
  only tells PEFT that the base weight is stored ``(in, out)``.

``peft.PeftModel.from_pretrained(model, folder)`` then computes what our network computes:
``y = W x + (lora_alpha / r) · B A x`` (``lora_alpha / sqrt(r)`` with rsLoRA). PEFT is only a consumer
here; nothing in this file imports it.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from library.errors import UserError
from networks.conv1d import is_conv1d
from networks.lora_variants import rslora_alpha, user_alpha

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."


def _module_paths(model: nn.Module, network: nn.Module) -> dict[str, Any]:
    """lora_name → (module path in ``model``, LoRA module); every LoRA must sit inside ``model``."""
    paths = {id(module): path for path, module in model.named_modules()}
    out = {}
    for lora in network.all_loras():
        path = paths.get(id(lora.org_module))
        if path is None:
            raise UserError(f"{lora.lora_name} does not adapt a module of the model being saved; a PEFT adapter "
                            "holds the LoRAs of one model only.")
        out[lora.lora_name] = (path, lora)
    return out


def peft_state_dict(network: nn.Module, model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT's key names (on the CPU, contiguous, in ``dtype`` when given)."""
    out: dict[str, torch.Tensor] = {}

    def put(key: str, value: torch.Tensor) -> None:
        value = value.detach().to("cpu")
        out[key] = (value if dtype is None else value.to(dtype)).contiguous()

    for path, lora in _module_paths(model, network).values():
        if lora.is_conv:
            raise UserError(f"{lora.lora_name}: conv LoRAs are not written to PEFT adapters; leave out conv_dim.")
        put(f"{PEFT_PREFIX}{path}.lora_A.weight", lora.lora_down.weight)
        put(f"{PEFT_PREFIX}{path}.lora_B.weight", lora.lora_up.weight)
        if hasattr(lora, "magnitude"):
            put(f"{PEFT_PREFIX}{path}.lora_magnitude_vector", lora.magnitude)
    return out


def _target_modules(model: nn.Module, paths: list[str]) -> list[str]:
    """Leaf names (``q_proj``, ...) when they select exactly ``paths`` under PEFT's suffix rule, else full paths."""
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    selected = {p for p, _ in model.named_modules() if p and p.rsplit(".", 1)[-1] in leaves}
    return leaves if selected == set(paths) else sorted(paths)


def adapter_config(network: nn.Module, model: nn.Module, base_model_name_or_path: str) -> dict[str, Any]:
    """``adapter_config.json`` for ``network`` applied to ``model``."""
    use_rslora = bool(getattr(network, "use_rslora", False))
    modules = _module_paths(model, network).values()
    ranks = {path: lora.lora_dim for path, lora in modules}
    alphas = {path: user_alpha(float(lora.alpha), lora.lora_dim, use_rslora) for path, lora in modules}
    if not ranks:
        raise UserError("the network has no LoRA modules; there is nothing to save.")
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    dropout = getattr(network, "dropout", None) or 0.0
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "target_modules": _target_modules(model, list(ranks)),
        "rank_pattern": {p: d for p, d in ranks.items() if d != r},
        "alpha_pattern": {p: a for p, a in alphas.items() if a != alpha},
        "use_rslora": use_rslora,
        "use_dora": bool(getattr(network, "use_dora", False)),
        "lora_dropout": dropout,
        "bias": "none",
        "fan_in_fan_out": any(is_conv1d(lora.org_module) for _, lora in modules),
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }


@contextmanager
def _atomic_folder(folder: Path) -> Iterator[Path]:
    """Yield a temporary folder next to ``folder``; on success it replaces ``folder`` (old one removed)."""
    tmp = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir(parents=True)
    try:
        yield tmp
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}.old")
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_peft_adapter(network: nn.Module, model: nn.Module, folder: str | os.PathLike,
                       base_model_name_or_path: str, dtype: torch.dtype | None = None,
                       extra_files: Callable[[dict[str, Any]], dict[str, str]] | None = None) -> Path:
    """Write the adapter folder atomically (a killed save leaves the previous folder intact); returns it.

    ``extra_files`` maps the adapter config to more text files of the folder (name → text): a model card,
    the dataset's chat template.
    """
    from safetensors.torch import save_file

    from library.fileio import atomic_path

    folder = Path(folder)
    tensors = peft_state_dict(network, model, dtype)
    config = adapter_config(network, model, base_model_name_or_path)
    with _atomic_folder(folder) as tmp:
        # atomic_path gives the weights the umask's permissions (save_file creates its files 0600), as the
        # kohya file and the text files beside them get.
        with atomic_path(tmp / ADAPTER_WEIGHTS) as weights:
            save_file(tensors, str(weights), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        for name, text in (extra_files(config) if extra_files else {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
    return folder


def _saved_module(key: str) -> str | None:
    """The module a ``modules_to_save`` tensor key copies (``lm_head``), else None (a LoRA key, or foreign)."""
    if not key.startswith(PEFT_PREFIX) or ".lora_" in key:
        return None
    path = key[len(PEFT_PREFIX):]
    if ".modules_to_save." in path:  # the in-memory name; save_pretrained strips ".modules_to_save.<adapter>"
        return path.split(".modules_to_save.", 1)[0]
    module, _, leaf = path.rpartition(".")
    return module if module and leaf in ("weight", "bias") else None


def refuse_modules_to_save(where: str | os.PathLike, config: Mapping[str, Any], keys: Iterable[str]) -> None:
    """A UserError naming ``where`` when the adapter holds ``modules_to_save`` copies (full layers, not LoRAs).

    TRL's / axolotl's ``lora_modules_to_save`` (``lm_head`` / ``embed_tokens`` after adding tokens) store whole
    layers beside the LoRA factors (``base_model.model.lm_head.weight``); our networks hold LoRAs only.
    """
    keys = list(keys)
    biases = [key for key in keys if key.endswith(".bias")]
    if biases and config.get("bias", "none") != "none":  # a trained bias is saved as base_layer.bias, not a copy
        raise UserError(f"{where}: this PEFT adapter trains biases (LoraConfig bias=\"{config['bias']}\", e.g. "
                        f"{biases[0]}), which a kohya LoRA (and this toolkit) cannot hold; merge it with peft "
                        "(merge_and_unload) or train it with bias=\"none\".")
    modules = sorted({m for m in map(_saved_module, keys) if m})
    if not modules:
        return
    listed = config.get("modules_to_save") or sorted({m.rsplit(".", 1)[-1] for m in modules})
    shown = ", ".join(modules[:3]) + (f", ... ({len(modules)} in all)" if len(modules) > 3 else "")
    raise UserError(
        f"{where}: this PEFT adapter holds full copies of layers ({shown}; modules_to_save = {list(listed)} in its "
        f"{ADAPTER_CONFIG}), as TRL's / axolotl's lora_modules_to_save write them (lm_head / embed_tokens after "
        "adding tokens, for instance). modules_to_save is not supported by this toolkit's LoRA, which holds LoRA "
        "A/B factors and DoRA magnitudes only. Train the adapter without modules_to_save, or merge it into the "
        "base model with peft first (PeftModel.from_pretrained(model, folder).merge_and_unload().save_pretrained"
        "(...)) and use the merged model as the base model."
    )


def peft_tensor_keys(weights: str | os.PathLike) -> list[str]:
    """The tensor names of a ``.safetensors`` file, without reading the tensors."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        return list(f.keys())


def check_peft_folder(folder: str | os.PathLike) -> None:
    """Refuse a PEFT folder (or its weight file) with ``modules_to_save`` copies before the tools read it.

    Reads ``adapter_config.json`` and the weight file's key names only; a folder that is not a readable
    PEFT adapter is left to the reader's own errors.
    """
    folder = Path(folder)
    if folder.name == ADAPTER_WEIGHTS and folder.is_file():
        folder = folder.parent
    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not folder.is_dir() or not config_path.is_file() or not weights_path.is_file():
        return
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        keys = peft_tensor_keys(weights_path)
    except Exception:  # noqa: BLE001 - the reader reports unreadable files with its own message
        return
    refuse_modules_to_save(weights_path, config if isinstance(config, dict) else {}, keys)


def read_peft_adapter(folder: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config, tensors) of a PEFT LoRA folder; anything else is a UserError naming the folder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        raise UserError(f"{folder} is not a PEFT adapter folder: expected {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}.")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{config_path}: not valid JSON ({e})") from None
    if config.get("peft_type") != "LORA":
        raise UserError(f"{config_path}: peft_type is {config.get('peft_type')!r}; only LoRA adapters are read.")
    tensors = load_file(str(weights_path))
    refuse_modules_to_save(weights_path, config, list(tensors))
    return config, tensors


def load_network_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Our kohya-style state dict from a LoRA ``.safetensors`` file or a PEFT adapter folder.

    A PEFT folder is what LLM training writes (``{output_dir}/{output_name}/``) and what other PEFT-based
    trainers write, so ``--network_weights`` takes it as it is; ``adapter_model.safetensors`` given as a file
    is read with the ``adapter_config.json`` beside it (its alpha lives there, not in the tensors).
    """
    from library.fileio import load_safetensors

    path = Path(path)
    if path.is_file() and path.name == ADAPTER_WEIGHTS and (path.parent / ADAPTER_CONFIG).is_file():
        path = path.parent
    if path.is_dir():
        if not (path / ADAPTER_CONFIG).is_file():
            raise UserError(f"{path} is a folder without {ADAPTER_CONFIG}: give a LoRA .safetensors file or a "
                            f"PEFT adapter folder ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}).")
        return peft_to_kohya(*read_peft_adapter(path))
    return load_safetensors(path, "LoRA weights")


def _pattern_value(path: str, pattern: Mapping[str, Any], default: Any) -> Any:
    for key, value in pattern.items():  # PEFT's rule: the path equals the key or ends with "." + key
        if path == key or path.endswith("." + key):
            return value
    return default


def peft_to_kohya(config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                  prefix: str = "lora_unet") -> dict[str, torch.Tensor]:
    """A PEFT adapter as our kohya-style state dict (``lora_down`` / ``lora_up`` / ``alpha`` / ``magnitude``).

    rsLoRA's ``alpha / sqrt(r)`` is stored as ``alpha · sqrt(r)`` (see networks/lora_variants.py), so the
    result loads into ``create_network_from_weights`` with the same outputs.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise UserError(f"unexpected key {key} in a PEFT adapter (expected {PEFT_PREFIX}...).")
        path, _, kind = key[len(PEFT_PREFIX):].partition(".lora_")
        name = f"{prefix}_{path.replace('.', '_')}"
        if kind == "A.weight":
            r = value.shape[0]
            alpha = float(_pattern_value(path, config.get("alpha_pattern") or {}, config["lora_alpha"]))
            out[f"{name}.lora_down.weight"] = value
            out[f"{name}.alpha"] = torch.tensor(rslora_alpha(alpha, r) if config.get("use_rslora") else alpha)
        elif kind == "B.weight":
            out[f"{name}.lora_up.weight"] = value
        elif kind == "magnitude_vector":
            out[f"{name}.magnitude"] = value
        elif kind == "B.bias" or key.endswith(".bias"):  # LoraConfig(bias="lora_only" / "all")
            bias = config.get("bias", "all")
            raise UserError(f"{key}: this PEFT adapter trains biases (LoraConfig bias=\"{bias}\"), "
                            "which a kohya LoRA (and this toolkit) cannot hold; merge it with peft "
                            "(merge_and_unload) or train it with bias=\"none\".")
        else:
            raise UserError(f"unexpected key {key} in a PEFT adapter (only LoRA A/B and DoRA magnitudes are read).")
    return out
