"""Extract a LoRA from the difference between a fine-tuned and a base model (sd-scripts' extract_lora_from_models.py).

    python tools/extract.py --model_org base_sd15/ --model_tuned finetuned/ --save_to diff.safetensors \\
        --dim 32 --conv_dim 16

Both models are of the same type, SD 1.x/2.x or SDXL: diffusers folders or single-file checkpoints
(read as the trainer reads them). For every module
networks.lora would adapt (attention and feed-forward Linear / 1x1 conv layers of the UNet
transformer blocks and the text encoder(s); with --conv_dim also the 3x3 convs of ResNet,
Downsample and Upsample blocks), the weight difference ΔW is factorised by SVD to the chosen
rank (alpha = rank, scale 1) and the relative error ‖ΔW - ΔW_r‖/‖ΔW‖ is reported. Modules
whose difference is at most --min_diff everywhere are left out. The file uses the same kohya
names as networks.lora (for SDXL: the UNet's original SGM block names and ``lora_te1_`` /
``lora_te2_``), so it loads in the trainer (--network_weights), diffusers, ComfyUI and A1111.
The family written in the metadata comes from the models (SD 2.x: the UNet's linear attention projections);
sd-scripts' --v2 and --sdxl are checked against the base model, --v_parameterization forces v-prediction.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from library.diffusion_models import (  # noqa: E402
    DiffusionModels,
    load_models,
    matched_targets,
    model_kind,
)
from library.errors import UserError  # noqa: E402
from library.lora_files import PRECISIONS, check_new_output, save_kohya_file  # noqa: E402
from library.metadata import minimal_metadata, modelspec_architecture, modelspec_metadata  # noqa: E402
from library.tool_compat import EXTRACT_ARGS, add_tool_args, apply_tool_args  # noqa: E402
from networks.svd import LoRAFactors, RankReport, factorize  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model_org", required=True,
                   help="the base model: an SD 1.x/2.x or SDXL diffusers folder or single-file checkpoint")
    p.add_argument("--model_tuned", required=True, help="the fine-tuned model (folder or single file, same type)")
    p.add_argument("--model_config_dir", default=None,
                   help="single files of a non-standard architecture: a diffusers folder holding its configs (as "
                        "the trainer's --model_config_dir; default: configs/architectures/)")
    p.add_argument("--allow_pickle", action="store_true",
                   help="read .ckpt/.pt single files (tensors only, torch.load(weights_only=True))")
    p.add_argument("--save_to", required=True, help="output LoRA .safetensors")
    p.add_argument("--dim", type=int, default=4, help="rank of Linear / 1x1 conv modules (default 4)")
    p.add_argument("--conv_dim", type=int, default=None, help="rank of 3x3 conv modules (default: left out)")
    p.add_argument("--save_precision", choices=sorted(PRECISIONS), default="float", help="dtype of the file")
    p.add_argument("--device", default="cpu", help="device for the SVDs, e.g. cuda")
    p.add_argument("--clamp_quantile", type=float, default=None,
                   help="clip factor entries to this quantile of their magnitudes (sd-scripts used 0.99); off by "
                        "default since it adds error")  # fmt: skip
    p.add_argument(
        "--min_diff",
        type=float,
        default=0.0,
        help="leave out modules whose largest |ΔW| entry is at most this (default 0: unchanged only)",
    )
    family = p.add_mutually_exclusive_group()  # sd-scripts' names; here the folders tell, these override or check
    family.add_argument("--v2", action="store_true",
                        help="the models are SD 2.x (default: detected from the UNet's use_linear_projection)")
    family.add_argument("--sdxl", action="store_true", help="the models are SDXL (default: detected; checked)")
    p.add_argument("--v_parameterization", action="store_true",
                   help="mark the LoRA as v-prediction (default: the base model's scheduler config)")
    p.add_argument("--no_metadata", action="store_true", help="write only the minimal ss_* keys")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --save_to")
    add_tool_args(p, EXTRACT_ARGS)
    return p


def extract(
    pairs, dim: int, conv_dim: int | None, device: str, clamp_quantile: float | None, min_diff: float
) -> tuple[dict[str, LoRAFactors], dict[str, RankReport], list[str]]:
    state: dict[str, LoRAFactors] = {}
    reports: dict[str, RankReport] = {}
    unchanged: list[str] = []
    for name, is_kxk, org, tuned in pairs:
        diff = tuned.weight.detach().to(device, torch.float32) - org.weight.detach().to(device, torch.float32)
        if float(diff.abs().max()) <= min_diff:
            unchanged.append(name)
            continue
        factors, report = factorize(diff, conv_dim if is_kxk else dim, clamp_quantile=clamp_quantile)
        state[name] = LoRAFactors(factors.down.cpu(), factors.up.cpu(), factors.alpha)
        reports[name] = report
    return state, reports, unchanged


def check_models(args: argparse.Namespace) -> None:
    """Both models' kinds, and --sdxl / --v2 against the base, from configs or key names (before any weights load)."""
    org = model_kind(args.model_org, "model_org", args.allow_pickle)
    tuned = model_kind(args.model_tuned, "model_tuned", args.allow_pickle)
    if org != tuned:
        raise UserError(f"--model_org {args.model_org} is {org.label} but --model_tuned {args.model_tuned} is "
                        f"{tuned.label}; extract needs two models of the same type")  # fmt: skip
    if args.sdxl and not org.sdxl:
        raise UserError(f"--sdxl: {args.model_org} is an {org.label} model; leave --sdxl out"
                        + (" (add --v2 for SD 2.x)" if not org.v2 else ""))
    if args.v2 and not org.v2:
        raise UserError(f"--v2: {args.model_org} is an {org.label} model (an SD 2.x UNet projects attention with "
                        "Linear layers); leave --v2 out")


