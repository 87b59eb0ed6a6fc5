"""Optimizers and learning-rate schedulers by kohya's names."""

from __future__ import annotations

import ast
import importlib
import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch

from library.errors import UserError, did_you_mean

logger = logging.getLogger(__name__)

SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
              "piecewise_constant", "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay", "adafactor")
# diffusers has these; the rest of SCHEDULERS (but adafactor) come from transformers, as in sd-scripts
_DIFFUSERS_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                         "polynomial", "piecewise_constant")

OPTIMIZERS = ("AdamW", "AdamW8bit", "PagedAdamW", "PagedAdamW8bit", "PagedAdamW32bit", "Lion", "Lion8bit",
              "PagedLion8bit", "AdEMAMix8bit", "PagedAdEMAMix8bit", "SGD", "SGDNesterov", "SGDNesterov8bit",
              "Prodigy", "DAdaptation", "DAdaptAdamPreprint", "DAdaptAdaGrad", "DAdaptAdam", "DAdaptAdan",
              "DAdaptAdanIP", "DAdaptLion", "DAdaptSGD", "Adafactor")
_BNB = {name.lower(): name for name in ("AdamW8bit", "PagedAdamW", "PagedAdamW8bit", "PagedAdamW32bit", "Lion",
                                        "Lion8bit", "PagedLion8bit", "AdEMAMix8bit", "PagedAdEMAMix8bit")}
# sd-scripts' names → (module of the dadaptation package, class)
_DADAPT = {"dadaptadampreprint": ("dadaptation.experimental", "DAdaptAdamPreprint"),
           "dadaptadagrad": ("dadaptation", "DAdaptAdaGrad"), "dadaptadam": ("dadaptation", "DAdaptAdam"),
           "dadaptadan": ("dadaptation", "DAdaptAdan"), "dadaptadanip": ("dadaptation.experimental", "DAdaptAdanIP"),
           "dadaptlion": ("dadaptation", "DAdaptLion"), "dadaptsgd": ("dadaptation", "DAdaptSGD")}
# Nesterov momentum needs a momentum; sd-scripts sets 0.9 when none is given
_NESTEROV = {"nesterov": True, "momentum": 0.9}


def parse_key_values(items: list[str] | None, what: str) -> dict[str, Any]:
    """``["a=1", "b=True", "c=x"]`` → {"a": 1, "b": True, "c": "x"} (Python literals, else strings).

    Empty items are skipped: GUI configs write ``optimizer_args = ""`` for none.
    """
    out: dict[str, Any] = {}
    for item in items or []:
        if not item.strip():
            continue
        if "=" not in item:
            raise UserError(f"{what}: '{item}' is not key=value.")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = raw.strip()
    return out


def _bnb(name: str, class_name: str) -> type:
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UserError(f"--optimizer_type {name} needs bitsandbytes: pip install bitsandbytes") from None
    cls = getattr(bnb.optim, class_name, None)
    if cls is None:
        raise UserError(f"--optimizer_type {name}: bitsandbytes {getattr(bnb, '__version__', '?')} has no "
                        f"{class_name}; pip install -U bitsandbytes.")
    return cls


def _prodigy() -> type:
    try:
        from prodigyopt import Prodigy
    except ImportError:
        raise UserError("--optimizer_type Prodigy needs the prodigyopt package: pip install prodigyopt") from None
    return Prodigy


def _dadaptation(name: str, lowered: str) -> type:
    try:
        import dadaptation
    except ImportError:
        raise UserError(f"--optimizer_type {name} needs the dadaptation package: pip install dadaptation") from None
    if lowered == "dadaptation":
        # sd-scripts: the preprint's Adam (dadaptation 3's experimental module); before 3.0 that was DAdaptAdam
        try:
            return importlib.import_module("dadaptation.experimental").DAdaptAdamPreprint
        except (ImportError, AttributeError):
            return dadaptation.DAdaptAdam
    module_name, class_name = _DADAPT[lowered]
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        raise UserError(f"--optimizer_type {name}: this dadaptation package has no {class_name} (it came with "
                        "dadaptation 3.0): pip install -U dadaptation") from None


