"""prepare_accelerator: the one place that builds ``accelerate.Accelerator``.

It also settles the most common confusion of kohya-style trainers: precision, gradient
accumulation and dynamo can be set by the script (CLI or TOML), by ``accelerate launch``
flags, by ``ACCELERATE_*`` variables or by ``accelerate config``'s YAML. Here an explicit
setting anywhere beats a default, two explicit settings that disagree stop the run naming
both, and a start-up table shows each effective value with its source (CONTRACTS.md §2).
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from library.errors import UserError, did_you_mean

logger = logging.getLogger(__name__)

# accelerate setting → (environment variable, key in accelerate's YAML or None, launch flag, default).
# accelerate's YAML has no gradient_accumulation_steps (only DeepSpeed's nested config does), so none is read.
_ACCELERATE_SOURCES: dict[str, tuple[str, str | None, str, str]] = {
    "mixed_precision": ("ACCELERATE_MIXED_PRECISION", "mixed_precision", "--mixed_precision", "no"),
    "gradient_accumulation_steps": ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", None,
                                    "--gradient_accumulation_steps", "1"),
    "dynamo_backend": ("ACCELERATE_DYNAMO_BACKEND", "dynamo_backend", "--dynamo_backend", "no"),
    "dynamo_mode": ("ACCELERATE_DYNAMO_MODE", "dynamo_mode", "--dynamo_mode", "default"),
    "dynamo_fullgraph": ("ACCELERATE_DYNAMO_USE_FULLGRAPH", "dynamo_use_fullgraph", "--dynamo_use_fullgraph",
                         "false"),
    "dynamo_dynamic": ("ACCELERATE_DYNAMO_USE_DYNAMIC", "dynamo_use_dynamic", "--dynamo_use_dynamic", "false"),
}
# Launch switches without a value (present = true).
_BOOLEAN_SETTINGS = frozenset({"dynamo_fullgraph", "dynamo_dynamic"})
# Variables `accelerate launch` always exports with its own default; ACCELERATE_GRADIENT_ACCUMULATION_STEPS is
# only exported for DeepSpeed when given, so it is always someone's choice.
_LAUNCHER_EXPORTS = frozenset(_ACCELERATE_SOURCES) - {"gradient_accumulation_steps"}
# torch.compile's modes: accelerate's launch choices and the one torch added later.
DYNAMO_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class Setting:
    """One effective value and where it came from."""

    value: Any
    source: str


@dataclass(frozen=True)
class LaunchContext:
    """What the process can see of how accelerate launched it (injectable for tests).

    ``launched``: True / False when known (Linux reads the parent's command line), None when it must be
    guessed from the variables the launcher exports. ``launcher_environ``: the environment of the
    ``accelerate launch`` process itself, i.e. what the user exported before the launcher overwrote it.
    """

    environ: dict[str, str]
    launch_argv: list[str] = field(default_factory=list)
    yaml_config: dict[str, Any] = field(default_factory=dict)
    yaml_path: str | None = None
    launcher_environ: dict[str, str] | None = None
    launched: bool | None = None

    def is_launched(self) -> bool:
        if self.launched is not None:
            return self.launched
        # No /proc (Windows, macOS): the launcher always exports ACCELERATE_DYNAMO_MODE, users rarely do.
        return bool(self.launch_argv) or "ACCELERATE_DYNAMO_MODE" in self.environ

    @staticmethod
    def detect() -> LaunchContext:
        """Read the environment, the launcher's command line and environment, and accelerate's config YAML."""
        environ = dict(os.environ)
        cmdline = _parent_proc_file("cmdline")
        launch_argv = _accelerate_launch_flags(cmdline) if cmdline is not None else []
        launched = bool(launch_argv) if cmdline is not None else None
        launcher_environ = None
        if launch_argv:
            raw = _parent_proc_file("environ")
            launcher_environ = _parse_environ(raw) if raw is not None else None
        yaml_path = _flag_value(launch_argv, "--config_file") or _default_accelerate_yaml()
        yaml_config: dict[str, Any] = {}
        probably_launched = launched if launched is not None else "ACCELERATE_MIXED_PRECISION" in environ
        if yaml_path and Path(yaml_path).is_file() and probably_launched:
            yaml_config = _read_accelerate_yaml(Path(yaml_path))
        return LaunchContext(environ, launch_argv, yaml_config, yaml_path, launcher_environ, launched)


def _read_accelerate_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        config = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    if not isinstance(config, dict):  # not accelerate's YAML (e.g. a TOML given by mistake)
        return {}
    dynamo = config.pop("dynamo_config", {}) or {}
    # accelerate reads dynamo_config's keys with a "dynamo_" prefix (commands/launch.py).
    config.update({k if k.startswith("dynamo_") else "dynamo_" + k: v for k, v in dynamo.items()})
    return config


def _parent_proc_file(name: str) -> bytes | None:
    """``/proc/<parent>/<name>``, or None where there is no /proc (Windows, macOS)."""
    try:
        return Path(f"/proc/{os.getppid()}/{name}").read_bytes()
    except OSError:
        return None


def _parse_environ(raw: bytes) -> dict[str, str]:
    pairs = (entry.decode(errors="replace").partition("=") for entry in raw.split(b"\0") if b"=" in entry)
    return {key: value for key, _, value in pairs}


def _accelerate_launch_flags(raw: bytes) -> list[str]:
    """The command line of the ``accelerate launch`` process that started us, if it is one."""
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
    """accelerate's own default config path (HF_HOME, else XDG_CACHE_HOME/huggingface, + accelerate/)."""
    from accelerate.commands.config.config_args import default_config_file

    return default_config_file if os.path.isfile(default_config_file) else None


def _flag_value(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _launch_flag(name: str, argv: list[str], flag: str) -> str | None:
    if name in _BOOLEAN_SETTINGS:
        return "true" if flag in argv else None
    return _flag_value(argv, flag)


def _normalise(name: str, value: Any) -> Any:
    if value is None:
        return None
    if name == "gradient_accumulation_steps":
        return int(value)
    if name in _BOOLEAN_SETTINGS:
        return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes", "y", "on")
    return str(value).lower()


def _dynamo_backends() -> list[str]:
    from accelerate.utils import DynamoBackend

    return [b.value.lower() for b in DynamoBackend]


def _check_value(name: str, setting: Setting) -> Setting:
    """Turn an unknown dynamo backend / mode or a non-number into a UserError naming its source."""
    value = setting.value
    if value is None:
        return setting
    if name == "gradient_accumulation_steps":
        try:
            return Setting(int(value), setting.source)
        except (TypeError, ValueError):
            raise UserError(f"gradient_accumulation_steps {value!r} from {setting.source} is not a whole number; "
                            "give e.g. 1 or 4.") from None
    valid = {"dynamo_backend": _dynamo_backends, "dynamo_mode": lambda: list(DYNAMO_MODES)}.get(name)
    if valid is not None and _normalise(name, value) not in valid():
        raise UserError(f"{name} {value!r} from {setting.source} is not one of: {', '.join(valid())} "
                        "(case does not matter).")
    return Setting(_normalise(name, value), setting.source)


def _accelerate_side(name: str, ctx: LaunchContext) -> Setting | None:
    """The explicit value accelerate holds for a setting, or None when it only has its default.

    A launch flag overrides the YAML (it is the flags' defaults, as in accelerate); a variable the user
    exported that disagrees with either is a conflict, since `accelerate launch` would overwrite it silently.
    """
    env_name, yaml_key, flag, default = _ACCELERATE_SOURCES[name]
    launcher: Setting | None = None
    flag_value = _launch_flag(name, ctx.launch_argv, flag)
    if flag_value is not None:
        launcher = _check_value(name, Setting(flag_value, f"accelerate launch {flag}"))
    elif yaml_key and ctx.yaml_config.get(yaml_key) is not None and ctx.launch_argv:
        launcher = _check_value(name, Setting(ctx.yaml_config[yaml_key], f"accelerate config {ctx.yaml_path}"))
    if launcher is not None and ctx.launcher_environ is None:
        return launcher  # our environment then only holds what the launcher exported from these
    env = _environment_setting(name, ctx, env_name, default)
    if launcher is not None and env is not None and launcher.value != env.value:
        raise UserError(f"{name} is set twice with different values: {env.value!r} from {env.source} and "
                        f"{launcher.value!r} from {launcher.source}. Remove one of them.")
    return launcher or env


def _environment_setting(name: str, ctx: LaunchContext, env_name: str, default: str) -> Setting | None:
    if ctx.launcher_environ is not None:
        # What the user exported before `accelerate launch` (ours holds the launcher's overwrite).
        value = ctx.launcher_environ.get(env_name)
        return None if value is None else _check_value(
            name, Setting(value, f"environment {env_name} (set before accelerate launch)"))
    value = ctx.environ.get(env_name)
    if value is None:
        return None
    # `accelerate launch` always exports its own defaults ("no", "default", "False"); that is not a user's choice.
    if name in _LAUNCHER_EXPORTS and ctx.is_launched() and _normalise(name, value) == _normalise(name, default):
        return None
    return _check_value(name, Setting(value, f"environment {env_name}"))


def resolve_accelerate_settings(script: dict[str, Setting], ctx: LaunchContext) -> dict[str, Setting]:
    """Merge the script's values with accelerate's by CONTRACTS.md §2.

    ``script`` maps each setting to the script's value (None when unset) and its source
    ("command line", "config file x.toml" or "default").
    """
    resolved: dict[str, Setting] = {}
    for name, (_, _, _, default) in _ACCELERATE_SOURCES.items():
        mine = _check_value(name, script.get(name, Setting(None, "default")))
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
    # accelerate's init_trackers(init_kwargs=...): tracker name -> keywords of its run (library: read_tracker_config)
    tracker_init_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)


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


# Tracker → the packages accelerate accepts for it (tracking.py's is_*_available checks).
_TRACKER_PACKAGES: dict[str, tuple[str, ...]] = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}


