"""Building the pieces train_network.py's loop runs on, each from plain values.

Everything here happens once before the first step: accelerate settings, the model family,
the data, the network and its optimizer. Each function takes what it needs, not ``args``,
except the few adapters at the top that translate arguments into those values.
"""

from __future__ import annotations

import argparse
import importlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from library.accelerator import AcceleratorSettings, LaunchContext, Setting, resolve_accelerate_settings
from library.dataset_config import DatasetDefaults, parse_resolution
from library.errors import UserError
from library.families.diffusion import NoiseSettings


def accelerator_settings(args: argparse.Namespace, sources: dict[str, str],
                         ctx: LaunchContext | None = None) -> tuple[AcceleratorSettings, dict[str, Setting]]:
    """Resolve precision / accumulation / dynamo by CONTRACTS.md §2 and collect the rest."""
    dynamo = args.dynamo_backend
    dynamo_source = sources["dynamo_backend"]
    if args.torch_compile and dynamo is None:
        dynamo, dynamo_source = "inductor", sources["torch_compile"]
    script = {
        "mixed_precision": Setting(args.mixed_precision, sources["mixed_precision"]),
        "gradient_accumulation_steps": Setting(args.gradient_accumulation_steps,
                                               sources["gradient_accumulation_steps"]),
        "dynamo_backend": Setting(dynamo, dynamo_source),
    }
    resolved = resolve_accelerate_settings(script, ctx or LaunchContext.detect())
    settings = AcceleratorSettings(
        mixed_precision=resolved["mixed_precision"].value,
        gradient_accumulation_steps=int(resolved["gradient_accumulation_steps"].value),
        log_with=args.log_with,
        logging_dir=args.logging_dir,
        log_prefix=args.log_prefix,
        wandb_api_key=args.wandb_api_key,
        ddp_timeout_minutes=args.ddp_timeout,
        ddp_gradient_as_bucket_view=args.ddp_gradient_as_bucket_view,
        ddp_static_graph=args.ddp_static_graph,
        dynamo_backend=resolved["dynamo_backend"].value,
        dynamo_mode=args.dynamo_mode,
        dynamo_fullgraph=args.dynamo_fullgraph,
        dynamo_dynamic=args.dynamo_dynamic,
    )
    return settings, resolved


def noise_settings(args: argparse.Namespace) -> NoiseSettings:
    return NoiseSettings(
        noise_offset=args.noise_offset,
        noise_offset_random_strength=args.noise_offset_random_strength,
        multires_noise_iterations=args.multires_noise_iterations,
        multires_noise_discount=args.multires_noise_discount,
        debiased_estimation_loss=args.debiased_estimation_loss,
        scale_v_pred_loss_like_noise_pred=args.scale_v_pred_loss_like_noise_pred,
        zero_terminal_snr=args.zero_terminal_snr,
        min_timestep=args.min_timestep or 0,
        max_timestep=args.max_timestep or 1000,
        min_snr_gamma=args.min_snr_gamma,
        loss_type=args.loss_type,
        huber_c=args.huber_c,
        prior_loss_weight=args.prior_loss_weight,
    )


def dataset_defaults(args: argparse.Namespace) -> DatasetDefaults:
    """The command line's dataset values: the lowest level of the dataset precedence."""
    resolution = parse_resolution(args.resolution) if args.resolution else DatasetDefaults.resolution
    return DatasetDefaults(
        resolution=resolution,
        batch_size=args.train_batch_size,
        enable_bucket=args.enable_bucket,
        min_bucket_reso=args.min_bucket_reso,
        max_bucket_reso=args.max_bucket_reso,
        bucket_reso_steps=args.bucket_reso_steps,
        bucket_no_upscale=args.bucket_no_upscale,
        caption_extension=args.caption_extension,
        shuffle_caption=args.shuffle_caption,
        keep_tokens=args.keep_tokens,
        caption_dropout_rate=args.caption_dropout_rate,
        caption_tag_dropout_rate=args.caption_tag_dropout_rate,
        caption_dropout_every_n_epochs=args.caption_dropout_every_n_epochs,
        flip_aug=args.flip_aug,
        color_aug=args.color_aug,
        random_crop=args.random_crop,
        train_data_dir=Path(args.train_data_dir) if args.train_data_dir else None,
        reg_data_dir=Path(args.reg_data_dir) if args.reg_data_dir else None,
    )


