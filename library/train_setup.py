"""Building the pieces train_network.py's loop runs on, each from plain values.

Everything here happens once before the first step: accelerate settings, the model family,
the data, the network and its optimizer. Each function takes what it needs, not ``args``,
except the few adapters at the top that translate arguments into those values.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from library.accelerator import (
    AcceleratorSettings,
    LaunchContext,
    Setting,
    effective_log_with,
    read_tracker_config,
    resolve_accelerate_settings,
)
from library.args import ACCELERATE_SETTINGS, MODEL_CARD
from library.base_weights import base_weights_metadata
from library.dataset_config import DatasetDefaults, parse_resolution
from library.errors import UserError
from library.families import some_parameters_may_go_unused
from library.families.diffusion import NoiseSettings

# the network's setup lives in library/network_setup.py; these names stay importable from here
from library.network_setup import (  # noqa: F401
    LORAPLUS_ARGS,
    build_network,
    import_network_module,
    loraplus_ratios,
    network_args_dict,
)


def accelerator_settings(args: argparse.Namespace, sources: dict[str, str],
                         ctx: LaunchContext | None = None) -> tuple[AcceleratorSettings, dict[str, Setting]]:
    """Resolve precision / accumulation / dynamo by CONTRACTS.md §2 and collect the rest."""
    dynamo = args.dynamo_backend
    dynamo_source = sources["dynamo_backend"]
    if args.torch_compile and dynamo is None:
        dynamo, dynamo_source = "inductor", sources["torch_compile"]
    script = {name: Setting(getattr(args, name), sources[name]) for name in ACCELERATE_SETTINGS}
    script["dynamo_backend"] = Setting(dynamo, dynamo_source)
    resolved = resolve_accelerate_settings(script, ctx or LaunchContext.detect())
    precision = resolved["mixed_precision"]
    if args.full_bf16 and precision.value != "bf16":  # as resolved: unset, accelerate's flag, env or config file
        raise UserError(f"--full_bf16 keeps the LoRA in bf16, which needs mixed precision bf16; it is "
                        f"{precision.value} ({precision.source}). Add --mixed_precision bf16.")
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
        ddp_find_unused_parameters=some_parameters_may_go_unused(
            _model_type_or_sd(args), not args.network_train_unet_only, args.clip_skip, args.network_args or []),
        dynamo_backend=resolved["dynamo_backend"].value,
        dynamo_mode=resolved["dynamo_mode"].value,
        dynamo_fullgraph=resolved["dynamo_fullgraph"].value,
        dynamo_dynamic=resolved["dynamo_dynamic"].value,
        # first of all: a bad --log_tracker_config stops the run before any model loads or output is written
        tracker_init_kwargs=read_tracker_config(args.log_tracker_config, args.wandb_run_name,
                                                effective_log_with(args.log_with, args.logging_dir)),
    )
    return settings, resolved


def _model_type_or_sd(args: argparse.Namespace) -> str:
    from library.families import detect_model_type

    if args.model_type != "auto":
        return args.model_type
    try:
        return detect_model_type(args.pretrained_model_name_or_path, allow_pickle=args.allow_pickle)
    except (UserError, TypeError):  # no or no valid model: the run stops on it later, with its own message
        return "sd"


def noise_settings(args: argparse.Namespace) -> NoiseSettings:
    if args.adaptive_noise_scale is not None and not args.noise_offset:
        raise UserError(f"--adaptive_noise_scale {args.adaptive_noise_scale} adds to the offset noise: it needs "
                        "--noise_offset (e.g. --noise_offset 0.05).")
    if args.v_pred_like_loss and args.zero_terminal_snr:
        raise UserError(f"--v_pred_like_loss {args.v_pred_like_loss} with --zero_terminal_snr: the v-like term "
                        "grows without bound at the last timestep, where the SNR is 0; drop one of them.")
    return NoiseSettings(
        noise_offset=args.noise_offset,
        noise_offset_random_strength=args.noise_offset_random_strength,
        adaptive_noise_scale=args.adaptive_noise_scale,
        v_pred_like_loss=args.v_pred_like_loss,
        masked_loss=args.masked_loss,
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
        huber_schedule=args.huber_schedule,
        huber_scale=args.huber_scale,
        ip_noise_gamma=args.ip_noise_gamma,
        ip_noise_gamma_random_strength=args.ip_noise_gamma_random_strength,
        prior_loss_weight=args.prior_loss_weight,
    )


def dataset_defaults(args: argparse.Namespace, sources: dict[str, str] | None = None) -> DatasetDefaults:
    """The command line's dataset values: the lowest level of the dataset precedence. ``sources``: where each
    argument's value came from (library/config_file.py), so messages can name the flag or the config file."""
    resolution = parse_resolution(args.resolution) if args.resolution else DatasetDefaults.resolution
    return DatasetDefaults(
        sources=dict(sources or {}),
        resolution=resolution,
        batch_size=args.train_batch_size,
        enable_bucket=args.enable_bucket,
        min_bucket_reso=args.min_bucket_reso,
        max_bucket_reso=args.max_bucket_reso,
        bucket_reso_steps=args.bucket_reso_steps,
        bucket_no_upscale=args.bucket_no_upscale,
        validation_split=args.validation_split,
        validation_seed=args.validation_seed,
        caption_extension=args.caption_extension,
        shuffle_caption=args.shuffle_caption,
        keep_tokens=args.keep_tokens,
        keep_tokens_separator=args.keep_tokens_separator,
        caption_separator=args.caption_separator,
        secondary_separator=args.secondary_separator or "",
        enable_wildcard=args.enable_wildcard,
        caption_prefix=args.caption_prefix,
        caption_suffix=args.caption_suffix,
        caption_dropout_rate=args.caption_dropout_rate,
        caption_tag_dropout_rate=args.caption_tag_dropout_rate,
        caption_dropout_every_n_epochs=args.caption_dropout_every_n_epochs,
        flip_aug=args.flip_aug,
        color_aug=args.color_aug,
        random_crop=args.random_crop,
        resize_interpolation=args.resize_interpolation,
        alpha_mask=args.alpha_mask,
        train_data_dir=Path(args.train_data_dir) if args.train_data_dir else None,
        reg_data_dir=Path(args.reg_data_dir) if args.reg_data_dir else None,
        in_json=Path(args.in_json) if args.in_json else None,
        dataset_repeats=args.dataset_repeats,
    )


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


