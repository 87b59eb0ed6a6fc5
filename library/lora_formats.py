"""LoRA file formats as data: kohya ↔ diffusers ↔ PEFT ↔ ComfyUI key names, and one in-memory form.

Every format is read into a :data:`LoRAState` (kohya module name → :class:`LoRAFactors`) and
written from one. Module names differ only by a component prefix and a module path:

- kohya: ``lora_unet_<path, . as _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (tensor).
- diffusers: ``unet.<path>.lora_A.weight`` / ``.lora_B.weight``; alpha folded into B, or kept in the
  ``lora_adapter_metadata`` JSON (``unet.lora_alpha``, ``unet.alpha_pattern``) that diffusers reads.
- peft: a folder, ``base_model.model.<path>.lora_A.weight`` + adapter_config.json (``lora_alpha``,
  ``alpha_pattern``; with ``use_rslora`` the scale is alpha/√r).
- comfyui: ``diffusion_model.<original SD block path>.lora_up.weight`` / ``lora_down`` / ``alpha``,
  text encoders ``text_encoders.clip_l.transformer.text_model...``.

A family lists its components (UNet, text encoders, LLM) with each format's prefix; adding
SDXL or another model is a new table row. kohya names replace ``.`` by ``_``; reading them back
needs the real module paths (``--model``) or the vocabulary of module names below.
Reading files from disk (and which family a file is for) is library/lora_files.py.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

import torch

from library.errors import UserError
from networks import sgm_names
from networks.svd import LoRAFactors, relative_difference

LoRAState = dict[str, LoRAFactors]
Magnitudes = dict[str, torch.Tensor]  # DoRA: kohya module name → magnitude (one value per output row)
KOHYA_MAGNITUDE, PEFT_MAGNITUDES = "magnitude", ("lora_magnitude_vector", "lora_magnitude_vector.weight")
FORMATS = ("kohya", "diffusers", "peft", "comfyui")

# --- kohya names → module paths ----------------------------------------------------------

# Module names that contain "_" (joined back when a kohya name is split), then the plain ones
# that may appear; a part outside both is refused rather than guessed.
COMPOUND_NAMES = frozenset({
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
    "proj_in", "proj_out", "conv_shortcut", "time_emb_proj", "conv_in", "conv_out", "conv_norm_out",
    "time_embedding", "linear_1", "linear_2", "add_embedding", "input_blocks", "output_blocks",
    "middle_block", "in_layers", "out_layers", "emb_layers", "skip_connection", "time_embed", "label_emb",
    "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "text_projection",
    "final_layer_norm", "layer_norm1", "layer_norm2", "embed_tokens", "lm_head", "gate_proj", "up_proj",
    "down_proj", "o_proj", "qkv_proj", "gate_up_proj", "c_attn", "c_proj", "c_fc", "query_key_value",
    "dense_h_to_4h", "dense_4h_to_h", "w1", "w2", "w3", "cross_attn", "k_norm", "q_norm",
})  # fmt: skip
PLAIN_NAMES = frozenset({
    "attentions", "resnets", "attn1", "attn2", "ff", "net", "proj", "conv", "conv1", "conv2", "norm",
    "norm1", "norm2", "norm3", "downsamplers", "upsamplers", "op", "encoder", "layers", "mlp", "fc1", "fc2",
    "model", "transformer", "h", "attn", "dense", "layer", "attention", "self", "query", "key", "value",
    "output", "feed_forward", "experts", "gate", "decoder", "block",
})  # fmt: skip
_MAX_COMPOUND = 4


def split_kohya_path(mangled: str) -> str:
    """``down_blocks_0_attentions_0_proj_in`` → ``down_blocks.0.attentions.0.proj_in`` by the vocabulary."""
    tokens = mangled.split("_")
    parts: list[str] = []
    i = 0
    while i < len(tokens):
        for n in range(min(_MAX_COMPOUND, len(tokens) - i), 0, -1):
            word = "_".join(tokens[i : i + n])
            if n == 1 or word in COMPOUND_NAMES:
                break
        if not (word.isdigit() or word in COMPOUND_NAMES or word in PLAIN_NAMES):
            raise UserError(
                f"cannot tell the module path of kohya name part '{mangled}': '{word}' is not a known "
                "module name; pass --model (the model folder) so names are matched against its modules"
            )
        parts.append(word)
        i += n
    return ".".join(parts)


# --- UNet block numbering: diffusers ↔ original (LDM/SGM) names ---------------------------


@dataclass(frozen=True)
class UNetLayout:
    """Enough of a UNet config to renumber blocks: layers per level (each its own count), attention per level.

    The numbering itself is networks/sgm_names.py's, the one the trainer names SDXL keys with.
    """

    blocks: sgm_names.UNetLayout = sgm_names.UNetLayout(
        down_layers=(2, 2, 2, 2), down_attention=(True, True, True, False), up_attention=(False, True, True, True))

    @staticmethod
    def from_config(config: Mapping) -> UNetLayout:
        return UNetLayout(sgm_names.UNetLayout.from_config(config))

    def to_ldm(self, path: str) -> str:
        """A diffusers UNet module path in the original SD/SGM numbering (kohya SDXL, ComfyUI)."""
        try:
            return sgm_names.to_sgm(path, _block_table(self.blocks))
        except ValueError:
            return path  # outside the numbered blocks: the same name in both layouts

    def from_ldm(self, path: str) -> str:
        """The inverse of :meth:`to_ldm`."""
        return sgm_names.from_sgm(path, _block_table(self.blocks))


@functools.cache
def _block_table(blocks: sgm_names.UNetLayout) -> dict:
    return sgm_names.block_table(blocks)


SD1_LAYOUT = UNetLayout()
SDXL_LAYOUT = UNetLayout(sgm_names.SDXL_LAYOUT)


# --- families: components and their prefixes per format -----------------------------------


@dataclass(frozen=True)
class Component:
    """One model of a family. Paths are the in-memory module paths ("canonical")."""

    name: str  # "unet", "text_encoder", "model"
    kohya_prefix: str  # "lora_unet"
    diffusers_prefix: str | None  # "unet"; None where the format does not apply
    comfy_prefix: str | None  # "diffusion_model"
    peft_prefix: str | None = None  # "base_model.model"
    kohya_uses_ldm: bool = False  # kohya names use the original block numbering (SDXL UNet)
    comfy_uses_ldm: bool = False  # ComfyUI names do (every SD UNet)
    path_prefix: str = ""  # part of every canonical path, e.g. "text_model." for CLIP
    comfy_v2_prefix: str | None = None  # ComfyUI's name for this model in SD 2.x (its OpenCLIP-H text encoder)


@dataclass(frozen=True)
class Family:
    name: str
    components: tuple[Component, ...]
    layout: UNetLayout = field(default_factory=UNetLayout)


def _clip(name: str, kohya: str, diffusers: str, comfy: str) -> Component:
    return Component(name, kohya, diffusers, f"text_encoders.{comfy}.transformer", path_prefix="text_model.")


FAMILIES: dict[str, Family] = {
    "sd1": Family("sd1", (
        Component("unet", "lora_unet", "unet", "diffusion_model", comfy_uses_ldm=True),
        replace(_clip("text_encoder", "lora_te", "text_encoder", "clip_l"),
                comfy_v2_prefix="text_encoders.clip_h.transformer"),
    ), SD1_LAYOUT),
    "sdxl": Family("sdxl", (
        Component("unet", "lora_unet", "unet", "diffusion_model", kohya_uses_ldm=True, comfy_uses_ldm=True),
        _clip("text_encoder", "lora_te1", "text_encoder", "clip_l"),
        _clip("text_encoder_2", "lora_te2", "text_encoder_2", "clip_g"),
    ), SDXL_LAYOUT),
    # An LLM goes through networks.lora as its "unet" (CONTRACTS.md §5), hence lora_unet.
    "llm": Family("llm", (Component("model", "lora_unet", None, None, peft_prefix="base_model.model"),)),
}  # fmt: skip


@dataclass
class Namer:
    """kohya name ↔ (component, canonical path) for one family; ``module_paths`` makes it exact."""

    family: Family
    module_paths: Mapping[str, Iterable[str]] | None = None  # component name → its module paths

    def __post_init__(self) -> None:
        self._exact: dict[str, tuple[Component, str]] = {}
        for comp in self.family.components:
            for path in (self.module_paths or {}).get(comp.name, ()):
                canonical = comp.path_prefix + path if not path.startswith(comp.path_prefix) else path
                self._exact[self.kohya_name(comp, canonical)] = (comp, canonical)

    def kohya_name(self, comp: Component, path: str) -> str:
        kpath = self.family.layout.to_ldm(path) if comp.kohya_uses_ldm else path
        return f"{comp.kohya_prefix}_{kpath.replace('.', '_')}"

    def locate(self, kohya_name: str) -> tuple[Component, str]:
        if kohya_name in self._exact:
            return self._exact[kohya_name]
        if self.module_paths is not None and kohya_name.startswith(tuple(self._prefixes())):
            raise UserError(f"{kohya_name}: no such module in the given model (was the LoRA made for another one?)")
        for comp in sorted(self.family.components, key=lambda c: -len(c.kohya_prefix)):
            if kohya_name.startswith(comp.kohya_prefix + "_"):
                path = split_kohya_path(kohya_name[len(comp.kohya_prefix) + 1 :])
                return comp, self.family.layout.from_ldm(path) if comp.kohya_uses_ldm else path
        raise UserError(
            f"{kohya_name}: not a {self.family.name} module name (expected a prefix among "
            f"{', '.join(self._prefixes())}); check --family"
        )

    def _prefixes(self) -> list[str]:
        return [c.kohya_prefix + "_" for c in self.family.components]


# --- reading and writing ------------------------------------------------------------------


def read_kohya(sd: Mapping[str, torch.Tensor]) -> tuple[LoRAState, Magnitudes]:
    """kohya tensors → (state, DoRA magnitudes); a missing alpha means alpha = rank, as every kohya loader does."""
    names = sorted({k.split(".", 1)[0] for k in sd})
    state: LoRAState = {}
    magnitudes = {n: sd[f"{n}.{KOHYA_MAGNITUDE}"] for n in names if f"{n}.{KOHYA_MAGNITUDE}" in sd}
    for name in names:
        down, up = sd.get(f"{name}.lora_down.weight"), sd.get(f"{name}.lora_up.weight")
        if down is None or up is None:
            raise UserError(f"{name}: needs both lora_down.weight and lora_up.weight (a LyCORIS file?)")
        alpha = sd.get(f"{name}.alpha")
        state[name] = LoRAFactors(down, up, float(alpha) if alpha is not None else float(down.shape[0]))
    known = ("lora_down.weight", "lora_up.weight", "alpha", KOHYA_MAGNITUDE)
    extra = set(sd) - {f"{n}.{k}" for n in names for k in known}
    if extra:
        raise UserError(f"unexpected keys in a kohya LoRA: {sorted(extra)[:5]}{_unsupported(extra)}")
    return state, magnitudes


# Key fragments of LoRA variants no reader here maps exactly, and what they are.
_UNSUPPORTED = {".dora_scale": "LyCORIS / diffusers DoRA (dora_scale) is not supported; this toolkit's own DoRA "
                "files use 'magnitude'", ".lora_mid.": "Tucker-decomposed LoCon (lora_mid) is not supported",
                ".diff": "full weight differences (ComfyUI's LoraSave .diff / .diff_b) are not supported"}


def _unsupported(keys: Iterable[str]) -> str:
    """"; <what these keys are>" for keys of an unsupported variant, else ""."""
    keys = list(keys)
    why = next((text for fragment, text in _UNSUPPORTED.items() if any(fragment in k for k in keys)), "")
    return f"; {why}" if why else ""


def write_kohya(state: Mapping[str, LoRAFactors], dtype: torch.dtype | None = None,
                magnitudes: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    out: dict[str, torch.Tensor] = {}
    for name, f in state.items():
        out[f"{name}.lora_down.weight"] = _cast(f.down, dtype)
        out[f"{name}.lora_up.weight"] = _cast(f.up, dtype)
        out[f"{name}.alpha"] = torch.tensor(float(f.alpha), dtype=dtype or torch.float32)
        if magnitudes and name in magnitudes:
            out[f"{name}.{KOHYA_MAGNITUDE}"] = _cast(magnitudes[name], dtype)
    return out


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    out = (t if dtype is None else t.to(dtype)).detach().cpu().contiguous()
    if dtype is not None and out.is_floating_point() and not bool(torch.isfinite(out).all()) \
            and bool(torch.isfinite(t).all()):
        raise UserError(f"values up to {float(t.abs().max()):.3g} exceed the range of {str(dtype).split('.')[-1]} "
                        "(they would be saved as inf): use --save_precision bf16 or float")
    return out


def _pairs(sd: Mapping[str, torch.Tensor], a: str, b: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module key → (down, up) for keys ``<module>.<a>`` / ``<module>.<b>``; anything else is an error."""
    out: dict[str, list] = {}
    for key, value in sd.items():
        for slot, suffix in enumerate((a, b)):
            if key.endswith("." + suffix):
                out.setdefault(key[: -len(suffix) - 1], [None, None])[slot] = value
                break
        else:
            if not key.endswith(".alpha"):
                raise UserError(f"unexpected key {key} (expected *.{a} / *.{b}){_unsupported([key])}")
    broken = [k for k, v in out.items() if v[0] is None or v[1] is None]
    if broken:
        raise UserError(f"{len(broken)} modules lack one of {a} / {b}, e.g. {broken[0]}")
    return {k: (v[0], v[1]) for k, v in out.items()}