def check_trackers_installed(log_with: str | None) -> None:
    """Stop before anything is created when a chosen tracker is not installed: accelerate only warns and
    trains with no tracker. ``all`` means tensorboard and wandb, both required, as in sd-scripts."""
    import importlib.util

    names = list(_TRACKER_PACKAGES) if log_with == "all" else [log_with] if log_with else []
    for name in names:
        if not any(importlib.util.find_spec(module) for module in _TRACKER_PACKAGES[name]):
            also = (" (--log_with all means tensorboard and wandb, as in sd-scripts; choose --log_with "
                    "tensorboard for tensorboard only)") if log_with == "all" else ""
            raise UserError(f"--log_with {log_with} needs the {name} package: pip install {name}{also}.")


# accelerate's tracker names (LoggerType), the tables a --log_tracker_config file may hold
# (init key, tracker) → the argument that gives it: accelerate passes the project name and the logging folder to
# the tracker itself, so the same key from the file is a "got multiple values" TypeError at init_trackers.
_SET_BY_ARGUMENTS = {("project", "wandb"): "--log_tracker_name", ("project", "trackio"): "--log_tracker_name",
                     ("project", "swanlab"): "--log_tracker_name", ("project_name", "comet_ml"): "--log_tracker_name",
                     ("experiment_name", "mlflow"): "--log_tracker_name", ("log_dir", "tensorboard"): "--logging_dir",
                     ("logdir", "tensorboard"): "--logging_dir", ("logging_dir", "mlflow"): "--logging_dir",
                     ("repo", "aim"): "--logging_dir"}
