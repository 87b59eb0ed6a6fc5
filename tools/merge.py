"""Merge LoRAs: bake them into a base model, or combine several into one LoRA.

    # bake into a model (an SD 1.x/2.x or SDXL diffusers folder in, a diffusers folder with safetensors out)
    python tools/merge.py --sd_model sd15/ --models style.safetensors char.safetensors --ratios 0.8 0.5 \\
        --save_to sd15_merged/
    # one LoRA from several: exact (ranks stacked), or SVD to a rank
    python tools/merge.py --models a.safetensors b.safetensors --ratios 1 0.5 --save_to ab.safetensors
    python tools/merge.py --models a.safetensors b.safetensors --ratios 1 0.5 --new_rank 16 --save_to ab16.safetensors

Baking adds ``ratio · (alpha/r) · up ⊗ down`` to each adapted weight, computed in float32; a
DoRA module then rescales each output row to its magnitude, ``W' = m · (W + ΔW) / ‖W + ΔW‖_row``,
which is exactly the trainer's DoRA forward (files are baked in the order given);
SDXL LoRAs name the UNet with the original SGM blocks and the encoders ``lora_te1_`` /
``lora_te2_``, as networks.lora writes them (diffusers and ComfyUI files are read too). Every
module of every file must exist in the model: a file for another architecture is an error, not
a silent no-op. LoRAs for different families (SD 1.x/2.x, SDXL, LLM) or declared base models
are never combined (library/lora_files.py's detect_family, from the keys and metadata).
Combining LoRAs never averages up and down matrices separately
(which is not the sum of the deltas): without --new_rank the ranks are concatenated, so the
result's ΔW is exactly Σ ratio_i · ΔW_i (checked before saving); with --new_rank each
module's sum is re-factorised by SVD and the retained energy is reported. DoRA files can be
baked into a model but not combined into one LoRA (no ΔW holds the row rescaling).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from library.diffusion_models import every_layer, load_pipeline, lora_namer, pipeline_text_encoders  # noqa: E402
from library.errors import UserError  # noqa: E402
from library.lora_files import (  # noqa: E402
    PRECISIONS,
    check_new_output,
    check_same_family,
    load_lora,
    save_kohya_file,
)
from library.lora_formats import FAMILIES, LoRAState, Magnitudes, Namer  # noqa: E402
from library.tool_compat import MERGE_ARGS, add_tool_args, apply_tool_args  # noqa: E402
from networks.conv1d import is_linear_like, linear_weight  # noqa: E402
from networks.functional import merged_weight  # noqa: E402
from networks.svd import LoRAFactors, concatenate, refactorize, relative_difference  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", required=True,
                   help="LoRA files or PEFT folders (kohya, diffusers, PEFT or ComfyUI naming; .safetensors, "
                        ".ckpt/.pt/.bin)")
    p.add_argument("--ratios", nargs="+", type=float, default=None, help="one multiplier per file (default 1.0 each)")
    p.add_argument("--sd_model", default=None,
                   help="bake into this SD 1.x/2.x or SDXL model (a diffusers folder or a single-file .safetensors "
                        "checkpoint); omit to merge LoRAs")
    p.add_argument("--model_config_dir", default=None,
                   help="single-file --sd_model of a non-standard architecture: a diffusers folder holding its "
                        "configs (as the trainer's --model_config_dir)")
    p.add_argument("--llm_model", default=None,
                   help="bake into this causal LM (transformers folder) and write a full model folder")
    p.add_argument("--save_to", required=True,
                   help="output: with --sd_model a diffusers folder, or a .safetensors single-file checkpoint (what "
                        "A1111 / Forge / ComfyUI load; always for a single-file --sd_model); else a .safetensors LoRA")
    p.add_argument("--save_precision", choices=sorted(PRECISIONS), default=None,
                   help="dtype of the output (default: the model's as stored / the first LoRA's)")  # fmt: skip
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="float",
                   help="dtype the deltas are computed in (default float)")  # fmt: skip
    p.add_argument("--family", choices=sorted(FAMILIES), default=None,
                   help="LoRA merge: model family of the files (default: detected from the key names and "
                        "ss_base_model_version / modelspec.architecture, sd1 if undecided); with --sd_model / "
                        "--llm_model the model decides")  # fmt: skip
    p.add_argument("--new_rank", type=int, default=None, help="LoRA merge: SVD to this rank instead of concatenating")
    p.add_argument("--new_conv_rank", type=int, default=None, help="rank of 3x3 conv modules (default: --new_rank)")
    p.add_argument("--concat", action="store_true", help="accepted for sd-scripts compatibility: the default here")
    p.add_argument("--device", default="cpu", help="device for the merge arithmetic, e.g. cuda")
    p.add_argument("--no_metadata", action="store_true",
                   help="merged LoRA: write only the minimal ss_* keys (no comment, no modelspec.*), as sd-scripts")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --save_to")
    add_tool_args(p, MERGE_ARGS)
    return p


def ratios_for(args: argparse.Namespace) -> list[float]:
    ratios = args.ratios if args.ratios is not None else [1.0] * len(args.models)
    if len(ratios) != len(args.models):
        raise UserError(f"{len(args.models)} --models but {len(ratios)} --ratios; give one ratio per file")
    return ratios


# --- baking into a model ----------------------------------------------------------------------


@torch.no_grad()
def bake(modules: dict[str, torch.nn.Module], state: LoRAState, ratio: float, source: str, device: str,
         dtype: torch.dtype, magnitudes: Magnitudes | None = None) -> int:  # fmt: skip
    """Add each module's ΔW to its weight; a DoRA module's rows are then rescaled to its magnitude."""
    missing = sorted(set(state) - set(modules))
    if missing:
        raise UserError(f"{source}: {len(missing)} modules are not in the model, e.g. {missing[:3]}; "
                        "was this LoRA made for another model?")  # fmt: skip
    shapes = {name: (tuple(linear_weight(modules[name]).shape), (f.up.shape[0], *f.down.shape[1:]))
              for name, f in state.items()}
    wrong = [(name, model, lora) for name, (model, lora) in shapes.items() if model != lora]
    if wrong:  # e.g. an SD 1.x LoRA into an SD 2.x model: the same names, other widths
        name, model_shape, lora_shape = wrong[0]
        show = "x".join
        raise UserError(f"{source}: {len(wrong)} modules do not fit the model's layers, e.g. {name}: the LoRA "
                        f"changes a {show(map(str, lora_shape))} weight, the model's is {show(map(str, model_shape))}"
                        "; was this LoRA made for another model (SD 1.x vs 2.x)?")
    for name, f in state.items():
        weight = linear_weight(modules[name])  # a Conv1D's (in, out) weight as a transposed view: copy_ writes it
        merged = merged_weight(weight.to(device, dtype), f.down.to(device, dtype), f.up.to(device, dtype),
                               f.scale, ratio)  # fmt: skip
        if magnitudes and name in magnitudes:
            merged = dora_rescale(merged, magnitudes[name].to(device), name, source)
        weight.copy_(merged.to(weight.device, weight.dtype))
    return len(state)


def dora_rescale(merged: torch.Tensor, magnitude: torch.Tensor, name: str, source: str) -> torch.Tensor:
    """``m · W' / ‖W'‖_row`` in float32: networks/lora_variants.py's DoRA forward as one weight.

    The trainer computes ``m / ‖W + s·BA‖_row · (W x + s·B A x)``; a ratio scales s, as its
    multiplier does, and the norm is taken of the weight being baked into.
    """
    if merged.dim() != 2 or magnitude.shape != merged.shape[:1]:
        raise UserError(f"{source}: {name}: DoRA magnitude of shape {tuple(magnitude.shape)} does not fit "
                        f"the weight {tuple(merged.shape)} (DoRA is defined for Linear layers)")  # fmt: skip
    full = merged.float()
    return full * (magnitude.float() / torch.linalg.norm(full, dim=1)).unsqueeze(1)


def save_folder_atomically(pipe, target: Path, overwrite: bool) -> None:
    """save_pretrained into a hidden sibling folder, then rename it into place."""
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        if target.exists():
            if not overwrite:
                raise UserError(f"{target} already exists; pass --overwrite to replace it")
            old = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.old")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_single_file_parts(path: Path, model_config_dir: str | None) -> tuple[Any, Any, list[Any], bool, bool]:
    """(unet, vae, text encoders, is SD 2.x, v-prediction) of a single-file checkpoint, read as the trainer reads
    it (library/single_file.py) but without tokenizers, which baking does not need."""
    from library import single_file as sf

    state = sf.read_checkpoint(path)
    kind = sf.detect_kind(state, state.__getitem__, str(path))
    configs = sf.config_folder(kind, model_config_dir)
    v_prediction, _ = sf.detect_v_prediction(kind, state, state.__getitem__)
    encoders = [sf.load_text_encoder(state, prefix, style, configs, sub) for prefix, style, sub in kind.text_encoders]
    unet = sf.load_unet(state, configs)
    vae = sf.load_vae({k[len(sf.VAE):]: v for k, v in state.items() if k.startswith(sf.VAE)}, configs, str(path))
    return unet, vae, encoders, kind.name == "sd_v2", v_prediction


def save_single_file_atomically(target: Path, overwrite: bool, unet: Any, vae: Any, encoders: list[Any], v2: bool,
                                v_prediction: bool, dtype: torch.dtype | None) -> None:
    """The merged model as one original-layout checkpoint, written next to ``target`` and renamed into place."""
    from library.single_file import save_original

    if target.exists() and not overwrite:
        raise UserError(f"{target} already exists; pass --overwrite to replace it")
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        save_original(tmp, unet, vae, encoders, v2=v2, v_prediction=v_prediction, dtype=dtype)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def merge_into_model(args: argparse.Namespace, ratios: list[float]) -> None:
    if args.new_rank is not None:
        raise UserError("--new_rank applies to merging LoRAs; leave it out with --sd_model")
    check_new_output(args.save_to, args.overwrite)
    source, single_out = Path(args.sd_model), args.save_to.lower().endswith(".safetensors")
    if source.is_file():
        if not single_out:
            raise UserError(f"--sd_model {source} is a single-file checkpoint: give --save_to a .safetensors file "
                            "(the merged checkpoint, in the same layout)")
        unet, vae, text_encoders, v2, v_prediction = load_single_file_parts(source, args.model_config_dir)
        pipe = None
    else:
        pipe = load_pipeline(args.sd_model)
        unet, vae, text_encoders = pipe.unet, pipe.vae, pipeline_text_encoders(pipe)
        v2 = text_encoders[0].config.hidden_size == 1024 and len(text_encoders) == 1
        v_prediction = pipe.scheduler.config.get("prediction_type") == "v_prediction"
    modules = every_layer(unet, text_encoders)  # networks.lora's targets and what other networks adapt
    namer = lora_namer(unet, text_encoders)  # diffusers / ComfyUI files are read into this model's kohya names
    dtype = PRECISIONS[args.precision]
    files = [load_lora(path, namer, allow_dora=True) for path in args.models]
    check_same_family(args.models, files, (f"--sd_model {args.sd_model}", namer.family.name))
    for path, ratio, lora in zip(args.models, ratios, files, strict=True):
        n = bake(modules, lora.state, ratio, path, args.device, dtype, lora.magnitudes)
        print(f"{path}: merged {n} {'DoRA ' if lora.is_dora else ''}modules with ratio {ratio}")
    save_dtype = PRECISIONS[args.save_precision] if args.save_precision else None
    if single_out:
        save_single_file_atomically(Path(args.save_to), args.overwrite, unet, vae, text_encoders, v2, v_prediction,
                                    save_dtype)
        return
    if save_dtype is not None:
        pipe.to(save_dtype)
    save_folder_atomically(pipe, Path(args.save_to), args.overwrite)


def merge_into_llm(args: argparse.Namespace, ratios: list[float]) -> None:
    """Bake LoRAs (kohya files or PEFT folders) into a causal LM and save_pretrained it, for inference engines.

    Linear and GPT-2-style Conv1D layers alike: a Conv1D stores its weight ``(in, out)``, so it receives ``ΔWᵀ``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.new_rank is not None:
        raise UserError("--new_rank applies to merging LoRAs; leave it out with --llm_model")
    check_new_output(args.save_to, args.overwrite)
    root = Path(args.llm_model)
    if not (root / "config.json").is_file():
        raise UserError(f"--llm_model {root}: not a transformers model folder (no config.json)")
    # "auto": the dtype the model is stored in, which is also what is saved unless --save_precision
    # says otherwise (loading a bf16 model as float32 would double the output's size).
    model = AutoModelForCausalLM.from_pretrained(str(root), dtype="auto")
    # every Linear / Conv1D by its kohya name (the causal LM is passed as `unet`, so the prefix is lora_unet)
    modules = {"lora_unet_" + name.replace(".", "_"): m for name, m in model.named_modules() if is_linear_like(m)}
    files = [load_lora(path, allow_dora=True) for path in args.models]
    check_same_family(args.models, files, (f"--llm_model {args.llm_model}", "llm"))
    untied = untie_adapted(model, modules, {name for lora in files for name in lora.state})
    if untied:
        print(f"note: {', '.join(untied)} shared its weight with another layer (tied embeddings); it gets its own "
              "copy, so the adapter changes only that layer, as it did in training")
    for path, ratio, lora in zip(args.models, ratios, files, strict=True):
        n = bake(modules, lora.state, ratio, path, args.device, PRECISIONS[args.precision], lora.magnitudes)
        print(f"{path}: merged {n} {'DoRA ' if lora.is_dora else ''}modules with ratio {ratio}")
    if args.save_precision:
        model.to(PRECISIONS[args.save_precision])

    class _Both:  # save_folder_atomically saves one object; a model folder needs the tokenizer too
        def save_pretrained(self, folder: str, safe_serialization: bool = True) -> None:
            model.save_pretrained(folder, safe_serialization=safe_serialization)
            try:
                AutoTokenizer.from_pretrained(str(root)).save_pretrained(folder)
            except (OSError, ValueError):
                print(f"note: no tokenizer found in {root}; copy it next to the merged model yourself")

    save_folder_atomically(_Both(), Path(args.save_to), args.overwrite)