def output_metadata(args: argparse.Namespace, base: DiffusionModels) -> dict:
    version = base.base_model_version(args.v2, args.v_parameterization)
    net_args = {"conv_dim": args.conv_dim, "conv_alpha": args.conv_dim} if args.conv_dim else {}
    meta = minimal_metadata(version, "networks.lora", args.dim, float(args.dim), net_args)
    if args.no_metadata:
        return meta
    meta["ss_training_comment"] = f"extracted from {Path(args.model_tuned).name} - {Path(args.model_org).name}"
    side = int(base.unet.config.sample_size) * 8
    meta.update(modelspec_metadata(modelspec_architecture(version), Path(args.save_to).stem, (side, side),
                                   "v" if args.v_parameterization or base.v_prediction else "epsilon"))  # fmt: skip
    return meta


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for note in apply_tool_args(args, EXTRACT_ARGS, {}):
            print(note)
        if args.dim < 1 or (args.conv_dim is not None and args.conv_dim < 1):
            raise UserError("--dim and --conv_dim must be at least 1")
        check_new_output(args.save_to, args.overwrite)
        check_models(args)
        base = load_models(args.model_org, "model_org", args.model_config_dir, args.allow_pickle)
        tuned = load_models(args.model_tuned, "model_tuned", args.model_config_dir, args.allow_pickle)
        pairs = list(matched_targets(base, tuned, include_conv=args.conv_dim is not None))
        with torch.no_grad():
            state, reports, unchanged = extract(pairs, args.dim, args.conv_dim, args.device, args.clamp_quantile,
                                                args.min_diff)  # fmt: skip
        if not state:
            raise UserError("the two models do not differ in any LoRA target module; nothing to extract")
        for name, r in reports.items():
            print(f"{name:<80} rank {r.new_rank:>3}  retained {100 * r.retained_fro:7.3f}%  "
                  f"error {r.relative_error:.2e}")  # fmt: skip
        errors = [r.relative_error for r in reports.values()]
        print(f"{len(state)} modules extracted ({len(unchanged)} unchanged left out); relative error mean "
              f"{sum(errors) / len(errors):.2e}, max {max(errors):.2e}")  # fmt: skip
        save_kohya_file(args.save_to, state, output_metadata(args, base),
                        PRECISIONS[args.save_precision])  # fmt: skip
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"saved {args.save_to}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