def _component_of(key: str, family: Family, attr: str) -> tuple[Component, str]:
    named = [(comp, getattr(comp, attr)) for comp in family.components]
    if attr == "comfy_prefix":  # ComfyUI names SD 2.x's text encoder differently
        named += [(comp, comp.comfy_v2_prefix) for comp in family.components]
    for comp, prefix in sorted(named, key=lambda c: -len(c[1] or "")):
        if prefix is not None and key.startswith(prefix + "."):
            return comp, key[len(prefix) + 1 :]
    known = [getattr(c, attr) for c in family.components if getattr(c, attr)]
    raise UserError(f"{key}: no {family.name} component has this prefix (known: {', '.join(known)})")


def _pattern_value(path: str, patterns: Mapping[str, float], default: float) -> float:
    # PEFT matches pattern keys as a regex on the end of the module path ("^" anchors the start).
    for key, value in patterns.items():
        anchored = key.startswith("^")
        if re.fullmatch(key.lstrip("^") if anchored else rf"(.*\.)?{key}", path):
            return float(value)
    return default


def read_lora_a_b(
    sd: Mapping[str, torch.Tensor], namer: Namer, prefix_attr: str, config: Mapping[str, Mapping]
) -> tuple[LoRAState, Magnitudes]:
    """diffusers / PEFT keys → (state, DoRA magnitudes); ``config`` maps a component name to its LoraConfig."""
    state: LoRAState = {}
    magnitudes: Magnitudes = {}
    found = {k.rsplit(".lora_magnitude_vector", 1)[0]: v for k, v in sd.items() if k.endswith(PEFT_MAGNITUDES)}
    rest = {k: v for k, v in sd.items() if not k.endswith(PEFT_MAGNITUDES)}
    for module, (down, up) in _pairs(rest, "lora_A.weight", "lora_B.weight").items():
        comp, path = _component_of(module, namer.family, prefix_attr)
        cfg = config.get(comp.name, {})
        rank = down.shape[0]
        local = path[len(comp.path_prefix) :] if path.startswith(comp.path_prefix) else path
        alpha = _pattern_value(local, cfg.get("alpha_pattern") or {}, float(cfg.get("lora_alpha") or rank))
        if cfg.get("use_rslora"):
            alpha = alpha * rank**0.5  # rsLoRA scales by alpha/√r; kohya always by alpha/r
        canonical = path if path.startswith(comp.path_prefix) else comp.path_prefix + path
        name = namer.kohya_name(comp, canonical)
        state[name] = LoRAFactors(down, up, alpha)
        if module in found:
            magnitudes[name] = found.pop(module)
    if found:
        raise UserError(f"DoRA magnitude vectors without lora_A / lora_B, e.g. {next(iter(found))}")
    return state, magnitudes