def untie_adapted(model: torch.nn.Module, modules: dict[str, torch.nn.Module], adapted: set[str]) -> list[str]:
    """Give each adapted layer whose weight is shared (``lm_head`` of a tied-embedding model) a weight of its
    own, and mark the config untied so it is saved and loaded that way; baking into the shared tensor would
    change the input embeddings too. Returns the untied layers' names."""
    owners: dict[int, int] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.nn.Parameter):
            owners[id(weight)] = owners.get(id(weight), 0) + 1
    untied = []
    for name in sorted(adapted & modules.keys()):
        module = modules[name]
        if owners.get(id(module.weight), 0) > 1:
            module.weight = torch.nn.Parameter(module.weight.detach().clone(), requires_grad=False)
            untied.append(name)
    if untied:
        for config in (model.config, getattr(model.config, "text_config", None)):
            if config is not None and getattr(config, "tie_word_embeddings", False):
                config.tie_word_embeddings = False
    return untied


# --- merging LoRAs --------------------------------------------------------------------------



def merge_states(states: list[LoRAState], ratios: list[float], new_rank: int | None, new_conv_rank: int | None,
                 device: str = "cpu") -> tuple[LoRAState, dict[str, float]]:  # fmt: skip
    """One state with ΔW = Σ ratio_i ΔW_i per module; with ``new_rank``, SVD-reduced (module → retained energy)."""
    names = sorted({n for s in states for n in s})
    merged: LoRAState = {}
    retained: dict[str, float] = {}
    for name in names:
        parts = [(s[name], r) for s, r in zip(states, ratios, strict=True) if name in s]
        shapes = {(tuple(f.up.shape[:1]), tuple(f.down.shape[1:])) for f, _ in parts}
        if len(shapes) > 1:
            raise UserError(f"{name}: the files disagree on the layer's shape {sorted(shapes)}; different models?")
        moved = [(LoRAFactors(f.down.to(device), f.up.to(device), f.alpha), r) for f, r in parts]
        combined = concatenate(moved) if len(moved) > 1 else _scaled(*moved[0])
        if new_rank is not None:
            rank = (new_conv_rank or new_rank) if combined.is_kxk else new_rank
            combined, report = refactorize(combined, rank)
            retained[name] = report.retained_fro
        merged[name] = LoRAFactors(combined.down.cpu(), combined.up.cpu(), combined.alpha)
    return merged, retained


