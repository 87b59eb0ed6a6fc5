"""Estimate the memory a LoRA training run needs, from the model's configs alone, and what makes it fit.

    python tools/plan.py --pretrained_model_name_or_path sd15/ --train_batch_size 4 --resolution 768 \\
        --network_dim 32 --mixed_precision bf16 --vram 8

No weights are read: the models are built on PyTorch's "meta" device (shapes without memory)
from their config.json files, the LoRA is applied with networks.lora, and one forward pass is
traced at the requested batch size and resolution, recording every tensor autograd keeps for
the backward pass (library/plan_trace.py). The model is an SD 1.x/2.x or SDXL diffusers folder,
a transformers causal-LM folder, or a single-file SD/SDXL checkpoint: its kind comes from the key
names (of a .safetensors only the header is read) and its architecture from the shipped configs
under configs/architectures/ or --model_config_dir, as train_network.py does. The estimate is the sum of
- frozen weights (in the --mixed_precision dtype; the VAE stays float32 with --no_half_vae, and
  is left out with --cache_latents since latents are encoded before training; SDXL's text
  encoders are left out with --cache_text_encoder_outputs, which moves them to the CPU),
- LoRA parameters and their gradients (float32 unless --full_bf16),
- optimizer state (AdamW: 2 float32 tensors per parameter, 8-bit Adam: 2 bytes, Lion: 1 tensor ...),
- activations saved for backward (with --gradient_checkpointing: the inputs of every checkpointed
  block plus the largest block's activations, recomputed one block at a time).
CUDA adds its own context (~0.3-0.5 GiB) and allocator fragmentation; --vram is compared with
the estimate plus 10%. Process memory on the CPU side is dominated by libraries and is not estimated.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from library.errors import UserError  # noqa: E402
from library.plan_trace import DTYPES, PlanInput, Traced, trace_diffusion, trace_llm  # noqa: E402

GiB = 2**30
# Optimizer state per trainable parameter, in bytes per parameter byte of a float32 parameter.
OPTIMIZER_STATE = {"adamw": 2.0, "adam": 2.0, "adamw8bit": 0.5, "pagedadamw8bit": 0.5, "lion": 1.0,
                   "lion8bit": 0.25, "sgd": 0.0, "sgdnesterov": 1.0, "prodigy": 4.0, "adafactor": 0.1,
                   "dadaptadam": 3.0}  # fmt: skip
SAFETY = 1.1


@dataclass(frozen=True)
class Estimate:
    weights: int
    lora_params: int
    gradients: int
    optimizer_state: int
    activations: int
    lora_param_count: int

    @property
    def total(self) -> int:
        return self.weights + self.lora_params + self.gradients + self.optimizer_state + self.activations


@dataclass(frozen=True)
class ModelSource:
    """What to trace: the family, the folder whose configs describe it and, for a single file, the file."""

    family: str  # "sd" | "sdxl" | "llm"
    configs: Path
    file: Path | None = None
    title: str = ""  # a single file's kind, e.g. "SDXL base"
    unet_params: int | None = None  # the UNet parameters the file holds, checked against the configs

    def describe(self) -> str:
        if self.file is None:
            return f"{self.configs} ({self.family})"
        return f"{self.file} ({self.title} single file, architecture from {self.configs})"

    def positions(self) -> int | None:
        """An LLM's max_position_embeddings (its default max_seq_length comes from it), from config.json."""
        if self.family != "llm":
            return None
        try:
            config = json.loads((self.configs / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return config.get("max_position_embeddings")

    def check(self, traced: Traced) -> None:
        built = traced.param_counts.get("unet")
        if self.unet_params is not None and built != self.unet_params:
            raise UserError(f"{self.file}: its UNet has {self.unet_params:,} parameters, but the {self.title} "
                            f"architecture in {self.configs} has {built:,}; for a checkpoint of another shape give "
                            "--model_config_dir (a diffusers folder of the model; configs only, weights not needed).")


def checkpoint_shapes(path: Path, allow_pickle: bool) -> dict[str, tuple[int, ...]]:
    """Key → shape of a single-file checkpoint; of a .safetensors only the header is read."""
    from library.single_file import CHECKPOINT_SUFFIXES, read_checkpoint

    if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise UserError(f"{path} is not a model: expected a diffusers or transformers folder, or a single-file "
                        f"checkpoint ({', '.join(CHECKPOINT_SUFFIXES)}).")
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        from library.weights_check import check_weight_file

        check_weight_file(path)  # git-lfs pointers, truncated files
        with safe_open(str(path), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    state = read_checkpoint(path, allow_pickle)  # a pickle is refused without --allow_pickle
    return {key: tuple(value.shape) for key, value in state.items()}


def resolve_model(plan: PlanInput) -> ModelSource:
    """The family and config folder of --pretrained_model_name_or_path, as train_network.py detects them."""
    from library.families import detect_model_type

    path = Path(plan.model)
    if not path.is_file():
        return ModelSource(detect_model_type(path), path)  # a missing path or a non-model folder: a UserError
    from library.single_file import UNET, config_folder, detect_kind

    shapes = checkpoint_shapes(path, plan.allow_pickle)
    kind = detect_kind(shapes, lambda key: torch.empty(shapes[key], device="meta"), str(path))
    configs = config_folder(kind, plan.model_config_dir, plan.tokenizer_cache_dir)
    unet_params = sum(math.prod(shape) for key, shape in shapes.items() if key.startswith(UNET))
    return ModelSource(kind.family, configs, path, kind.title, unet_params)


def _estimate(traced: Traced, plan: PlanInput) -> Estimate:
    key = plan.optimizer.lower().replace("_", "").split(".")[-1] or "adamw"
    if key not in OPTIMIZER_STATE:
        raise UserError(f"--optimizer_type {plan.optimizer}: unknown; known: {', '.join(sorted(OPTIMIZER_STATE))}")
    param_dtype = DTYPES[plan.mixed_precision] if plan.full_half else torch.float32
    counter = traced.counter
    activations = counter.checkpointed() if plan.gradient_checkpointing else counter.total
    # Parameters the loss does not reach get no gradient and, in the optimizer, no state.
    trained = traced.trained_count
    return Estimate(traced.weights, traced.lora_count * param_dtype.itemsize, trained * param_dtype.itemsize,
                    int(trained * 4 * OPTIMIZER_STATE[key]), activations, traced.lora_count)  # fmt: skip


def plan_model(plan: PlanInput) -> tuple[ModelSource, Estimate]:
    """The model as resolved from --pretrained_model_name_or_path, and the estimate for it."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # casting meta models to half warns about nothing useful
    source = resolve_model(plan)
    with torch.enable_grad():  # autograd saves tensors only when gradients are wanted
        if source.family == "llm":
            traced = trace_llm(source.configs, plan)
        else:
            traced = trace_diffusion(source.configs, source.family, plan)
    source.check(traced)
    return source, _estimate(traced, plan)


def estimate(plan: PlanInput) -> Estimate:
    return plan_model(plan)[1]


def suggestions(plan: PlanInput, vram_gib: float, family: str = "sd") -> list[tuple[str, Estimate]]:
    """Switches added one at a time (cheapest in quality first) until the estimate fits."""
    sdxl = family == "sdxl"
    steps = [
        ("--gradient_checkpointing", lambda p: replace(p, gradient_checkpointing=True)),
        ("--mixed_precision bf16", lambda p: replace(p, mixed_precision="bf16") if p.mixed_precision == "no" else p),
        ("--cache_latents", lambda p: replace(p, cache_latents=True)),
        ("--optimizer_type AdamW8bit", lambda p: replace(p, optimizer="AdamW8bit")
         if p.optimizer.lower() in ("adamw", "adam", "") else p),
        ("--network_train_unet_only", lambda p: replace(p, train_text_encoder=False)),
        ("--cache_text_encoder_outputs", lambda p: replace(p, cache_text_encoder_outputs=True) if sdxl else p),
        ("--train_batch_size 1 (raise --gradient_accumulation_steps to keep the global batch)",
         lambda p: replace(p, batch_size=1)),
    ]  # fmt: skip
    out: list[tuple[str, Estimate]] = []
    current, total = plan, estimate(plan).total
    for label, change in steps:
        changed = change(current)
        if changed == current:
            continue
        est = estimate(changed)
        if est.total >= total:  # a switch that saves nothing here (e.g. --cache_latents for an LLM)
            continue
        current, total = changed, est.total
        out.append((label, est))
        if est.total * SAFETY <= vram_gib * GiB:
            break
    return out


def gib(text: str) -> float:
    """--vram: a positive, finite number of GiB (argparse reports the error with the option's name)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (0 < value < math.inf):  # also refuses nan, which every comparison would treat as "does not fit"
        raise argparse.ArgumentTypeError(f"{text!r} is not a GPU memory size; give a positive number of GiB, e.g. 12")
    return value


def build_parser() -> argparse.ArgumentParser:
    """train_network.py's parser (so a training command line or --config_file plans as it is) plus plan's own."""
    from library.args import build_parser as training_parser

    p = training_parser()
    p.prog = "plan.py"
    p.description = (__doc__.split("\n\n")[0] + " Takes train_network.py's arguments, --config_file and "
                     "--dataset_config included; those that change memory are used.")
    g = p.add_argument_group("plan")
    g.add_argument("--conv_dim", type=int, default=None, help="conv LoRA rank (as --network_args conv_dim=N)")
    g.add_argument("--vram", type=gib, default=None, help="GPU memory in GiB: suggest switches to fit it")
    g.add_argument("--json", action="store_true", help="print JSON")
    return p


def read_arguments(parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, dict]:
    """The arguments as the trainer resolves them: --config_file under the command line, sd-scripts' and
    diffusers'/TRL's names mapped (library/arg_checks.py does the same before training)."""
    from library.config_file import parse_args_with_sources
    from library.foreign_args import apply_foreign_args
    from library.sd_scripts_args import apply_sd_scripts_args

    args, sources = parse_args_with_sources(parser, argv)
    apply_sd_scripts_args(args, sources)
    # The trainer refuses --max_seq_length (an LLM's length lives in its dataset TOML); a plan has no TOML to
    # put it in, so here it is read before the foreign names are checked.
    seq_len, args.max_seq_length = args.max_seq_length, None
    apply_foreign_args(args, parser.parse_args([]), sources)
    args.max_seq_length = seq_len
    if not args.pretrained_model_name_or_path:
        raise UserError("--pretrained_model_name_or_path is required (on the command line or in --config_file)")
    return args, sources


def conv_dim_of(args: argparse.Namespace) -> int | None:
    """--conv_dim, or conv_dim in --network_args as the trainer reads it; both given must agree."""
    from library.network_setup import network_args_dict

    listed = network_args_dict(args.network_args).get("conv_dim")
    try:
        from_network_args = int(listed) if listed is not None else None
    except ValueError:
        raise UserError(f"--network_args conv_dim={listed}: expected a whole number") from None
    if args.conv_dim is not None and from_network_args is not None and args.conv_dim != from_network_args:
        raise UserError(f"--conv_dim {args.conv_dim} and --network_args conv_dim={from_network_args} disagree; "
                        "keep one")
    return args.conv_dim if args.conv_dim is not None else from_network_args


def dataset_shape(args: argparse.Namespace, sources: dict[str, str], family: str,
                  positions: int | None) -> tuple[int, tuple[int, int], int, str | None]:  # fmt: skip
    """(batch size, resolution, tokens per sample, where they came from): of the --dataset_config dataset that
    needs the most memory (batch × pixels, or batch × tokens), else of the command line."""
    from library.families.llm import default_max_seq_length
    from library.train_setup import dataset_defaults

    defaults = dataset_defaults(args, sources)
    seq_len = args.max_seq_length or (default_max_seq_length(positions) if family == "llm" else 512)
    if not args.dataset_config or (family == "llm" and not args.dataset_config.endswith(".toml")):
        return defaults.batch_size, defaults.resolution, seq_len, None
    if family == "llm":
        from library.data.text_config import load_text_dataset_config, replace_max_seq_length

        group = replace_max_seq_length(load_text_dataset_config(args.dataset_config, defaults.batch_size),
                                       seq_len, positions)
        big = max(group.datasets, key=lambda d: d.batch_size * (d.max_seq_length or 0))
        where = f"{args.dataset_config} {big.name}: batch {big.batch_size} of {big.max_seq_length} tokens"
        return big.batch_size, defaults.resolution, big.max_seq_length or seq_len, where
    from library.dataset_config import load_dataset_config

    group = load_dataset_config(args.dataset_config, defaults)
    index, big = max(enumerate(group.datasets), key=lambda d: d[1].batch_size * math.prod(d[1].resolution))
    width, height = big.resolution
    where = f"{args.dataset_config} datasets[{index}]: batch {big.batch_size} at {width}x{height}"
    return big.batch_size, big.resolution, seq_len, where


def default_network_dim(family: str) -> int:
    """The rank train_network.py uses without --network_dim: the family's network_defaults, else networks.lora's."""
    from networks.lora import DEFAULT_DIM

    if family == "llm":
        from library.families.llm import NETWORK_DEFAULTS

        return int(NETWORK_DEFAULTS.get("network_dim", DEFAULT_DIM))
    return DEFAULT_DIM


def plan_from_args(args: argparse.Namespace, sources: dict[str, str] | None = None) -> tuple[PlanInput, str | None]:
    """The PlanInput of a (resolved) training command line, and which dataset set its batch and size."""
    if args.train_batch_size < 1 or (args.network_dim is not None and args.network_dim < 1):
        raise UserError("--train_batch_size and --network_dim must be at least 1")
    plan = PlanInput(
        model=args.pretrained_model_name_or_path, batch_size=args.train_batch_size,
        resolution=(512, 512), network_dim=args.network_dim or 1,  # both replaced below
        conv_dim=conv_dim_of(args), mixed_precision=args.mixed_precision or "no", full_half=args.full_bf16,
        gradient_checkpointing=args.gradient_checkpointing, cache_latents=args.cache_latents,
        no_half_vae=args.no_half_vae, train_text_encoder=not args.network_train_unet_only,
        optimizer=args.optimizer_type or "AdamW", cache_text_encoder_outputs=args.cache_text_encoder_outputs,
        model_config_dir=args.model_config_dir, tokenizer_cache_dir=args.tokenizer_cache_dir,
        allow_pickle=args.allow_pickle,
    )  # fmt: skip
    source = resolve_model(plan)
    batch, resolution, seq_len, where = dataset_shape(args, sources or {}, source.family, source.positions())
    plan = replace(plan, batch_size=batch, resolution=resolution, seq_len=seq_len)
    if args.network_dim is None:  # the model's family decides, as in training
        plan = replace(plan, network_dim=default_network_dim(source.family))
    return plan, where


def describe(est: Estimate) -> list[str]:
    rows = [
        ("frozen weights", est.weights),
        ("LoRA parameters", est.lora_params),
        ("LoRA gradients", est.gradients),
        ("optimizer state", est.optimizer_state),
        ("activations", est.activations),
        ("total", est.total),
    ]
    return [f"  {name:<18} {value / GiB:8.3f} GiB" for name, value in rows]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, sources = read_arguments(parser, argv)
        plan, where = plan_from_args(args, sources)
        source, est = plan_model(plan)
        fits = None if args.vram is None else est.total * SAFETY <= args.vram * GiB
        tips = suggestions(plan, args.vram, source.family) if fits is False else []
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        model = {"family": source.family, "configs": str(source.configs),
                 "single_file": str(source.file) if source.file else None}
        print(json.dumps({"input": asdict(plan), "model": model, "estimate": {**asdict(est), "total": est.total},
                          "fits": fits, "suggestions": [{"add": s, "total": e.total} for s, e in tips]},
                         indent=2))  # fmt: skip
        return 0
    if where:
        print(f"batch and size from {where} (the largest dataset)")
    print(f"estimate for {source.describe()}, rank {plan.network_dim}, {est.lora_param_count:,} LoRA parameters:")
    print("\n".join(describe(est)))
    if fits is not None:
        print(f"fits in {args.vram:g} GiB (with 10% margin): {'yes' if fits else 'no'}")
    for label, e in tips:
        ok = "fits" if e.total * SAFETY <= args.vram * GiB else "still too large"
        print(f"  + {label}: {e.total / GiB:.3f} GiB ({ok})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
