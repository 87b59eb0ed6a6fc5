"""prepare_accelerator: the one place that builds ``accelerate.Accelerator``.

It also settles the most common confusion of kohya-style trainers: precision, gradient
accumulation and dynamo can be set by the script (CLI or TOML), by ``accelerate launch``
flags, by ``ACCELERATE_*`` variables or by ``accelerate config``'s YAML. Here an explicit
setting anywhere beats a default, two explicit settings that disagree stop the run naming
both, and a start-up table shows each effective value with its source (CONTRACTS.md §2).
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from library.errors import UserError

# accelerate setting → (environment variable, key in accelerate's YAML, launch flag, default)
_ACCELERATE_SOURCES: dict[str, tuple[str, str, str, str]] = {
    "mixed_precision": ("ACCELERATE_MIXED_PRECISION", "mixed_precision", "--mixed_precision", "no"),
    "gradient_accumulation_steps": ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "gradient_accumulation_steps",
                                    "--gradient_accumulation_steps", "1"),
    "dynamo_backend": ("ACCELERATE_DYNAMO_BACKEND", "dynamo_backend", "--dynamo_backend", "no"),
}


@dataclass(frozen=True)
class Setting:
    """One effective value and where it came from."""

    value: Any
    source: str


@dataclass(frozen=True)
class LaunchContext:
    """What the process can see of how accelerate launched it (injectable for tests)."""

    environ: dict[str, str]
    launch_argv: list[str] = field(default_factory=list)
    yaml_config: dict[str, Any] = field(default_factory=dict)
    yaml_path: str | None = None

    @staticmethod
    def detect() -> LaunchContext:
        """Read the environment, the launcher's command line and accelerate's config YAML."""
        environ = dict(os.environ)
        launch_argv = _parent_accelerate_argv()
        yaml_path = _flag_value(launch_argv, "--config_file") or _default_accelerate_yaml()
        yaml_config: dict[str, Any] = {}
        if yaml_path and Path(yaml_path).is_file() and "ACCELERATE_MIXED_PRECISION" in environ:
            import yaml

            try:
                yaml_config = yaml.safe_load(Path(yaml_path).read_text()) or {}
            except (OSError, yaml.YAMLError):
                yaml_config = {}
            if not isinstance(yaml_config, dict):  # not accelerate's YAML (e.g. a TOML given by mistake)
                yaml_config = {}
            yaml_config.update(yaml_config.pop("dynamo_config", {}) or {})
        return LaunchContext(environ, launch_argv, yaml_config, yaml_path)


def _parent_accelerate_argv() -> list[str]:
    """The command line of the ``accelerate launch`` process that started us, if any (Linux)."""
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return []
    argv = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    head = " ".join(argv[:4])
    return launcher_flags(argv, sys.argv[0]) if "accelerate" in head and "launch" in head else []


def launcher_flags(argv: list[str], script: str) -> list[str]:
    """``argv`` of ``accelerate launch`` up to the training script: the script's own arguments (its
    ``--config_file train.toml``, ``--mixed_precision``) are not accelerate's and must not be read as such."""
    start = argv.index("launch") + 1 if "launch" in argv else 0
    names = {script, os.path.abspath(script), os.path.basename(script)} if script else set()
    for i in range(start, len(argv)):
        arg = argv[i]
        if arg in names or os.path.abspath(arg) in names or (arg.endswith(".py") and not arg.startswith("-")):
            return argv[:i]
    return argv


def _default_accelerate_yaml() -> str | None:
    home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
    path = os.path.join(os.environ.get("ACCELERATE_CONFIG_DIR", os.path.join(home, "accelerate")),
                        "default_config.yaml")
    return path if os.path.isfile(path) else None