def write_lora_a_b(  # fmt: skip
    state: Mapping[str, LoRAFactors], namer: Namer, prefix_attr: str, fold_alpha: bool,
    dtype: torch.dtype | None = None, strip_path_prefix: bool = False,
    magnitudes: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """state → (tensors, component name → LoraConfig values). Folding puts alpha/r into lora_B.

    DoRA magnitudes become ``lora_magnitude_vector`` and ``use_dora: true``; folding is exact for
    DoRA too, since its norm uses the same scaled ``B A`` as the update.
    """
    tensors: dict[str, torch.Tensor] = {}
    by_comp: dict[str, list[tuple[str, LoRAFactors]]] = {}
    for name, f in state.items():
        comp, path = namer.locate(name)
        prefix = getattr(comp, prefix_attr)
        if prefix is None:
            raise UserError(f"{name}: the {comp.name} of {namer.family.name} has no {prefix_attr[:-7]} form")
        if strip_path_prefix and path.startswith(comp.path_prefix):
            path = path[len(comp.path_prefix) :]
        up = f.up.float() * f.scale if fold_alpha else f.up
        tensors[f"{prefix}.{path}.lora_A.weight"] = _cast(f.down, dtype)
        tensors[f"{prefix}.{path}.lora_B.weight"] = _cast(up, dtype)
        if magnitudes and name in magnitudes:
            tensors[f"{prefix}.{path}.{PEFT_MAGNITUDES[0]}"] = _cast(magnitudes[name], dtype)
        by_comp.setdefault(comp.name, []).append((path, f))
    configs = {c: _lora_config(items, fold_alpha) for c, items in by_comp.items()}
    for cfg in configs.values():
        cfg["use_dora"] = bool(magnitudes)
    return tensors, configs


def _lora_config(items: list[tuple[str, LoRAFactors]], fold_alpha: bool) -> dict:
    r = Counter(f.rank for _, f in items).most_common(1)[0][0]
    alphas = {p: (float(f.rank) if fold_alpha else f.alpha) for p, f in items}
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {
        "r": r, "lora_alpha": alpha, "target_modules": sorted(p for p, _ in items),
        "rank_pattern": {f"^{p}$": f.rank for p, f in items if f.rank != r},
        "alpha_pattern": {f"^{p}$": a for p, a in alphas.items() if a != alpha},
        "peft_type": "LORA", "bias": "none", "lora_dropout": 0.0, "use_rslora": False, "use_dora": False,
        "fan_in_fan_out": False, "init_lora_weights": True,
    }  # fmt: skip


def diffusers_metadata(configs: Mapping[str, dict]) -> dict[str, str]:
    """The ``lora_adapter_metadata`` entry diffusers' loaders read (keys ``<component>.<field>``)."""
    flat = {f"{comp}.{k}": v for comp, cfg in configs.items() for k, v in cfg.items()}
    return {"lora_adapter_metadata": json.dumps(flat, sort_keys=True)}


def configs_from_diffusers_metadata(metadata: Mapping[str, str] | None) -> dict[str, dict]:
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return {}
    configs: dict[str, dict] = {}
    for key, value in json.loads(raw).items():
        comp, _, fld = key.partition(".")
        configs.setdefault(comp, {})[fld] = value
    return configs


def read_comfy(sd: Mapping[str, torch.Tensor], namer: Namer) -> LoRAState:
    state: LoRAState = {}
    alphas = {k[: -len(".alpha")]: float(v) for k, v in sd.items() if k.endswith(".alpha")}
    for module, (down, up) in _pairs(sd, "lora_down.weight", "lora_up.weight").items():
        comp, path = _component_of(module, namer.family, "comfy_prefix")
        if comp.comfy_uses_ldm:
            path = namer.family.layout.from_ldm(path)
        state[namer.kohya_name(comp, path)] = LoRAFactors(down, up, alphas.get(module, float(down.shape[0])))
    return state


def write_comfy(state: Mapping[str, LoRAFactors], namer: Namer, dtype: torch.dtype | None = None,
                v2: bool = False) -> dict:
    """ComfyUI's names; ``v2``: an SD 2.x LoRA, whose text encoder ComfyUI calls ``clip_h`` (not ``clip_l``)."""
    out: dict[str, torch.Tensor] = {}
    for name, f in state.items():
        comp, path = namer.locate(name)
        prefix = comp.comfy_v2_prefix if v2 and comp.comfy_v2_prefix else comp.comfy_prefix
        if prefix is None:
            raise UserError(f"{name}: ComfyUI naming is not defined for the {namer.family.name} {comp.name}")
        key = f"{prefix}.{namer.family.layout.to_ldm(path) if comp.comfy_uses_ldm else path}"
        out[f"{key}.lora_down.weight"] = _cast(f.down, dtype)
        out[f"{key}.lora_up.weight"] = _cast(f.up, dtype)
        out[f"{key}.alpha"] = torch.tensor(float(f.alpha), dtype=dtype or torch.float32)
    return out


def detect_format(keys: Iterable[str]) -> str:
    """kohya, diffusers, peft or comfyui from a file's tensor names."""
    keys = list(keys)
    if not keys:
        raise UserError("the file holds no tensors")
    if all(k.startswith("lora_") for k in keys) and any(".lora_down." in k for k in keys):
        return "kohya"
    if any(k.startswith("base_model.model.") for k in keys):
        return "peft"
    if any(".lora_A." in k for k in keys):
        return "diffusers"
    if any(".lora_down." in k for k in keys):
        return "comfyui"
    raise UserError(f"unknown LoRA format (keys such as {keys[:3]}); {_what_it_looks_like(keys)}")


# Key fragments of files people mistake for (or bring as) LoRAs, and what to tell them.
_LOOKS_LIKE = (
    (("hada_w1_a", "hada_w2_a"), "this is a LyCORIS LoHa file, which is not supported"),
    (("lokr_w1",), "this is a LyCORIS LoKr file, which is not supported"),
    (("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.embedders."),
     "this looks like a model checkpoint, not a LoRA"),
    ((".resnets.0.conv1.weight", "model.layers.0.self_attn.q_proj.weight", "embed_tokens.weight"),
     "this looks like model weights, not a LoRA"),
)


def _what_it_looks_like(keys: list[str]) -> str:
    for fragments, what in _LOOKS_LIKE:
        if any(fragment in key for key in keys for fragment in fragments):
            return what
    return "expected kohya (lora_down / lora_up), diffusers / PEFT (lora_A / lora_B) or ComfyUI names"


def compare_states(source: Mapping[str, LoRAFactors], result: Mapping[str, LoRAFactors], rtol: float = 1e-5) -> float:
    """Check that both hold the same modules with the same ΔW (relative Frobenius ``rtol``); the worst error.

    Raises a UserError naming the dropped, added or differing modules: a conversion that loads
    "without error but with no effect" is exactly what this refuses.
    """
    dropped, added = sorted(set(source) - set(result)), sorted(set(result) - set(source))
    if dropped or added:
        raise UserError(
            f"conversion check failed: {len(dropped)} modules dropped {dropped[:5]}, {len(added)} added {added[:5]}"
        )
    worst = 0.0
    bad = []
    for name, f in source.items():
        err = relative_difference(result[name].delta(), f.delta())
        if not math.isfinite(err):  # NaN compares as "not above rtol": a broken ΔW must not pass as verified
            bad.append(f"{name} (not finite)")
            continue
        worst = max(worst, err)
        if err > rtol:
            bad.append(f"{name} ({err:.2e})")
    if bad:
        raise UserError(f"conversion check failed: ΔW differs by more than {rtol:g} in {len(bad)} modules: {bad[:5]}")
    return worst