_TRACKER_NAMES = ("tensorboard", "wandb", "aim", "comet_ml", "mlflow", "clearml", "dvclive", "swanlab", "trackio")


def read_tracker_config(path: str | None, wandb_run_name: str | None = None,
                        log_with: str | None = None) -> dict[str, dict[str, Any]]:
    """sd-scripts' ``--log_tracker_config``: a TOML of one table per tracker (``[wandb]`` name, tags, ...),
    passed to ``accelerator.init_trackers`` as ``init_kwargs``; each table's keys go to that tracker's run
    (wandb.init, tensorboard's SummaryWriter, ...). Read before anything loads, so a bad file costs nothing.

    ``--wandb_run_name`` becomes ``[wandb] name`` (sd-scripts drops it when a file is given; here the two
    must agree when both set it). ``log_with``: the trackers in use, to warn of tables no tracker reads.
    """
    kwargs: dict[str, dict[str, Any]] = {}
    if path:
        kwargs = _tracker_tables(Path(path))
    if wandb_run_name:
        named = kwargs.get("wandb", {}).get("name")
        if named is not None and named != wandb_run_name:
            raise UserError(f"--wandb_run_name {wandb_run_name!r} and name = {named!r} in the [wandb] table of "
                            f"--log_tracker_config {path} disagree; keep one of them.")
        kwargs.setdefault("wandb", {})["name"] = wandb_run_name
    in_use = set(_TRACKER_PACKAGES) if log_with == "all" else {log_with} if log_with else set()
    unused = [name for name in kwargs if name not in in_use]
    if path and unused:
        logger.warning("--log_tracker_config %s: [%s] configure%s a tracker this run does not use (--log_with %s); "
                       "ignored", path, "], [".join(unused), "s" if len(unused) == 1 else "", log_with or "unset")
    return kwargs