def one_alpha(state: LoRAState) -> LoRAState:
    """Every module stored with one alpha (the largest rank), its own scale folded into up and down.

    Concatenation gives each module alpha = its stacked rank, and a module only one file has keeps that file's
    alpha; diffusers applies differing alphas through name patterns that miss some modules (SDXL's middle block
    loaded 17% off), so a file with one alpha is what loads right everywhere (resize keeps one for that reason)."""
    alpha = float(max(f.rank for f in state.values()))
    # the old scale over the new one goes into up (a file's negative or zero alpha included: no square root)
    return {name: LoRAFactors(f.down, f.up * (f.scale * f.rank / alpha), alpha) for name, f in state.items()}


def _scaled(f: LoRAFactors, ratio: float) -> LoRAFactors:
    return f if ratio == 1.0 else LoRAFactors(f.down, f.up * ratio, f.alpha)


def check_sum(merged: LoRAState, states: list[LoRAState], ratios: list[float], rtol: float = 1e-5) -> float:
    """The concatenated result must equal the weighted sum exactly (up to float rounding)."""
    worst = 0.0
    for name, f in merged.items():
        want = sum(r * s[name].delta() for s, r in zip(states, ratios, strict=True) if name in s)
        err = relative_difference(f.delta(), want)
        worst = err if not math.isfinite(err) else max(worst, err)  # max() would hide a NaN
        if not math.isfinite(worst):
            break
    if not worst <= rtol:
        raise UserError(f"internal check failed: merged ΔW differs from the weighted sum by {worst:.2e}")
    return worst