def import_network_module(name: str):
    """Import a --network_module and check it provides kohya's contract (CONTRACTS.md §5)."""
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        raise UserError(f"--network_module {name}: cannot import it ({e}).") from None
    for required in ("create_network", "create_network_from_weights"):
        if not hasattr(module, required):
            raise UserError(f"--network_module {name} has no {required}(); it must provide kohya's network API.")
    return module


def network_args_dict(items: list[str] | None) -> dict[str, str]:
    """``--network_args k=v ...`` as strings, which is how network modules receive them."""
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--network_args: '{item}' is not key=value.")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


class TrainingModule(torch.nn.Module):
    """The network plus the family's loss, as one module for accelerate/DDP to wrap.

    Only ``network`` is a registered child: the frozen base models live in ``family``, which
    is a plain object, so DDP broadcasts and all-reduces the LoRA parameters alone.
    """

    def __init__(self, network: torch.nn.Module, family: Any) -> None:
        super().__init__()
        self.network = network
        self.family = family

    def forward(self, batch: dict[str, Any], epoch: int) -> torch.Tensor:
        return self.family.loss(batch, epoch)


class Throughput:
    """Samples (and tokens, for text) per second between optimizer steps, across all processes."""

    def __init__(self) -> None:
        import time

        self._clock = time.perf_counter
        self._start = self._clock()
        self.samples = 0
        self.tokens = 0

    def add(self, batch: dict[str, Any]) -> None:
        self.samples += len(batch["indices"])
        if "input_ids" in batch:
            self.tokens += batch["input_ids"].numel()

    def rates(self, num_processes: int) -> dict[str, float]:
        """The rates since the last call, scaled to all processes (they run the same batch size)."""
        now = self._clock()
        elapsed = max(now - self._start, 1e-9)
        out = {"throughput/samples_per_s": self.samples * num_processes / elapsed}
        if self.tokens:
            out["throughput/tokens_per_s"] = self.tokens * num_processes / elapsed
        self._start, self.samples, self.tokens = now, 0, 0
        return out


@dataclass(frozen=True)
class StepPlan:
    """Steps and epochs as CONTRACTS.md §3 defines them."""

    batches_per_epoch: int  # per process
    steps_per_epoch: int  # optimizer steps
    max_train_steps: int
    num_epochs: int


def plan_steps(batches_per_epoch: int, accumulation: int, max_train_steps: int,
               max_train_epochs: int | None) -> StepPlan:
    """Optimizer steps per epoch and in total; --max_train_epochs overrides --max_train_steps."""
    if batches_per_epoch == 0:
        raise UserError("The dataset yields no batches: check the image folders and batch_size.")
    steps_per_epoch = math.ceil(batches_per_epoch / accumulation)
    if max_train_epochs:
        max_train_steps = max_train_epochs * steps_per_epoch
    if max_train_steps <= 0:
        raise UserError(f"--max_train_steps {max_train_steps}: the run would train zero steps.")
    return StepPlan(batches_per_epoch, steps_per_epoch, max_train_steps, math.ceil(max_train_steps / steps_per_epoch))


def weight_dtype_for(mixed_precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def save_dtype_for(save_precision: str | None, default: torch.dtype) -> torch.dtype:
    table = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    return table[save_precision] if save_precision else default


def describe_run(lines: dict[str, Any]) -> str:
    width = max(len(k) for k in lines)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in lines.items())
