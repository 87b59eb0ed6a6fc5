"""Reduce a LoRA's rank by SVD, to a fixed rank or by a dynamic criterion (sd-scripts' resize_lora.py).

    python tools/resize.py --model big.safetensors --save_to small.safetensors --new_rank 8
    python tools/resize.py --model big.safetensors --save_to dyn.safetensors --new_rank 32 \\
        --dynamic_method sv_fro --dynamic_param 0.9

Each module's ΔW = (alpha/r)·up·down is re-factorised from its SVD (computed from the factors,
never from the full matrix), keeping the largest singular values; conv 3x3 (LoCon) modules use
--new_conv_rank. A fixed --new_rank keeps each module's alpha/rank ratio, so training can continue with
the same learning rate; a dynamic method keeps each module's alpha (so the file keeps one alpha, which
diffusers' loader needs to scale every module right). Per module the retained Frobenius energy
(‖ΔW_k‖/‖ΔW‖) and the relative error are printed. The output's ss_network_dim (``Dynamic`` for dynamic
methods, as sd-scripts writes), ss_network_alpha, ss_network_args and sshs hashes are updated.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from library.errors import UserError  # noqa: E402
from library.lora_files import (  # noqa: E402
    PRECISIONS,
    check_new_output,
    check_same_family,
    load_lora,
    save_kohya_file,
)
from library.lora_formats import FAMILIES, Namer  # noqa: E402
from networks.svd import DYNAMIC_METHODS, LoRAFactors, RankReport, refactorize, with_scale  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="LoRA file or PEFT folder to resize (.safetensors or .ckpt/.pt/.bin)")
    p.add_argument("--save_to", required=True, help="output .safetensors file")
    p.add_argument("--family", choices=sorted(FAMILIES), default=None,
                   help="model family, for diffusers / ComfyUI / PEFT names (default: detected from the key names "
                        "and ss_base_model_version / modelspec.architecture, sd1 if undecided)")  # fmt: skip
    p.add_argument("--new_rank", type=int, default=4, help="rank of the output (the cap for dynamic methods)")
    p.add_argument("--new_conv_rank", type=int, default=None, help="rank of conv 3x3 modules (default: --new_rank)")
    p.add_argument("--dynamic_method", choices=DYNAMIC_METHODS, default=None,
                   help="choose each module's rank: sv_ratio (keep s >= s_max/param), sv_cumulative "
                        "(Σs share >= param), sv_fro (Frobenius share >= param)")  # fmt: skip
    p.add_argument("--dynamic_param", type=float, default=None, help="the dynamic method's parameter")
    p.add_argument("--save_precision", choices=sorted(PRECISIONS), default=None,
                   help="dtype of the saved tensors (default: the input's)")  # fmt: skip
    p.add_argument("--device", default="cpu", help="device for the SVDs, e.g. cuda")
    p.add_argument("--verbose", action="store_true", help="also print each module's largest singular value")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --save_to")
    return p


def check_args(args: argparse.Namespace) -> None:
    if args.new_rank < 1 or (args.new_conv_rank is not None and args.new_conv_rank < 1):
        raise UserError("--new_rank and --new_conv_rank must be at least 1")
    if args.dynamic_method and args.dynamic_param is None:
        raise UserError(f"--dynamic_method {args.dynamic_method} needs --dynamic_param")
    if args.dynamic_method == "sv_ratio" and args.dynamic_param < 1:
        raise UserError("--dynamic_param for sv_ratio is a ratio s_max/s >= 1 (e.g. 10)")
    if args.dynamic_method in ("sv_cumulative", "sv_fro") and not 0 < args.dynamic_param <= 1:
        raise UserError(f"--dynamic_param for {args.dynamic_method} is a fraction in (0, 1] (e.g. 0.9)")



def resize_state(
    state: dict[str, LoRAFactors],
    new_rank: int,
    new_conv_rank: int,
    method: str | None,
    param: float | None,
    device: str = "cpu",
) -> tuple[dict[str, LoRAFactors], dict[str, RankReport]]:
    """Every module re-factorised. A fixed rank keeps each module's alpha/rank (as sd-scripts); a dynamic method
    keeps each module's alpha instead, since the ranks now differ from module to module: a file whose alphas
    differ too is mis-scaled by diffusers' loader (its alpha_pattern handling, diffusers 0.42), while one alpha
    (a trained file's) loads exactly everywhere. Either way ΔW is the same."""
    out: dict[str, LoRAFactors] = {}
    reports: dict[str, RankReport] = {}
    for name, f in state.items():
        moved = LoRAFactors(f.down.to(device), f.up.to(device), f.alpha)
        small, report = refactorize(moved, new_conv_rank if f.is_kxk else new_rank, method, param)
        small = LoRAFactors(small.down.cpu(), small.up.cpu(), small.alpha)
        out[name] = with_scale(small, f.alpha / small.rank if method else f.scale)
        reports[name] = report
    return out, reports


def updated_metadata(
    meta: dict[str, str], state: dict[str, LoRAFactors], args: argparse.Namespace, conv_rank: int
) -> dict[str, str]:
    meta = dict(meta)
    old_dim = meta.get("ss_network_dim", "?")
    linear = [f for f in state.values() if not f.is_kxk]
    alphas = sorted({f.alpha for f in linear})
    if args.dynamic_method:
        meta["ss_network_dim"] = "Dynamic"
        meta["ss_network_alpha"] = str(alphas[0]) if len(alphas) == 1 else "Dynamic"
    else:
        meta["ss_network_dim"] = str(max((f.rank for f in linear), default=args.new_rank))
        meta["ss_network_alpha"] = str(alphas[0]) if len(alphas) == 1 else "Dynamic"
    try:
        net_args = json.loads(meta.get("ss_network_args") or "{}")
    except json.JSONDecodeError:
        net_args = {}
    if isinstance(net_args, dict) and "conv_dim" in net_args:
        convs = [f for f in state.values() if f.is_kxk]
        net_args["conv_dim"] = str(max((f.rank for f in convs), default=conv_rank))
        conv_alphas = sorted({f.alpha for f in convs})
        if len(conv_alphas) == 1:
            net_args["conv_alpha"] = str(conv_alphas[0])
        meta["ss_network_args"] = json.dumps(net_args)
    how = f"{args.dynamic_method}={args.dynamic_param}, max {args.new_rank}" if args.dynamic_method else args.new_rank
    note = f"dimension is resized from {old_dim} to {how}"
    meta["ss_training_comment"] = f"{meta['ss_training_comment']}; {note}" if meta.get("ss_training_comment") else note
    return meta


def print_report(reports: dict[str, RankReport], verbose: bool) -> None:
    for name, r in reports.items():
        extra = f"  s_max {r.max_singular:.4g}" if verbose else ""
        print(f"{name:<80} rank {r.old_rank:>3} -> {r.new_rank:<3} retained {100 * r.retained_fro:7.3f}%  "
              f"error {r.relative_error:.2e}{extra}")  # fmt: skip
    if reports:
        retained = [r.retained_fro for r in reports.values()]
        print(f"{len(reports)} modules: retained energy mean {100 * sum(retained) / len(retained):.3f}%, "
              f"min {100 * min(retained):.3f}%")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        check_new_output(args.save_to, args.overwrite)
        lora = load_lora(args.model, Namer(FAMILIES[args.family]) if args.family else None)
        if args.family:  # a file detected as another family would get names that fit neither
            check_same_family([args.model], [lora], (f"--family {args.family}", args.family))
        conv_rank = args.new_conv_rank or args.new_rank
        with torch.no_grad():
            state, reports = resize_state(lora.state, args.new_rank, conv_rank, args.dynamic_method,
                                          args.dynamic_param, args.device)  # fmt: skip
        dtype = PRECISIONS[args.save_precision] if args.save_precision else lora.weight_dtype
        meta = updated_metadata(lora.metadata, state, args, conv_rank)
        print_report(reports, args.verbose)
        save_kohya_file(args.save_to, state, meta, dtype)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"saved {args.save_to}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