def merged_metadata(metas: list[dict[str, str]], args: argparse.Namespace, merged: LoRAState,
                    ratios: list[float]) -> dict[str, str]:  # fmt: skip
    linear = [f for f in merged.values() if not f.is_kxk]
    convs = [f for f in merged.values() if f.is_kxk]
    alphas = {f.alpha for f in linear}
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(max((f.rank for f in linear), default=0)),
        "ss_network_alpha": str(alphas.pop()) if len(alphas) == 1 else "Dynamic",
    }
    if convs:  # conv_alpha too: a kohya loader reading conv_dim alone would assume alpha = conv_dim
        conv_alphas = {f.alpha for f in convs}
        meta["ss_network_args"] = json.dumps({"conv_dim": str(max(f.rank for f in convs)),
                                              "conv_alpha": str(conv_alphas.pop()) if len(conv_alphas) == 1
                                              else "Dynamic"})
    versions = {m.get("ss_base_model_version") for m in metas} - {None}
    if len(versions) == 1:
        meta["ss_base_model_version"] = versions.pop()
        meta["ss_v2"] = str(meta["ss_base_model_version"].startswith("sd_v2"))
    if args.no_metadata:
        return meta
    sources = ", ".join(f"{Path(p).name} ({r:g})" for p, r in zip(args.models, ratios, strict=True))
    meta["ss_training_comment"] = f"merged from {sources}" + (f", SVD rank {args.new_rank}" if args.new_rank else "")
    for key in ("modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation",
                "modelspec.resolution", "modelspec.prediction_type"):  # fmt: skip
        if key in metas[0]:
            meta[key] = metas[0][key]
    if "modelspec.architecture" in meta:
        meta["modelspec.title"] = Path(args.save_to).stem
        meta["modelspec.date"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    return meta


def merge_loras(args: argparse.Namespace, ratios: list[float]) -> None:
    if not args.save_to.endswith(".safetensors"):
        raise UserError(f"--save_to {args.save_to}: a merged LoRA is saved as .safetensors")
    if args.new_rank is not None and args.new_rank < 1:
        raise UserError("--new_rank must be at least 1")
    check_new_output(args.save_to, args.overwrite)
    namer = Namer(FAMILIES[args.family]) if args.family else None  # names diffusers / ComfyUI / PEFT keys
    files = [load_lora(p, namer, allow_dora=True) for p in args.models]
    check_same_family(args.models, files, (f"--family {args.family}", args.family) if args.family else None)
    dora = [p for p, f in zip(args.models, files, strict=True) if f.is_dora]
    if dora:
        raise UserError(f"{dora[0]} is a DoRA adapter: its magnitude rescales each whole weight row, which no "
                        "LoRA (a ΔW) can hold, so it cannot be combined into one; bake it into the model "
                        "with --llm_model (or --sd_model) instead")  # fmt: skip
    states = [f.state for f in files]
    with torch.no_grad():
        merged, retained = merge_states(states, ratios, args.new_rank, args.new_conv_rank, args.device)
        merged = one_alpha(merged)
        if args.new_rank is None:
            print(f"concatenated: ΔW equals the weighted sum (max relative difference "
                  f"{check_sum(merged, states, ratios):.1e})")  # fmt: skip
    for name, value in retained.items():
        print(f"{name:<80} rank {merged[name].rank:>3}  retained {100 * value:7.3f}%")
    if retained:
        print(f"{len(retained)} modules: retained energy mean {100 * sum(retained.values()) / len(retained):.3f}%")
    dtype = PRECISIONS[args.save_precision] if args.save_precision else files[0].weight_dtype
    save_kohya_file(args.save_to, merged, merged_metadata([f.metadata for f in files], args, merged, ratios), dtype)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        for note in apply_tool_args(args, MERGE_ARGS, {"device": parser.get_default("device")}):
            print(note)
        ratios = ratios_for(args)
        if args.sd_model and args.llm_model:
            raise UserError("give --sd_model or --llm_model, not both")
        if args.family and (args.sd_model or args.llm_model):
            raise UserError("--family applies to merging LoRAs; with --sd_model / --llm_model the model tells the "
                            "family, so leave --family out")  # fmt: skip
        if args.sd_model:
            merge_into_model(args, ratios)
        elif args.llm_model:
            merge_into_llm(args, ratios)
        else:
            merge_loras(args, ratios)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"saved {args.save_to}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