def _tracker_tables(path: Path) -> dict[str, dict[str, Any]]:
    where = f"--log_tracker_config {path}"
    if not path.is_file():
        raise UserError(f"{where}: file not found; give a TOML file with one table per tracker, e.g. "
                        '[wandb] name = "run-1" and tags = ["lora"].')
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise UserError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:  # the message says "(at line L, column C)"
        raise UserError(f"{where}: TOML syntax error: {exc}") from None
    for name, table in data.items():
        if name not in _TRACKER_NAMES:
            raise UserError(f"{where}: '{name}' is not a tracker{did_you_mean(name, _TRACKER_NAMES)}; the file "
                            f"holds one table per tracker: {', '.join(f'[{n}]' for n in _TRACKER_NAMES)}.")
        if not isinstance(table, dict):
            raise UserError(f"{where}: '{name}' must be a table of that tracker's settings ([{name}] followed by "
                            f"key = value lines), got {table!r}.")
        for key in table:  # accelerate passes these itself: a second value fails only once training has begun
            if (key, name) in _SET_BY_ARGUMENTS or (key, "*") in _SET_BY_ARGUMENTS:
                argument = _SET_BY_ARGUMENTS.get((key, name)) or _SET_BY_ARGUMENTS[(key, "*")]
                raise UserError(f"{where}: [{name}] {key} is what {argument} sets (accelerate passes it to the "
                                f"tracker itself); remove it from the file and use {argument}.")
    return data


def effective_log_with(log_with: str | None, logging_dir: str | None) -> str | None:
    """sd-scripts' rule: a --logging_dir alone means tensorboard."""
    return "tensorboard" if log_with is None and logging_dir is not None else log_with


def prepare_accelerator(s: AcceleratorSettings):
    """Build the Accelerator: process group, DDP options, dynamo plugin, trackers' folder."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin

    log_with = effective_log_with(s.log_with, s.logging_dir)
    if log_with in ("tensorboard", "all") and s.logging_dir is None:
        raise UserError("Logging with tensorboard needs --logging_dir.")
    check_trackers_installed(log_with)
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