def _optimizer_class(name: str) -> tuple[type, dict[str, Any]]:
    """The class for ``--optimizer_type`` and the arguments its name implies (``--optimizer_args`` win)."""
    lowered = name.lower()
    if lowered in ("", "adamw"):
        return torch.optim.AdamW, {}
    if lowered in _BNB:
        return _bnb(name, _BNB[lowered]), {}
    if lowered == "sgd":
        return torch.optim.SGD, {}
    if lowered == "sgdnesterov":
        return torch.optim.SGD, dict(_NESTEROV)
    if lowered == "sgdnesterov8bit":
        return _bnb(name, "SGD8bit"), dict(_NESTEROV)
    if lowered == "prodigy":
        return _prodigy(), {}
    if lowered == "dadaptation" or lowered in _DADAPT:
        return _dadaptation(name, lowered), {}
    if lowered == "adafactor":
        return importlib.import_module("transformers.optimization").Adafactor, {}
    if "." in name:
        module_name, _, class_name = name.rpartition(".")
        try:
            return getattr(importlib.import_module(module_name), class_name), {}
        except (ImportError, AttributeError) as e:
            raise UserError(f"--optimizer_type {name}: cannot import it ({e}).") from None
    raise UserError(f"--optimizer_type {name!r} is unknown{did_you_mean(name, OPTIMIZERS)}; "
                    f"use one of {', '.join(OPTIMIZERS)} or a dotted class path like torch.optim.RMSprop.")


def _adafactor_settings(kwargs: dict[str, Any], param_groups: list[dict[str, Any]]) -> bool:
    """sd-scripts' Adafactor rules; True when Adafactor's relative step replaces the learning rate.

    Without relative_step this project runs Adafactor on the given learning rate (scale_parameter off).
    warmup_init needs relative_step, so it turns it on, as in sd-scripts; with relative_step the
    defaults are transformers' (scale_parameter on), which sd-scripts uses.
    """
    if kwargs.get("warmup_init") and kwargs.get("relative_step") is False:
        logger.warning("--optimizer_args warmup_init=True needs relative_step=True: using relative_step=True "
                       "(as sd-scripts).")
        kwargs["relative_step"] = True
    kwargs.setdefault("relative_step", bool(kwargs.get("warmup_init")))
    kwargs.setdefault("scale_parameter", bool(kwargs["relative_step"]))
    if not kwargs["relative_step"]:
        return False
    rates = {group["lr"] for group in param_groups if group.get("lr") is not None}
    lost = (f" The groups' different rates ({', '.join(f'{r:g}' for r in sorted(rates))}: --unet_lr / "
            "--text_encoder_lr, LoRA+ ratios or block lr weights) are lost too: every group gets the same "
            "relative step." if len(rates) > 1 else "")
    logger.warning("Adafactor relative_step=True: Adafactor sets its own step size, so --learning_rate, "
                   "--unet_lr and --text_encoder_lr are not used (as sd-scripts).%s", lost)
    for group in param_groups:
        group.pop("lr", None)
    return True


def _warn_learning_rate_far_from_one(cls: type, param_groups: list[dict[str, Any]], learning_rate: float) -> None:
    """D-Adaptation and Prodigy estimate the step size; their lr multiplies it and wants about 1 (sd-scripts)."""
    if not (cls.__name__.startswith("DAdapt") or cls.__name__ == "Prodigy"):
        return
    lowest = min((group.get("lr", learning_rate) for group in param_groups), default=learning_rate)
    if lowest <= 0.1:
        logger.warning("--optimizer_type %s: learning rate %g is too low; D-Adaptation and Prodigy expect about "
                       "1.0 (e.g. --learning_rate 1, and --unet_lr / --text_encoder_lr 1 or left out).",
                       cls.__name__, lowest)


def create_optimizer(param_groups: list[dict[str, Any]], optimizer_type: str, learning_rate: float,
                     optimizer_args: list[str] | None) -> torch.optim.Optimizer:
    """Instantiate the optimizer over the network's parameter groups."""
    if not any(group["params"] for group in param_groups):
        raise UserError("Every learning rate is 0 (or no module was wrapped): there is nothing to train. "
                        "Check --learning_rate, --unet_lr and --text_encoder_lr.")
    cls, implied = _optimizer_class(optimizer_type)
    kwargs = implied | parse_key_values(optimizer_args, "--optimizer_args")
    if cls is torch.optim.AdamW and torch.cuda.is_available():
        kwargs.setdefault("fused", True)  # one kernel over all LoRA tensors instead of hundreds
    lr: float | None = learning_rate
    if cls.__name__ == "Adafactor" and _adafactor_settings(kwargs, param_groups):
        lr = None  # transformers refuses a manual lr with its relative step
    _warn_learning_rate_far_from_one(cls, param_groups, learning_rate)
    try:
        return cls(param_groups, lr=lr, **kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"--optimizer_args {' '.join(optimizer_args or []) or '(none)'}: {cls.__name__} "
                        f"(--optimizer_type {optimizer_type or 'AdamW'}) rejects them ({e}).") from None


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


