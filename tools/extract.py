"""Extract a LoRA from the difference between a fine-tuned and a base model (sd-scripts' extract_lora_from_models.py).

    python tools/extract.py --model_org base_sd15/ --model_tuned finetuned/ --save_to diff.safetensors \\
        --dim 32 --conv_dim 16

Both models are diffusers folders of the same type, SD 1.x/2.x or SDXL. For every module
networks.lora would adapt (attention and feed-forward Linear / 1x1 conv layers of the UNet
transformer blocks and the text encoder(s); with --conv_dim also the 3x3 convs of ResNet,
Downsample and Upsample blocks), the weight difference ΔW is factorised by SVD to the chosen
rank (alpha = rank, scale 1) and the relative error ‖ΔW - ΔW_r‖/‖ΔW‖ is reported. Modules
whose difference is at most --min_diff everywhere are left out. The file uses the same kohya
names as networks.lora (for SDXL: the UNet's original SGM block names and ``lora_te1_`` /
``lora_te2_``), so it loads in the trainer (--network_weights), diffusers, ComfyUI and A1111.
The family written in the metadata comes from the folders (SD 2.x: the UNet's linear attention projections);
sd-scripts' --v2 and --v_parameterization force SD 2.x / v-prediction, --sdxl is checked against the folder.
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

from library.diffusion_models import (  # noqa: E402
    DiffusionModels,
    check_folder,
    is_sdxl_folder,
    load_models,
    matched_targets,
)
from library.errors import UserError  # noqa: E402
from library.lora_files import PRECISIONS, check_new_output, save_kohya_file  # noqa: E402
from library.metadata import minimal_metadata, modelspec_architecture, modelspec_metadata  # noqa: E402
from library.tool_compat import EXTRACT_ARGS, add_tool_args, apply_tool_args  # noqa: E402
from networks.svd import LoRAFactors, RankReport, factorize  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model_org", required=True, help="the base model (SD 1.x/2.x or SDXL diffusers folder)")
    p.add_argument("--model_tuned", required=True, help="the fine-tuned model (diffusers folder, same type)")
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


def check_family_flags(args: argparse.Namespace) -> None:
    """--sdxl / --v2 against what the base folder is (before any weights load)."""
    sdxl = is_sdxl_folder(check_folder(args.model_org, "model_org"))
    if args.sdxl and not sdxl:
        raise UserError(f"--sdxl: {args.model_org} is an SD 1.x/2.x folder (no text_encoder_2); leave --sdxl out "
                        "(add --v2 for SD 2.x)")
    if args.v2 and sdxl:
        raise UserError(f"--v2: {args.model_org} is an SDXL folder; leave --v2 out")
    if args.v2:  # SD 2.x's UNet projects with Linear layers and its OpenCLIP text encoder is 1024 wide
        folder = Path(args.model_org)
        unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
        te_config = folder / "text_encoder" / "config.json"
        width = json.loads(te_config.read_text(encoding="utf-8")).get("hidden_size") if te_config.is_file() else None
        if unet.get("use_linear_projection") is False or width == 768:
            raise UserError(f"--v2: {args.model_org} is an SD 1.x folder (its UNet has no linear projections"
                            f"{', its text encoder is 768 wide' if width == 768 else ''}); leave --v2 out")


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
        check_family_flags(args)
        base = load_models(args.model_org, "model_org")
        tuned = load_models(args.model_tuned, "model_tuned")
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
