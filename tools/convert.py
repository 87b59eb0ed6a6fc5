"""Convert a LoRA between kohya, diffusers/PEFT and ComfyUI naming, verifying every module.

    python tools/convert.py --model my_lora.safetensors --to diffusers --save_to my_lora_diffusers.safetensors
    python tools/convert.py --model my_lora.safetensors --to comfyui --save_to my_lora_comfy.safetensors
    python tools/convert.py --model diffusers_lora.safetensors --to kohya --save_to back.safetensors
    python tools/convert.py --model llm_lora.safetensors --family llm --to peft --save_to adapter_dir/ \\
        --base_model_name_or_path my-llm

The input format is detected (kohya, diffusers, ComfyUI file, or a PEFT folder). After writing,
the output is read back and every module's ΔW = (alpha/r)·up·down is compared with the
input's (relative Frobenius difference at most 1e-5 in float32; the rounding of --save_precision
otherwise), and the module sets must be equal: a file that would load "without error but
with no effect" is never written silently. Alpha: --alpha fold multiplies alpha/r into lora_B
(every consumer gets the right scale), --alpha keep stores it in the diffusers
``lora_adapter_metadata`` / PEFT ``adapter_config.json`` (default: fold for diffusers, keep for peft).
DoRA adapters convert between kohya (``.magnitude``) and PEFT (``lora_magnitude_vector``,
``use_dora``), magnitudes checked too; diffusers and ComfyUI output is refused for them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from library.errors import UserError  # noqa: E402
from library.fileio import atomic_save_safetensors, atomic_write  # noqa: E402
from library.lora_files import (  # noqa: E402
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    PRECISIONS,
    LoRAFile,
    check_new_output,
    check_same_family,
    file_family,
    load_lora,
    save_kohya_file,
    shape_metadata,
)
from library.lora_formats import (  # noqa: E402
    FAMILIES,
    FORMATS,
    Family,
    Namer,
    UNetLayout,
    compare_states,
    diffusers_metadata,
    write_comfy,
    write_lora_a_b,
)
from networks.conv1d import is_conv1d, is_linear_like  # noqa: E402
from networks.svd import LoRAFactors, relative_difference  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="input LoRA (.safetensors, .ckpt/.pt/.bin state dict or PEFT folder)")
    p.add_argument("--save_to", required=True, help="output file (kohya, diffusers, comfyui) or folder (peft)")
    p.add_argument("--to", required=True, choices=FORMATS, help="output format")
    p.add_argument("--family", choices=sorted(FAMILIES), default=None,
                   help="model family (default: detected from the key names and ss_base_model_version / "
                        "modelspec.architecture; if undecided, llm for --to peft, else sd1)")  # fmt: skip
    p.add_argument(
        "--alpha",
        choices=("fold", "keep"),
        default=None,
        help="diffusers/peft output: fold alpha/r into lora_B, or keep alpha in the metadata/config",
    )
    p.add_argument(
        "--base_model",
        default=None,
        help="the model folder (diffusers or transformers): exact module names and UNet block layout",
    )
    p.add_argument("--base_model_name_or_path", default=None, help="written into adapter_config.json (peft)")
    p.add_argument("--save_precision", choices=sorted(PRECISIONS), default=None,
                   help="dtype of the output (default: the input's)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an existing --save_to")
    return p


def _meta_modules(build) -> list[str]:
    """Module paths of a model built on the meta device (no weights, no memory)."""
    with torch.device("meta"):
        model = build()
    return [n for n, m in model.named_modules() if is_linear_like(m) or isinstance(m, torch.nn.Conv2d)]


def _llm_model(root: Path) -> torch.nn.Module:
    """The causal LM of a transformers folder, built from its config alone (call it on the meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(root)))


def fan_in_fan_out(base_model: str | None, paths: list[str]) -> bool:
    """PEFT's ``fan_in_fan_out``: whether the adapted layers of ``base_model`` are transformers' Conv1D (GPT-2
    style, weight ``(in, out)``). Unknown without the model: False, which PEFT itself corrects (with a warning)
    when it meets a Conv1D layer."""
    if base_model is None:
        return False
    with torch.device("meta"):
        model = _llm_model(Path(base_model))
    targets = set(paths)
    return any(is_conv1d(m) for n, m in model.named_modules() if n in targets)


