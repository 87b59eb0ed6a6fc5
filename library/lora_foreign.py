"""LoRA layouts other tools write, brought to the names library/lora_formats.py reads.

Key names only, as data and small rewrites; no reading of files (library/lora_files.py does that):

- PEFT on a diffusers UNet (peft ``save_pretrained`` / ``get_peft_model_state_dict`` of a
  ``UNet2DConditionModel``): ``base_model.model.down_blocks...lora_A.weight``, or the same without a
  prefix, is the diffusers key ``unet.down_blocks...lora_A.weight``.
- Old diffusers (≤ 0.20, ``pytorch_lora_weights.*`` from ``save_attn_procs`` / ``save_lora_weights``):
  ``[unet.]<attention>.processor.to_q_lora.down.weight`` is ``unet.<attention>.to_q.lora_A.weight``
  (``to_out_lora`` is ``to_out.0``), ``<module>.lora.down.weight`` and
  ``<module>.lora_linear_layer.down.weight`` are ``<module>.lora_A.weight``; in a text encoder
  ``to_q_lora`` is ``q_proj`` and ``to_out_lora`` ``out_proj``. Without an alpha, alpha = rank.
- diffusers' kohya output (``diffusers.utils.convert_state_dict_to_kohya``): ``lora_te1_`` for the
  one text encoder of SD 1.x/2.x (kohya: ``lora_te_``), and diffusers block names under
  ``lora_unet_`` for SDXL (kohya: the SGM names ``input_blocks_...``). :func:`kohya_names` renames
  such modules to what networks.lora writes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

from library.errors import UserError
from library.lora_formats import LoRAState, Magnitudes, Namer, split_kohya_path

# The top-level modules of a diffusers UNet2DConditionModel: a key starting with one of them is a UNet's.
UNET_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in.", "conv_out.", "conv_norm_out.",
              "time_embedding.", "add_embedding.")  # fmt: skip
PEFT_PREFIX = "base_model.model."
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector", ".lora_magnitude_vector.weight")

# Old diffusers attention processors: one LoRA per projection, named after the processor's slot.
_PROCESSOR = re.compile(
    r"(?P<module>.+?)(?:\.processor)?\.(?P<slot>to_q|to_k|to_v|to_out)_lora\.(?P<part>down|up|alpha)")
_UNET_SLOTS = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_TEXT_SLOTS = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
# Old diffusers LoRACompatibleLinear / LoRACompatibleConv (.lora) and text-encoder patches (.lora_linear_layer).
_WRAPPED = re.compile(r"(?P<module>.+)\.(?:lora|lora_linear_layer)\.(?P<part>down|up|alpha)")
_PART = {"down": "lora_A.weight", "up": "lora_B.weight", "alpha": "alpha"}


def _is_text_encoder(key: str) -> bool:
    return key.startswith(("text_encoder.", "text_encoder_2.", "text_model."))


def _old_diffusers_key(key: str) -> str | None:
    """The current diffusers key of an old-layout key, or None when ``key`` is not one."""
    stem = key.removesuffix(".weight")
    m = _PROCESSOR.fullmatch(stem)
    if m is not None:
        slots = _TEXT_SLOTS if _is_text_encoder(key) else _UNET_SLOTS
        return f"{m['module']}.{slots[m['slot']]}.{_PART[m['part']]}"
    m = _WRAPPED.fullmatch(stem)
    if m is not None:
        return f"{m['module']}.{_PART[m['part']]}"
    return None


def diffusers_key(key: str) -> str:
    """``key`` in diffusers' current naming (``unet.<path>.lora_A.weight``) if it is in one of the layouts above;
    any other key (kohya, ComfyUI, an LLM's PEFT keys, diffusers' own) comes back unchanged."""
    new = _old_diffusers_key(key)
    is_old = new is not None
    new = new or key
    if not (is_old or new.endswith(LORA_SUFFIXES)):
        return key
    bare = new.removeprefix(PEFT_PREFIX)
    if bare.startswith(UNET_ROOTS):
        return "unet." + bare  # a UNet's adapter (PEFT, or diffusers before it added the "unet." prefix)
    if bare.startswith("text_model.") and is_old:
        return "text_encoder." + bare  # old diffusers saved a lone text encoder's LoRA without a prefix
    return new


def foreign_layout(keys: Iterable[str]) -> str | None:
    """The name of the layout above that ``keys`` use ("diffusers-old", "peft" for a UNet's PEFT keys, "diffusers"
    for a UNet's bare keys), or None when they are in a format lora_formats reads as it is."""
    keys = list(keys)
    if any(_old_diffusers_key(k) is not None for k in keys):
        return "diffusers-old"
    renamed = [k for k in keys if diffusers_key(k) != k]
    if not renamed:
        return None
    return "peft" if renamed[0].startswith(PEFT_PREFIX) else "diffusers"


def to_diffusers(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """(tensors under diffusers keys, component → LoraConfig values holding the alphas the file stores).

    The alphas go into an ``alpha_pattern`` of exact module paths, which lora_formats.read_lora_a_b reads; a module
    without one keeps alpha = rank (old diffusers files store none: the scale is 1).
    """
    out: dict[str, torch.Tensor] = {}
    configs: dict[str, dict] = {}
    for key, value in sd.items():
        new = diffusers_key(key)
        if new.endswith(".alpha") and new != key:
            component, _, path = new[: -len(".alpha")].partition(".")
            local = path.removeprefix("text_model.")  # read_lora_a_b matches patterns without a CLIP's prefix
            patterns = configs.setdefault(component, {}).setdefault("alpha_pattern", {})
            patterns["^" + re.escape(local) + "$"] = float(value)
            continue
        out[new] = value
    return out, configs


def is_unet_adapter(keys: Iterable[str], config: Mapping | None = None) -> bool:
    """A PEFT adapter of a diffusers UNet: its modules are UNet blocks, or its config names the UNet class."""
    if any(k.startswith(PEFT_PREFIX) and k[len(PEFT_PREFIX) :].startswith(UNET_ROOTS) for k in keys):
        return True
    base_class = ((config or {}).get("auto_mapping") or {}).get("base_model_class") or ""
    return base_class.startswith("UNet2DConditionModel")


# --- diffusers' kohya output ---------------------------------------------------------------

_DIFFUSERS_UNET_NAMES = tuple(root.rstrip(".") for root in UNET_ROOTS)


def _is_diffusers_unet(name: str) -> bool:
    """A kohya UNet module name in diffusers' block names (``lora_unet_down_blocks_...``, ``lora_unet_conv_in``)."""
    rest = name.removeprefix("lora_unet_")
    return rest != name and any(rest == r or rest.startswith(r + "_") for r in _DIFFUSERS_UNET_NAMES)


def kohya_names(state: LoRAState, magnitudes: Magnitudes, namer: Namer) -> tuple[LoRAState, Magnitudes]:
    """Module names of diffusers' kohya output renamed to networks.lora's for ``namer``'s family.

    SD 1.x/2.x: ``lora_te1_`` → ``lora_te_`` (a file with ``lora_te2_`` is SDXL's and is left to fail by name).
    SDXL: ``lora_unet_down_blocks_...`` → ``lora_unet_input_blocks_...`` by the family's block numbering, when
    every UNet module is so named.
    Text encoders: ``lora_te1_encoder_layers_...`` (diffusers under transformers 5, whose CLIPTextModel has no
    ``text_model`` level) → ``lora_te1_text_model_encoder_layers_...``, as every kohya file names it.
    Other families' and kohya's own names are unchanged.
    """
    names = list(state)
    family = namer.family.name
    te1_is_te = family == "sd1" and not any(n.startswith(("lora_te_", "lora_te2_")) for n in names)
    unet = next((c for c in namer.family.components if c.name == "unet"), None)
    # only a file whose UNet names are all diffusers' (as convert_state_dict_to_kohya writes them): a diffusers
    # name among SGM ones is a module of another model, left for the tools to refuse by name
    unet_names = [n for n in names if n.startswith("lora_unet_")]
    to_sgm = (family == "sdxl" and unet is not None and unet.kohya_uses_ldm and bool(unet_names)
              and all(_is_diffusers_unet(n) for n in unet_names))

    def rename(name: str) -> str:
        if te1_is_te and name.startswith("lora_te1_"):
            name = "lora_te_" + name[len("lora_te1_") :]
        prefix, rest = _te_split(name)
        if prefix and rest.startswith("encoder_layers_"):
            name = f"{prefix}text_model_{rest}"
        if to_sgm and _is_diffusers_unet(name):
            name = namer.kohya_name(unet, split_kohya_path(name[len("lora_unet_") :]))
        return name

    renamed = {rename(n): f for n, f in state.items()}
    if len(renamed) != len(state):
        twice = sorted(n for n in state if rename(n) != n and rename(n) in state)
        raise UserError(f"modules {twice[:3]} are also stored under their kohya names; a LoRA names each module once")
    return renamed, {rename(n): m for n, m in magnitudes.items()}


def _te_split(name: str) -> tuple[str, str]:
    """("lora_te1_", the rest) for a text-encoder module name, ("", name) for others."""
    for prefix in ("lora_te_", "lora_te1_", "lora_te2_"):
        if name.startswith(prefix):
            return prefix, name[len(prefix) :]
    return "", name