class TokenWeighting:
    """Token-weighted gradients for text: the mean loss over all label tokens of an optimizer step.

    Each micro-batch's mean loss is multiplied by its token count before backward (a sum), and
    at the step the gradients are divided by the step's token count over every micro-batch and
    process. accelerate divides each backward by the accumulation steps and DDP averages over
    processes, which the factor processes x accumulation / tokens undoes. Without this, batches
    with few label tokens would weigh as much as full ones, and 2 processes (or accumulation)
    would not equal one process with the whole batch. Image batches carry no token count and
    pass through unchanged. The weights are token counts over ``unit`` (the most label tokens a
    micro-batch can hold), so they stay at most 1: an fp16 loss scaler does not have to back off
    by the token count first.
    """

    def __init__(self, unit: float = 1.0) -> None:
        self.tokens = 0
        self.unit = float(unit)

    def weigh(self, loss: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        count = batch.get("num_label_tokens")
        if count is None:
            return loss
        self.tokens += int(count)
        return loss * (count / self.unit)

    def normalise(self, params: list[torch.nn.Parameter], accelerator: Any, accumulation: int) -> None:
        if not self.tokens:
            return
        total = torch.tensor([float(self.tokens)], device=accelerator.device)
        if accelerator.num_processes > 1:
            total = accelerator.reduce(total, reduction="sum")
        factor = accelerator.num_processes * accumulation * self.unit / max(total.item(), 1.0)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(factor)
        self.tokens = 0


@dataclass(frozen=True)
class StepPlan:
    """Steps and epochs as CONTRACTS.md §3 defines them."""

    batches_per_epoch: int  # per process
    steps_per_epoch: int  # optimizer steps
    max_train_steps: int
    num_epochs: int

    def resumed(self, start_epoch: int, skipped_steps: int, global_step: int) -> StepPlan:
        """The plan of a resumed run: enough epochs to reach max_train_steps from where the state left off
        (more than planned when --resume_allow_changes made the epochs hold more steps than before)."""
        remaining = max(0, self.max_train_steps - global_step + skipped_steps)
        return replace(self, num_epochs=max(self.num_epochs, start_epoch + math.ceil(remaining / self.steps_per_epoch)))


def plan_steps(batches_per_epoch: int, accumulation: int, max_train_steps: int,
               max_train_epochs: int | None) -> StepPlan:
    """Optimizer steps per epoch and in total; --max_train_epochs overrides --max_train_steps.

    ``batches_per_epoch`` (per process) comes from the sampler built with the same ``accumulation``
    (library/data/sampler.py), so every epoch is whole optimizer steps.
    """
    if batches_per_epoch == 0:
        raise UserError("The dataset yields no batches: check the image folders and batch_size.")
    if batches_per_epoch % accumulation:
        raise ValueError(f"{batches_per_epoch} batches per epoch are not whole optimizer steps of {accumulation} "
                         "micro-batches: the sampler was built without this gradient_accumulation_steps")
    steps_per_epoch = batches_per_epoch // accumulation
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


# --- the pieces the loop runs on, built from the arguments ---------------------------------------


def validation_loss(family: Any, network: torch.nn.Module, loader: Any, accelerator: Any,
                    max_batches: int | None) -> float:
    """Mean loss over held-out samples with fixed draws (epoch-0 keys), so values compare over time.

    Each process evaluates every num_processes-th batch and the sums are added up, so N GPUs share the
    work and report the value one process would."""
    from library.sampling import eval_mode

    # the frozen models too: one in training mode (transformers' own checkpointing) would add its dropout
    parts = [network, *(p for part in family.network_inputs() for p in (part if isinstance(part, list) else [part]))]
    modules = [m for m in parts if isinstance(m, torch.nn.Module)]
    with eval_mode(*modules):
        sums = validation_sums(family, loader, accelerator, max_batches, accelerator.process_index,
                               accelerator.num_processes)
    if accelerator.num_processes > 1:
        sums = accelerator.reduce(sums, reduction="sum")
    return (sums[0] / sums[1].clamp_min(1.0)).item()


def validation_sums(family: Any, loader: Any, accelerator: Any, max_batches: int | None, rank: int,
                    world: int) -> torch.Tensor:
    """(loss x weight, weight) summed over this process's share of the first ``max_batches`` batches."""
    import itertools

    from library.data.image_data import move_batch

    sums = torch.zeros(2, device=accelerator.device)
    with torch.no_grad(), accelerator.autocast():
        for index, batch in enumerate(itertools.islice(loader, max_batches)):
            if index % world != rank:
                continue
            # Text batches: weighted by their label tokens, so the value is the mean over every held-out token
            # whatever the batch size (as training's loss); image batches count one each.
            count = float(batch.get("num_label_tokens", 1))
            loss = family.loss(move_batch(batch, accelerator.device), 0).float()
            sums += torch.stack([loss * count, loss.new_tensor(count)])  # no device sync per batch
    return sums


def run_info(args: argparse.Namespace, *, network: Any, family: Any, data: Any, plan: StepPlan, optimizer: Any,
             mixed_precision: str, accumulation: int, num_processes: int, seed: int, output_name: str,
             net_kwargs: dict[str, str]):
    """The facts the ss_* metadata records."""
    from pathlib import Path

    from accelerate import PartialState

    from library.optim import effective_scheduler_name, optimizer_label, warmup_steps
    from library.train_metadata import SWITCHES, RunInfo, file_hashes, ranks_of_modules

    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
    dim, alpha = getattr(network, "lora_dim", args.network_dim or 4), args.network_alpha
    loras = [m for m in network.modules() if m is not network and hasattr(m, "lora_dim")]
    from_file = ranks_of_modules(loras) if args.dim_from_weights else None
    if from_file is not None:  # the file's ranks, not the command line's (which were not used)
        dim, alpha, conv = from_file
        net_kwargs = {key: value for key, value in net_kwargs.items() if key not in ("conv_dim", "conv_alpha")} | conv
    return RunInfo(
        network_module=args.network_module, network_dim=dim,
        network_alpha=alpha, network_args=net_kwargs, base_model_version=family.base_model_version,
        output_name=output_name, learning_rate=args.learning_rate, unet_lr=args.unet_lr,
        text_encoder_lr=args.text_encoder_lr, num_train_images=data.num_train_images,
        num_reg_images=data.num_reg_images, num_batches_per_epoch=plan.batches_per_epoch,
        num_epochs=plan.num_epochs, max_train_steps=plan.max_train_steps,
        lr_scheduler=effective_scheduler_name(inner, args.lr_scheduler, args.lr_scheduler_type),
        lr_warmup_steps=warmup_steps(args.lr_warmup_steps, plan.max_train_steps), optimizer=optimizer_label(
            inner, args.optimizer_args),
        mixed_precision=mixed_precision, seed=seed, gradient_accumulation_steps=accumulation,
        total_batch_size=data.batch_size * num_processes * accumulation, noise_offset=args.noise_offset,
        min_snr_gamma=args.min_snr_gamma, clip_skip=args.clip_skip, prior_loss_weight=args.prior_loss_weight,
        v2=getattr(family, "v2", False), v_parameterization=family.prediction_type == "v",
        resolution=data.resolution, model_name=Path(args.pretrained_model_name_or_path).name,
        training_comment=args.training_comment, datasets=data.metadata(), tag_frequency=data.tag_frequency(),
        model_card={key: value for key in MODEL_CARD if (value := getattr(args, f"metadata_{key}", None))},
        switches={name: getattr(args, name, None) for name in SWITCHES} | getattr(family, "metadata_switches", {}),
        base_weights=base_weights_metadata(args.base_weights, args.base_weights_multiplier),
        # read once, by the process that writes the files (a whole SDXL checkpoint takes seconds to hash)
        file_hashes=file_hashes(args.pretrained_model_name_or_path, args.vae) if PartialState().is_main_process
        else {},
    )


def learning_rates(lrs: list[float], names: list[str] | None) -> tuple[float, dict[str, float]]:
    """The step's main learning rate (the UNet's / model's first group) and ``lr/<group>`` for the trackers,
    as sd-scripts names them (``lr/textencoder``, ``lr/unet``, one per block or LoRA+ group)."""
    names = list(names or [])
    if len(names) != len(lrs):  # a network module without group descriptions
        names = ["unet"] if len(lrs) == 1 else [f"group{i}" for i in range(len(lrs))]
    logs = {f"lr/{name.replace(' ', '_')}": lr for name, lr in zip(names, lrs, strict=True)}
    main = next((lr for name, lr in zip(names, lrs, strict=True) if name.startswith("unet")), lrs[0])
    return main, logs


def run_seed(seed: int | None, resume: str | None, output_dir: Any, output_name: str, accelerator: Any) -> int:
    """--seed; else the resumed run's seed; else a random one, the same on every process."""
    if seed is not None:
        return seed
    if resume:
        from library.checkpoint import find_resume_state, read_state

        return int(read_state(find_resume_state(resume, output_dir, output_name))["seed"])
    import time

    from accelerate.utils import broadcast_object_list

    # each process would read its own clock: rank 0's choice is sent to all, or data orders would differ
    return int(broadcast_object_list([int(time.time()) % (2**31)])[0])