def adafactor_relative_step(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` is transformers' Adafactor computing its own step size (no learning rate)."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    return type(optimizer).__name__ == "Adafactor" and bool(optimizer.defaults.get("relative_step"))


def effective_scheduler_name(optimizer: torch.optim.Optimizer, name: str, scheduler_type: str = "") -> str:
    """The schedule a run uses, for its records: Adafactor's relative step replaces --lr_scheduler."""
    if scheduler_type:
        return scheduler_type
    return "adafactor" if adafactor_relative_step(optimizer) else name


class AdafactorSchedule(torch.optim.lr_scheduler.LRScheduler):
    """Reports the step size Adafactor's relative step sets (``--lr_scheduler adafactor``); schedules nothing.

    transformers' AdafactorSchedule leaves out groups whose first tensor has no gradient, which shifts
    the other groups' rates onto the wrong names (a text encoder that stopped training); this one
    reports every group.
    """

    def get_lr(self) -> list[float]:
        optimizer: Any = self.optimizer
        lrs = []
        for group in optimizer.param_groups:
            state = optimizer.state.get(group["params"][0])
            if state and "step" in state:
                lrs.append(float(optimizer._get_lr(group, state)))
            else:  # before the first step: step 1's relative step size, the parameter scale aside
                lrs.append(1e-6 if group["warmup_init"] else 1e-2)
        return lrs


def _adafactor_schedule(optimizer: torch.optim.Optimizer, name: str, warmup: int,
                        kwargs: dict[str, Any]) -> AdafactorSchedule:
    if not adafactor_relative_step(optimizer):
        raise UserError("--lr_scheduler adafactor reports the step size of Adafactor's relative step: use it with "
                        "--optimizer_type Adafactor --optimizer_args relative_step=True, or choose another "
                        "--lr_scheduler.")
    if name != "adafactor":
        logger.warning("Adafactor relative_step=True makes its own schedule: --lr_scheduler %s is replaced by "
                       "adafactor (as sd-scripts).", name)
    if warmup:
        raise UserError(f"--lr_warmup_steps {warmup}: Adafactor with relative_step=True makes its own schedule "
                        "(warmup_init=True is its warmup); remove --lr_warmup_steps (sd-scripts refuses it too).")
    if kwargs:
        raise UserError(f"--lr_scheduler_args {' '.join(kwargs)}: the adafactor schedule takes no arguments.")
    return AdafactorSchedule(optimizer)


def _schedule_function(name: str) -> Callable[..., Any]:
    if name in _DIFFUSERS_SCHEDULERS:
        from diffusers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType
    else:
        from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType
    return TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]


def _flag_arguments(name: str, total_steps: int, warmup: int, num_cycles: int,
                    power: float) -> dict[str, tuple[Any, str]]:
    """The keywords sd-scripts fills from its flags for the named schedule: keyword → (value, flag)."""
    out: dict[str, tuple[Any, str]] = {}
    if name not in ("constant", "piecewise_constant"):
        out["num_warmup_steps"] = (warmup, "--lr_warmup_steps")
    if name in ("linear", "cosine", "cosine_with_restarts", "polynomial", "cosine_with_min_lr"):
        out["num_training_steps"] = (total_steps, "--max_train_steps")
    if name == "cosine_with_restarts":
        out["num_cycles"] = (num_cycles, "--lr_scheduler_num_cycles")
    if name in ("cosine_with_min_lr", "warmup_stable_decay"):  # sd-scripts: half cosines, 1 = one decay
        out["num_cycles"] = (num_cycles / 2, "--lr_scheduler_num_cycles")
    if name == "polynomial":
        out["power"] = (power, "--lr_scheduler_power")
    return out


def _check_scheduler_kwargs(name: str, func: Callable[..., Any], flagged: dict[str, tuple[Any, str]],
                            kwargs: dict[str, Any]) -> None:
    accepted = [p for p in inspect.signature(func).parameters if p != "optimizer" and p not in flagged]
    for key, value in kwargs.items():
        if key in flagged:
            raise UserError(f"--lr_scheduler_args {key}={value!r}: --lr_scheduler {name} takes {key} from "
                            f"{flagged[key][1]}; set it there instead.")
        if key not in accepted:
            raise UserError(f"--lr_scheduler_args {key}={value!r}: --lr_scheduler {name} has no argument {key!r}"
                            f"{did_you_mean(key, accepted)}; it takes {', '.join(accepted) or 'none'}.")


def _scheduler_defaults(name: str, total_steps: int, warmup: int, kwargs: dict[str, Any],
                        min_lr_ratio: float | None, decay_steps: float, timescale: int | None) -> dict[str, Any]:
    """Keywords with no flag of their own here: what sd-scripts passes, unless --lr_scheduler_args sets them."""
    out: dict[str, Any] = {}
    if name == "piecewise_constant":
        if "step_rules" not in kwargs:
            raise UserError('--lr_scheduler piecewise_constant needs its rules: --lr_scheduler_args '
                            'step_rules="1:100,0.5:200,0.1" (lr × 1 until step 100, × 0.5 until step 200, then × 0.1).')
        out["step_rules"] = str(kwargs["step_rules"])  # "0.5" alone would reach diffusers as a float
    if name == "inverse_sqrt" and timescale is not None:
        out["timescale"] = timescale
    if name == "cosine_with_min_lr" and "min_lr" not in kwargs and "min_lr_rate" not in kwargs:
        if min_lr_ratio is None:
            raise UserError("--lr_scheduler cosine_with_min_lr needs its floor: --lr_scheduler_args min_lr_rate=0.1 "
                            "(a fraction of the learning rate) or min_lr=1e-6.")
        out["min_lr_rate"] = min_lr_ratio
    if name == "warmup_stable_decay":
        decay = warmup_steps(kwargs.get("num_decay_steps", decay_steps), total_steps)  # a ratio when below 1
        stable = kwargs.get("num_stable_steps", total_steps - warmup - decay)
        if stable < 0:
            raise UserError(f"--lr_scheduler warmup_stable_decay: {warmup} warmup + {decay} decay steps exceed the "
                            f"{total_steps} training steps.")
        out.update(num_decay_steps=decay, num_stable_steps=stable,
                   min_lr_ratio=kwargs.get("min_lr_ratio", min_lr_ratio or 0.0))
    return kwargs | out


def create_scheduler(optimizer: torch.optim.Optimizer, name: str, total_steps: int, lr_warmup_steps: float,
                     num_cycles: int = 1, power: float = 1.0, scheduler_type: str = "",
                     scheduler_args: list[str] | None = None, *, min_lr_ratio: float | None = None,
                     decay_steps: float = 0, timescale: int | None = None):
    """The LR scheduler, stepping once per optimizer step.

    ``name`` is one of SCHEDULERS (diffusers' and transformers' get_scheduler names, and adafactor),
    given the flags sd-scripts passes and ``scheduler_args`` as further keywords, or replaced by any
    class with ``scheduler_type``. ``min_lr_ratio``, ``decay_steps`` (a ratio when below 1) and
    ``timescale`` are sd-scripts' --lr_scheduler_min_lr_ratio, --lr_decay_steps and
    --lr_scheduler_timescale. Adafactor with relative_step always gets the adafactor schedule.
    """
    if scheduler_type:
        if adafactor_relative_step(optimizer):
            raise UserError(f"--lr_scheduler_type {scheduler_type} cannot schedule Adafactor with relative_step=True, "
                            "which has no learning rate: leave --lr_scheduler_type out, or use relative_step=False.")
        return custom_scheduler(optimizer, scheduler_type, scheduler_args, lr_warmup_steps)
    if name not in SCHEDULERS:
        raise UserError(f"--lr_scheduler {name!r} is unknown{did_you_mean(name, SCHEDULERS)}; "
                        f"use one of {', '.join(SCHEDULERS)}.")
    warmup = warmup_steps(lr_warmup_steps, total_steps)
    kwargs = parse_key_values(scheduler_args, "--lr_scheduler_args")
    if effective_scheduler_name(optimizer, name) == "adafactor":
        return _adafactor_schedule(optimizer, name, warmup, kwargs)
    if warmup and name == "constant":
        name = "constant_with_warmup"  # sd-scripts users expect warmup to apply to "constant" too
    if warmup and name == "piecewise_constant":
        logger.warning("--lr_warmup_steps %d: piecewise_constant has no warmup (its step_rules make the whole "
                       "schedule), so it is not used (as sd-scripts).", warmup)
    func = _schedule_function(name)
    flagged = _flag_arguments(name, total_steps, warmup, num_cycles, power)
    _check_scheduler_kwargs(name, func, flagged, kwargs)
    kwargs = _scheduler_defaults(name, total_steps, warmup, kwargs, min_lr_ratio, decay_steps, timescale)
    try:
        return func(optimizer, **{key: value for key, (value, _) in flagged.items()}, **kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"--lr_scheduler {name} --lr_scheduler_args {' '.join(scheduler_args or [])}: "
                        f"the scheduler rejects them ({e}).") from None


def optimizer_label(optimizer: Any, optimizer_args: list[str] | None) -> str:
    """``ss_optimizer`` as sd-scripts writes it: the class's module path and name, then its ``--optimizer_args``
    in parentheses (``prodigyopt.prodigy.Prodigy(decouple=True,d_coef=2)``), so the settings travel with the
    file."""
    cls = type(optimizer)
    extra = ",".join(a.strip() for a in optimizer_args or [])
    return f"{cls.__module__}.{cls.__name__}" + (f"({extra})" if extra else "")