def make_namer(family_name: str, base_model: str | None) -> Namer:
    family = FAMILIES[family_name]
    if base_model is None:
        return Namer(family)
    root = Path(base_model)
    if family_name == "llm":
        return Namer(family, {"model": _meta_modules(lambda: _llm_model(root))})
    unet_config = root / "unet" / "config.json"
    if not unet_config.is_file():
        raise UserError(f"--base_model {base_model}: no unet/config.json (give the diffusers model folder)")
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    config = json.loads(unet_config.read_text(encoding="utf-8"))
    family = Family(family.name, family.components, UNetLayout.from_config(config))
    paths = {"unet": _meta_modules(lambda: UNet2DConditionModel.from_config(config))}
    for comp in family.components[1:]:
        te_config = CLIPTextConfig.from_pretrained(str(root / comp.name))
        paths[comp.name] = _meta_modules(lambda c=te_config: CLIPTextModel(c))
    return Namer(family, paths)


def write_peft_folder(target: Path, tensors: dict, config: dict, metadata: dict, overwrite: bool) -> None:
    """adapter_model.safetensors + adapter_config.json, written into a temporary folder then renamed."""
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()
    try:
        atomic_save_safetensors(tensors, tmp / PEFT_WEIGHTS, metadata)
        with atomic_write(tmp / PEFT_CONFIG, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        if target.exists():
            if not overwrite:
                raise UserError(f"{target} already exists; pass --overwrite to replace it")
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def peft_config(config: dict, args: argparse.Namespace) -> dict:
    full = dict(config)
    # Module suffixes (q_proj, ...) are what PEFT and vLLM expect; modules of those kinds that the
    # file does not hold get lora_B = 0, so they change nothing.
    full["target_modules"] = sorted({p.rsplit(".", 1)[-1] for p in config["target_modules"]})
    full.update({"task_type": "CAUSAL_LM", "base_model_name_or_path": args.base_model_name_or_path,
                 "inference_mode": True, "fan_in_fan_out": fan_in_fan_out(args.base_model, config["target_modules"])})
    return full


def _clip_probe() -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        # special token ids inside the tiny vocabulary: transformers warns about them otherwise
        return CLIPTextModel(CLIPTextConfig(hidden_size=8, intermediate_size=8, num_attention_heads=1,
                                            num_hidden_layers=1, vocab_size=10, bos_token_id=0, eos_token_id=1,
                                            pad_token_id=1))  # fmt: skip


def write_output(source: LoRAFile, args: argparse.Namespace, namer: Namer, dtype: torch.dtype) -> None:
    state, magnitudes = source.state, source.magnitudes
    kept = {k: v for k, v in source.metadata.items() if k.startswith(("ss_", "modelspec."))}
    if magnitudes and args.to in ("diffusers", "comfyui"):
        raise UserError(f"{args.model} is a DoRA adapter and the {args.to} format has no place for its magnitude "
                        "vectors (dropping them would change what it does); use --to kohya or --to peft")  # fmt: skip
    fold = args.to in ("diffusers", "peft") and (args.alpha or ("fold" if args.to == "diffusers" else "keep")) == "fold"
    # the ranks and alphas the output holds (folding moves alpha/r into lora_B: alpha becomes r)
    written = {name: LoRAFactors(f.down, f.up, float(f.rank)) for name, f in state.items()} if fold else state
    kept = shape_metadata(kept, written)
    if args.to == "kohya":
        save_kohya_file(args.save_to, state, kept, dtype, magnitudes)
    elif args.to == "comfyui":
        v2 = is_sd2(source.metadata, args.base_model)
        atomic_save_safetensors(write_comfy(state, namer, dtype, v2=v2), args.save_to, kept)
    elif args.to == "diffusers":
        # Paths as the installed transformers names the modules (version 5 dropped CLIP's text_model),
        # which is what diffusers itself writes and matches against; both spellings are read.
        strip = not hasattr(_clip_probe(), "text_model")
        tensors, configs = write_lora_a_b(state, namer, "diffusers_prefix", fold, dtype, strip_path_prefix=strip)
        atomic_save_safetensors(tensors, args.save_to, {**kept, **diffusers_metadata(configs)})
    else:
        tensors, configs = write_lora_a_b(state, namer, "peft_prefix", fold, dtype, magnitudes=magnitudes)
        if len(configs) != 1:
            raise UserError("a PEFT folder holds one model's adapter; this LoRA spans several models")
        write_peft_folder(Path(args.save_to), tensors, peft_config(next(iter(configs.values())), args), kept,
                          args.overwrite)  # fmt: skip


def is_sd2(metadata: dict[str, str], base_model: str | None) -> bool:
    """An SD 2.x LoRA (by its metadata, or a --base_model whose text encoder is OpenCLIP-H, 1024 wide)."""
    if metadata.get("ss_v2") == "True" or (metadata.get("ss_base_model_version") or "").startswith("sd_v2"):
        return True
    if (metadata.get("modelspec.architecture") or "").startswith("stable-diffusion-v2"):
        return True
    config = Path(base_model) / "text_encoder" / "config.json" if base_model else None
    if config is not None and config.is_file():
        return json.loads(config.read_text(encoding="utf-8")).get("hidden_size") == 1024
    return False


def choose_family(args: argparse.Namespace) -> str:
    """--family if given, else what the file's keys / metadata say (the same detection every tool uses)."""
    if args.family:
        return args.family
    detected, why = file_family(args.model)
    if detected is not None:
        print(f"family: {detected} ({why}); --family overrides")
        return detected
    return "llm" if args.to == "peft" else "sd1"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        family = choose_family(args)
        if args.to == "peft" and family != "llm":
            raise UserError("--to peft writes an LLM adapter folder; for SD LoRAs use --to diffusers")
        if args.to == "peft" and args.save_to.endswith(".safetensors"):
            raise UserError("--to peft writes a folder; give --save_to a folder name")
        check_new_output(args.save_to, args.overwrite)
        namer = make_namer(family, args.base_model)
        source = load_lora(args.model, namer, allow_dora=True)
        if args.family:  # a file detected as another family would get names that fit neither
            check_same_family([args.model], [source], (f"--family {args.family}", args.family))
        dtype = PRECISIONS[args.save_precision] if args.save_precision else source.weight_dtype
        # Written beside the target and checked there; only a verified result replaces it, so a failed check
        # never costs the file --overwrite named (possibly --model itself).
        target = Path(args.save_to)
        partial = target.with_name(f".{target.stem}.partial{target.suffix}")
        _remove(partial)
        try:
            write_output(source, argparse.Namespace(**{**vars(args), "save_to": str(partial)}), namer, dtype)
            result = load_lora(str(partial), namer, allow_dora=True)
            worst = compare_states(source.state, result.state, TOLERANCE.get(dtype, 1e-5))
            compare_magnitudes(source.magnitudes, result.magnitudes, TOLERANCE.get(dtype, 1e-5))
        except BaseException:
            _remove(partial)
            raise
        if partial.is_dir() and target.exists():
            _remove(target)  # a folder cannot be renamed over another
        os.replace(partial, target)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dora = " and DoRA magnitude" if source.is_dora else ""
    print(f"{source.format} -> {args.to}: {len(result.state)} modules, every ΔW{dora} verified "
          f"(max relative difference {worst:.1e}); saved {args.save_to}")  # fmt: skip
    return 0


def compare_magnitudes(source: dict[str, torch.Tensor], result: dict[str, torch.Tensor],
                       rtol: float = 1e-5) -> None:  # fmt: skip
    """The DoRA magnitude vectors of a conversion must survive it (same modules, same values)."""
    if set(source) != set(result):
        raise UserError(f"conversion check failed: DoRA magnitudes of {len(source)} modules in, {len(result)} out")
    bad = [n for n, m in source.items() if relative_difference(result[n].float(), m.float()) > rtol]
    if bad:
        raise UserError(f"conversion check failed: DoRA magnitudes differ in {len(bad)} modules: {bad[:5]}")


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
