"""Show what is inside a LoRA file: metadata, verified hashes, modules, ranks, alphas and norms.

    python tools/show.py my_lora.safetensors
    python tools/show.py --model my_lora.safetensors --json > info.json
    python tools/show.py output/my_llm_lora          # a PEFT adapter folder (an LLM's, or a diffusers UNet's)
    python tools/show.py output/last.ckpt            # the trainer's --save_model_as ckpt / pt output
    python tools/show.py pytorch_lora_weights.bin    # diffusers' old output (attention-processor keys)

The sshs hashes are recomputed from the tensors and compared with the stored ones, so a file
whose tensors were changed after hashing (or a copy truncated on the way) shows up. DoRA files
list each module's magnitude vector as well. Exit status: 0, 1 when a stored hash does not
match the tensors, 2 for an unreadable input.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from library.errors import UserError  # noqa: E402
from library.lora_files import LoRAFile, check_same_family, detect_family, load_lora  # noqa: E402
from library.lora_formats import FAMILIES, Namer  # noqa: E402
from library.metadata import compute_sshs_hashes  # noqa: E402
from networks.peft_export import check_peft_folder  # noqa: E402
from networks.svd import LoRAFactors  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("path", nargs="?", default=None, help="the LoRA (the same as --model)")
    p.add_argument("--model", default=None,
                   help="LoRA file (.safetensors: kohya, diffusers, ComfyUI; .ckpt/.pt/.bin state dict) or PEFT folder")
    p.add_argument("--family", default=None, choices=sorted(FAMILIES),
                   help="family for non-kohya names (default: detected from the names and metadata, "
                        "sd1 if undecided)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--no_modules", action="store_true", help="leave the per-module table out")
    return p


def delta_norm(f: LoRAFactors) -> float:
    """‖scale · up ⊗ down‖_F without forming ΔW: ‖UD‖² = Σ (UᵀU) ∘ (DDᵀ)."""
    up, down = f.up.double().flatten(1), f.down.double().flatten(1)
    return float(((up.T @ up) * (down @ down.T)).sum().clamp_min(0).sqrt()) * abs(f.scale)


def module_rows(state: dict[str, LoRAFactors], magnitudes: dict[str, torch.Tensor] | None = None) -> list[dict]:
    rows = []
    for name, f in sorted(state.items()):
        magnitude = (magnitudes or {}).get(name)
        kind = "conv" if f.down.dim() == 4 else "linear"
        shape = [int(f.up.shape[0]), *map(int, f.down.shape[1:])]
        if kind == "conv" and f.down.shape[2:] == (1, 1):
            kind = "conv1x1"
        rows.append({
            "name": name, "kind": kind, "shape": shape, "rank": f.rank, "alpha": f.alpha, "scale": f.scale,
            "delta_norm": delta_norm(f), "up_norm": float(f.up.float().norm()),
            "down_norm": float(f.down.float().norm()), "dtype": str(f.down.dtype).replace("torch.", ""),
            # DoRA: the trained row norms of the merged weight (|dW| alone does not describe the change)
            "magnitude_norm": None if magnitude is None else float(magnitude.float().norm()),
        })  # fmt: skip
    return rows


def hash_checks(lora: LoRAFile) -> dict[str, dict]:
    """Stored vs recomputed sshs hashes (only meaningful for kohya files, which carry them)."""
    stored = {k: lora.metadata.get(k) for k in ("sshs_model_hash", "sshs_legacy_hash")}
    if not any(stored.values()):
        return {}
    model, legacy = compute_sshs_hashes(lora.tensors, lora.metadata)
    computed = {"sshs_model_hash": model, "sshs_legacy_hash": legacy}
    # only the hashes the file stores: one written without the legacy hash is not a mismatch
    return {k: {"stored": stored[k], "computed": computed[k], "ok": stored[k] == computed[k]}
            for k in computed if stored[k]}


def metadata_checks(metadata: dict[str, str], rows: list[dict]) -> list[str]:
    """Disagreements between ss_network_dim/alpha and the tensors (a resized or edited file)."""
    notes = []
    ranks = Counter(r["rank"] for r in rows if r["kind"] != "conv")
    dim = metadata.get("ss_network_dim")
    if dim and dim.isdigit() and ranks and int(dim) not in ranks:
        notes.append(f"ss_network_dim is {dim} but the linear modules have ranks {sorted(ranks)}")
    return notes


def summarize(path: str, lora: LoRAFile, family: str | None = None) -> dict:
    """What show prints; ``family``: --family, shown when the names and metadata do not tell."""
    rows = module_rows(lora.state, lora.magnitudes)
    family = detect_family(lora.tensors, lora.metadata)[0] or family
    prefixes = Counter(r["name"].split("_")[1] if r["name"].startswith("lora_") else "?" for r in rows)
    if family == "llm" and "unet" in prefixes:  # an LLM's kohya names keep sd-scripts' lora_unet_ prefix
        prefixes["llm"] = prefixes.pop("unet")
    params = sum(t.numel() for t in lora.tensors.values())
    bytes_ = sum(t.numel() * t.element_size() for t in lora.tensors.values())
    return {
        "file": path,
        "format": lora.format,
        "family": family,
        "dora": lora.is_dora,
        "modules": len(rows),
        "modules_by_prefix": dict(prefixes),
        "ranks": dict(sorted(Counter(r["rank"] for r in rows).items())),
        "alphas": dict(sorted(Counter(r["alpha"] for r in rows).items())),
        "parameters": params,
        "tensor_bytes": bytes_,
        "dtypes": sorted({str(t.dtype).replace("torch.", "") for t in lora.tensors.values()}),
        "metadata": dict(sorted(lora.metadata.items())),
        "hashes": hash_checks(lora),
        "notes": metadata_checks(lora.metadata, rows),
        "module_table": rows,
    }


def _short(value: str, limit: int = 100) -> str:
    value = value.replace("\n", " ")
    return value if len(value) <= limit else value[: limit - 3] + "..."


def format_text(info: dict, with_modules: bool) -> str:
    lines = [
        f"file: {info['file']}",
        f"format: {info['format']}{' (DoRA)' if info['dora'] else ''}, family {info['family'] or 'unknown'}, "
        f"{info['modules']} modules "
        f"{info['modules_by_prefix']}, "
        f"{info['parameters']:,} parameters ({info['tensor_bytes'] / 2**20:.2f} MiB, {', '.join(info['dtypes'])})",
        f"ranks: {info['ranks']}   alphas: {info['alphas']}",
    ]
    groups = (("training metadata (ss_*)", "ss_"), ("ModelSpec", "modelspec."))
    for title, prefix in groups:
        keys = [k for k in info["metadata"] if k.startswith(prefix)]
        if keys:
            lines.append(f"{title}:")
            lines += [f"  {k}: {_short(info['metadata'][k])}" for k in keys]
    others = [k for k in info["metadata"] if not k.startswith(("ss_", "modelspec.", "sshs_"))]
    lines += [f"  {k}: {_short(info['metadata'][k])}" for k in others]
    if info["hashes"]:
        lines.append("hashes (recomputed from the tensors):")
        for key, h in info["hashes"].items():
            verdict = "ok" if h["ok"] else f"MISMATCH (computed {h['computed']})"
            lines.append(f"  {key}: {h['stored']} {verdict}")
    else:
        lines.append("hashes: none stored")
    lines += [f"note: {n}" for n in info["notes"]]
    if with_modules:
        dora = f" {'|m|':>10}" if info["dora"] else ""
        lines.append(f"{'module':<72} {'kind':<7} {'shape':<16} {'rank':>4} {'alpha':>7} {'|dW|':>10}{dora}")
        for r in info["module_table"]:
            shape = "x".join(map(str, r["shape"]))
            mag = r["magnitude_norm"]
            dora = "" if not info["dora"] else f" {'-':>10}" if mag is None else f" {mag:>10.4g}"
            lines.append(f"{r['name']:<72} {r['kind']:<7} {shape:<16} {r['rank']:>4} {r['alpha']:>7g} "
                         f"{r['delta_norm']:>10.4g}{dora}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.path is None) == (args.model is None):
        parser.error("give the LoRA file or PEFT folder once, as a path or as --model")
    path = args.model or args.path
    try:
        # Without --family, load_lora names diffusers / ComfyUI files by the detected family (as convert.py).
        namer = Namer(FAMILIES[args.family]) if args.family else None
        check_peft_folder(path)  # modules_to_save copies: say what they are, not "unexpected key"
        lora = load_lora(path, namer, allow_dora=True)
        if args.family:
            check_same_family([path], [lora], (f"--family {args.family}", args.family))
        with torch.no_grad():
            info = summarize(path, lora, args.family)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.no_modules:
        info.pop("module_table")
    print(json.dumps(info, indent=2) if args.json else format_text(info, not args.no_modules))
    return 1 if any(not h["ok"] for h in info["hashes"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