def _flag_value(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _normalise(name: str, value: Any) -> Any:
    if value is None:
        return None
    if name == "gradient_accumulation_steps":
        return int(value)
    return str(value).lower()


def _accelerate_side(name: str, ctx: LaunchContext) -> Setting | None:
    """The explicit value accelerate holds for a setting, or None when it only has its default."""
    env_name, yaml_key, flag, default = _ACCELERATE_SOURCES[name]
    flag_value = _flag_value(ctx.launch_argv, flag)
    if flag_value is not None:
        return Setting(_normalise(name, flag_value), f"accelerate launch {flag}")
    if ctx.yaml_config.get(yaml_key) is not None and ctx.launch_argv:
        return Setting(_normalise(name, ctx.yaml_config[yaml_key]), f"accelerate config {ctx.yaml_path}")
    env_value = ctx.environ.get(env_name)
    if env_value is None:
        return None
    # `accelerate launch` always exports its own default ("no"); that is not a user's choice.
    launched = bool(ctx.launch_argv) or "ACCELERATE_DYNAMO_MODE" in ctx.environ
    if launched and _normalise(name, env_value) == _normalise(name, default):
        return None
    return Setting(_normalise(name, env_value), f"environment {env_name}")


def resolve_accelerate_settings(script: dict[str, Setting], ctx: LaunchContext) -> dict[str, Setting]:
    """Merge the script's values with accelerate's by CONTRACTS.md §2.

    ``script`` maps each setting to the script's value (None when unset) and its source
    ("command line", "config file x.toml" or "default").
    """
    resolved: dict[str, Setting] = {}
    for name, (_, _, _, default) in _ACCELERATE_SOURCES.items():
        mine = script.get(name, Setting(None, "default"))
        mine = Setting(_normalise(name, mine.value), mine.source)
        theirs = _accelerate_side(name, ctx)
        explicit_mine = mine.value is not None and mine.source != "default"
        if explicit_mine and theirs is not None and theirs.value != mine.value:
            raise UserError(
                f"{name} is set twice with different values: {mine.value!r} from the script's {mine.source} "
                f"and {theirs.value!r} from {theirs.source}. Remove one of them."
            )
        if explicit_mine:
            resolved[name] = mine
        elif theirs is not None:
            resolved[name] = theirs
        elif mine.value is not None:
            resolved[name] = mine
        else:
            resolved[name] = Setting(_normalise(name, default), "default")
    return resolved


@dataclass(frozen=True)
class AcceleratorSettings:
    """Everything prepare_accelerator needs, as plain values."""

    mixed_precision: str = "no"
    gradient_accumulation_steps: int = 1
    log_with: str | None = None
    logging_dir: str | None = None
    log_prefix: str | None = None
    wandb_api_key: str | None = None
    ddp_timeout_minutes: int | None = None
    ddp_gradient_as_bucket_view: bool = False
    ddp_static_graph: bool = False
    # Some LoRA parameters may get no gradient in a step (a text encoder's layers past the one the model reads,
    # SDXL's encoder 1 and --clip_skip; module_dropout): DDP must then look for them, or it stops with
    # "Expected to have finished reduction in the prior iteration".
    ddp_find_unused_parameters: bool = False
    dynamo_backend: str = "no"
    dynamo_mode: str | None = None
    dynamo_fullgraph: bool = False
    dynamo_dynamic: bool = False
    cpu: bool = False


def logging_run_dir(logging_dir: str | None, log_prefix: str | None) -> str | None:
    """``{logging_dir}/{log_prefix}{YYYYmmddHHMMSS}`` as sd-scripts names tracker runs."""
    if logging_dir is None:
        return None
    stamp = datetime.datetime.now().strftime("%Y%m%d%H%M%S")
    return os.path.join(logging_dir, (log_prefix or "") + stamp)


def _kwargs_handlers(s: AcceleratorSettings, num_processes: int, cuda: bool) -> list:
    from accelerate import DistributedDataParallelKwargs, InitProcessGroupKwargs

    handlers: list = []
    if num_processes > 1:
        timeout = datetime.timedelta(minutes=s.ddp_timeout_minutes) if s.ddp_timeout_minutes else None
        handlers.append(InitProcessGroupKwargs(backend="nccl" if cuda else "gloo", timeout=timeout))
    find_unused = s.ddp_find_unused_parameters and not s.ddp_static_graph  # a static graph knows them already
    if s.ddp_gradient_as_bucket_view or s.ddp_static_graph or find_unused:
        handlers.append(DistributedDataParallelKwargs(
            gradient_as_bucket_view=s.ddp_gradient_as_bucket_view, static_graph=s.ddp_static_graph,
            find_unused_parameters=find_unused))
    return handlers


def _dynamo_plugin(s: AcceleratorSettings):
    from accelerate.utils import TorchDynamoPlugin

    backend = (s.dynamo_backend or "no").lower()
    if backend == "no":
        return TorchDynamoPlugin(backend="no")
    return TorchDynamoPlugin(backend=backend, mode=s.dynamo_mode or "default",
                             fullgraph=s.dynamo_fullgraph, dynamic=s.dynamo_dynamic)


def prepare_accelerator(s: AcceleratorSettings):
    """Build the Accelerator: process group, DDP options, dynamo plugin, trackers' folder."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin

    log_with = s.log_with
    if log_with is None and s.logging_dir is not None:
        log_with = "tensorboard"
    if log_with in ("tensorboard", "all") and s.logging_dir is None:
        raise UserError("Logging with tensorboard needs --logging_dir.")
    run_dir = logging_run_dir(s.logging_dir, s.log_prefix)
    if log_with in ("wandb", "all"):
        if run_dir:
            os.makedirs(run_dir, exist_ok=True)
            os.environ["WANDB_DIR"] = run_dir
        if s.wandb_api_key:
            import wandb

            wandb.login(key=s.wandb_api_key)
    num_processes = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and not s.cpu
    # A second training in the same process (tests, notebooks) may use another precision or dynamo
    # setting; accelerate keeps them in a singleton, so start it afresh (the process group stays).
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(
        mixed_precision=s.mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=s.gradient_accumulation_steps),
        log_with=log_with,
        project_dir=run_dir,
        kwargs_handlers=_kwargs_handlers(s, num_processes, cuda),
        dynamo_plugin=_dynamo_plugin(s),
        cpu=s.cpu,
    )


def settings_table(rows: dict[str, Setting]) -> str:
    """A small aligned table of effective settings and their sources, for the start-up log."""
    width = max(len(k) for k in rows)
    lines = [f"{'setting'.ljust(width)}  value  (source)"]
    lines += [f"{k.ljust(width)}  {v.value}  ({v.source})" for k, v in rows.items()]
    return "\n".join(lines)
