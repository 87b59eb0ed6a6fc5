"""Optimizers and learning-rate schedulers by kohya's names."""

from __future__ import annotations

import ast
import importlib
from typing import Any

import torch

from library.errors import UserError, did_you_mean

SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def parse_key_values(items: list[str] | None, what: str) -> dict[str, Any]:
    """``["a=1", "b=True", "c=x"]`` → {"a": 1, "b": True, "c": "x"} (Python literals, else strings)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"{what}: '{item}' is not key=value.")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = raw.strip()
    return out


def _bnb(name: str):
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UserError(f"--optimizer_type {name} needs bitsandbytes: pip install bitsandbytes") from None
    return bnb.optim


def _prodigy():
    try:
        from prodigyopt import Prodigy
    except ImportError:
        raise UserError("--optimizer_type Prodigy needs the prodigyopt package: pip install prodigyopt") from None
    return Prodigy


def _optimizer_class(name: str):
    lowered = name.lower()
    table = {
        "": lambda: torch.optim.AdamW,
        "adamw": lambda: torch.optim.AdamW,
        "adamw8bit": lambda: _bnb(name).AdamW8bit,
        "pagedadamw8bit": lambda: _bnb(name).PagedAdamW8bit,
        "lion8bit": lambda: _bnb(name).Lion8bit,
        "lion": lambda: _bnb(name).Lion,
        "prodigy": _prodigy,
        "sgd": lambda: torch.optim.SGD,
        "adafactor": lambda: importlib.import_module("transformers.optimization").Adafactor,
    }
    if lowered in table:
        return table[lowered]()
    if "." in name:
        module_name, _, class_name = name.rpartition(".")
        try:
            return getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as e:
            raise UserError(f"--optimizer_type {name}: cannot import it ({e}).") from None
    names = ["AdamW", "AdamW8bit", "PagedAdamW8bit", "Lion", "Lion8bit", "Prodigy", "SGD", "Adafactor"]
    raise UserError(f"--optimizer_type {name!r} is unknown{did_you_mean(name, names)}; "
                    f"use one of {', '.join(names)} or a dotted class path like torch.optim.RMSprop.")


def create_optimizer(param_groups: list[dict[str, Any]], optimizer_type: str, learning_rate: float,
                     optimizer_args: list[str] | None) -> torch.optim.Optimizer:
    """Instantiate the optimizer over the network's parameter groups."""
    if not any(group["params"] for group in param_groups):
        raise UserError("Every learning rate is 0 (or no module was wrapped): there is nothing to train. "
                        "Check --learning_rate, --unet_lr and --text_encoder_lr.")
    cls = _optimizer_class(optimizer_type)
    kwargs = parse_key_values(optimizer_args, "--optimizer_args")
    if cls is torch.optim.AdamW and torch.cuda.is_available():
        kwargs.setdefault("fused", True)  # one kernel over all LoRA tensors instead of hundreds
    lr: float | None = learning_rate
    if cls.__name__ == "Adafactor":
        # transformers' Adafactor refuses a manual lr with its own relative-step schedule
        kwargs.setdefault("relative_step", False)
        kwargs.setdefault("scale_parameter", False)
        if kwargs["relative_step"]:
            lr = None
            for group in param_groups:
                group.pop("lr", None)
    try:
        return cls(param_groups, lr=lr, **kwargs)
    except TypeError as e:
        raise UserError(f"--optimizer_args {optimizer_args}: {cls.__name__} rejects them ({e}).") from None


def warmup_steps(lr_warmup_steps: float, total_steps: int) -> int:
    """kohya semantics: an integer count, or a ratio of the total when below 1."""
    if 0 < lr_warmup_steps < 1:
        return int(lr_warmup_steps * total_steps)
    return int(lr_warmup_steps)


def custom_scheduler(optimizer: torch.optim.Optimizer, scheduler_type: str, scheduler_args: list[str] | None,
                     lr_warmup_steps: float):
    """``--lr_scheduler_type``: any scheduler class, by dotted path or by its name in torch.optim.lr_scheduler."""
    if lr_warmup_steps:
        raise UserError(f"--lr_warmup_steps does not apply to --lr_scheduler_type {scheduler_type}, which makes the "
                        "whole schedule (as in sd-scripts): remove it, or give the class its own warmup arguments.")
    module_name, _, class_name = scheduler_type.rpartition(".")
    try:
        module = importlib.import_module(module_name) if module_name else torch.optim.lr_scheduler
    except ImportError as e:
        raise UserError(f"--lr_scheduler_type {scheduler_type}: cannot import it ({e}).") from None
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        names = [n for n, v in vars(module).items() if isinstance(v, type) and not n.startswith("_")]
        raise UserError(f"--lr_scheduler_type {scheduler_type}: {module.__name__} has no class {class_name!r}"
                        f"{did_you_mean(class_name, names)}.")
    kwargs = parse_key_values(scheduler_args, "--lr_scheduler_args")
    try:
        return cls(optimizer, **kwargs)
    except TypeError as e:
        raise UserError(f"--lr_scheduler_args {scheduler_args or []}: {cls.__name__} rejects them ({e}).") from None


def create_scheduler(optimizer: torch.optim.Optimizer, name: str, total_steps: int, lr_warmup_steps: float,
                     num_cycles: int = 1, power: float = 1.0, scheduler_type: str = "",
                     scheduler_args: list[str] | None = None):
    """A diffusers LR scheduler stepping once per optimizer step; ``scheduler_type`` replaces it by any class."""
    from diffusers.optimization import get_scheduler

    if scheduler_type:
        return custom_scheduler(optimizer, scheduler_type, scheduler_args, lr_warmup_steps)
    if name not in SCHEDULERS:
        raise UserError(f"--lr_scheduler {name!r} is unknown{did_you_mean(name, SCHEDULERS)}; "
                        f"use one of {', '.join(SCHEDULERS)}.")
    warmup = warmup_steps(lr_warmup_steps, total_steps)
    if warmup and name == "constant":
        name = "constant_with_warmup"  # sd-scripts users expect warmup to apply to "constant" too
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
                         num_cycles=num_cycles, power=power)
