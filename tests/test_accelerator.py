"""prepare_accelerator and the precedence of accelerate settings (KOHYA_COMPAT.md §2)."""

from __future__ import annotations

import datetime

import pytest

from library.accelerator import (
    AcceleratorSettings,
    LaunchContext,
    Setting,
    _dynamo_plugin,
    _kwargs_handlers,
    logging_run_dir,
    resolve_accelerate_settings,
    settings_table,
)
from library.errors import UserError

LAUNCHED = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "no", "ACCELERATE_DYNAMO_MODE": "default"}


def _script(mp=None, mp_source="default", gas=None, dyn=None):
    return {"mixed_precision": Setting(mp, mp_source), "gradient_accumulation_steps": Setting(gas, "default"),
            "dynamo_backend": Setting(dyn, "default")}


def test_nothing_set_gives_defaults():
    out = resolve_accelerate_settings(_script(), LaunchContext(environ={}))
    assert out["mixed_precision"] == Setting("no", "default")
    assert out["gradient_accumulation_steps"] == Setting(1, "default")


def test_launcher_default_no_does_not_override_script_bf16():
    # `accelerate launch` exports "no" even when nobody chose it; the script's explicit bf16 wins.
    out = resolve_accelerate_settings(_script("bf16", "command line"), LaunchContext(environ=dict(LAUNCHED)))
    assert out["mixed_precision"] == Setting("bf16", "command line")


def test_launch_flag_beats_script_default():
    ctx = LaunchContext(environ={**LAUNCHED, "ACCELERATE_MIXED_PRECISION": "bf16"},
                        launch_argv=["accelerate", "launch", "--mixed_precision", "bf16", "train_network.py"])
    out = resolve_accelerate_settings(_script(), ctx)
    assert out["mixed_precision"] == Setting("bf16", "accelerate launch --mixed_precision")


def test_two_explicit_settings_that_disagree_stop_the_run():
    ctx = LaunchContext(environ={**LAUNCHED, "ACCELERATE_MIXED_PRECISION": "bf16"},
                        launch_argv=["accelerate", "launch", "--mixed_precision=bf16", "train_network.py"])
    with pytest.raises(UserError) as e:
        resolve_accelerate_settings(_script("fp16", "config file train.toml"), ctx)
    assert "fp16" in str(e.value) and "bf16" in str(e.value)
    assert "train.toml" in str(e.value) and "accelerate launch --mixed_precision" in str(e.value)


def test_accelerate_yaml_is_a_source():
    ctx = LaunchContext(environ={**LAUNCHED, "ACCELERATE_MIXED_PRECISION": "fp16"},
                        launch_argv=["accelerate", "launch", "x.py"], yaml_config={"mixed_precision": "fp16"},
                        yaml_path="/cfg/default_config.yaml")
    out = resolve_accelerate_settings(_script(), ctx)
    assert out["mixed_precision"] == Setting("fp16", "accelerate config /cfg/default_config.yaml")


def test_plain_environment_variable_is_explicit():
    out = resolve_accelerate_settings(_script(gas=None), LaunchContext(
        environ={"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}))
    assert out["gradient_accumulation_steps"] == Setting(4, "environment ACCELERATE_GRADIENT_ACCUMULATION_STEPS")


def test_same_value_from_two_sources_is_fine():
    ctx = LaunchContext(environ={**LAUNCHED, "ACCELERATE_MIXED_PRECISION": "bf16"},
                        launch_argv=["accelerate", "launch", "--mixed_precision", "bf16"])
    out = resolve_accelerate_settings(_script("bf16", "command line"), ctx)
    assert out["mixed_precision"].value == "bf16"


def test_kwargs_handlers_for_several_processes():
    from accelerate import DistributedDataParallelKwargs, InitProcessGroupKwargs

    s = AcceleratorSettings(ddp_timeout_minutes=30, ddp_static_graph=True)
    handlers = _kwargs_handlers(s, num_processes=2, cuda=False)
    pg = next(h for h in handlers if isinstance(h, InitProcessGroupKwargs))
    assert pg.backend == "gloo" and pg.timeout == datetime.timedelta(minutes=30)
    ddp = next(h for h in handlers if isinstance(h, DistributedDataParallelKwargs))
    assert ddp.static_graph is True and ddp.gradient_as_bucket_view is False
    assert _kwargs_handlers(AcceleratorSettings(), num_processes=1, cuda=True) == []
    assert _kwargs_handlers(s, num_processes=2, cuda=True)[0].backend == "nccl"


def test_dynamo_plugin_from_arguments():
    plugin = _dynamo_plugin(AcceleratorSettings(dynamo_backend="inductor", dynamo_mode="max-autotune",
                                                dynamo_fullgraph=True, dynamo_dynamic=True))
    assert plugin.backend.value.lower() == "inductor"
    assert plugin.mode == "max-autotune" and plugin.fullgraph is True and plugin.dynamic is True
    assert _dynamo_plugin(AcceleratorSettings()).backend.value.lower() == "no"


def test_logging_dir_naming():
    path = logging_run_dir("logs", "run_")
    assert path.startswith("logs/run_") and len(path) == len("logs/run_") + 14
    assert logging_run_dir(None, "x") is None


def test_prepare_accelerator_refuses_tensorboard_without_dir():
    from library.accelerator import prepare_accelerator

    with pytest.raises(UserError, match="logging_dir"):
        prepare_accelerator(AcceleratorSettings(log_with="tensorboard", cpu=True))


def test_settings_table_lists_sources():
    table = settings_table({"mixed_precision": Setting("bf16", "command line")})
    assert "mixed_precision" in table and "bf16" in table and "(command line)" in table


def test_the_scripts_own_arguments_are_not_read_as_accelerates():
    from library.accelerator import _flag_value, launcher_flags

    argv = ["/usr/bin/python3", "/venv/bin/accelerate", "launch", "--num_processes", "1", "--mixed_precision", "no",
            "train_network.py", "--config_file", "train.toml", "--mixed_precision", "bf16"]
    flags = launcher_flags(argv, "train_network.py")
    assert flags == argv[:7]
    assert _flag_value(flags, "--config_file") is None  # the training TOML is not accelerate's YAML
    assert _flag_value(flags, "--mixed_precision") == "no"
    assert launcher_flags(argv, "/abs/path/elsewhere/train_network.py") == argv[:7]  # by the .py suffix


def test_ddp_looks_for_unused_parameters_only_where_a_step_can_leave_some():
    from library.families import some_parameters_may_go_unused as unused

    assert unused("sdxl", True, None, [])  # encoder 1's last layer is never read
    assert unused("sd", True, 2, [])  # --clip_skip 2: the last layer is not read
    assert unused("llm", False, None, ["module_dropout=0.1"])  # modules skipped at random
    assert not unused("sd", True, None, [])  # every LoRA reaches the loss: DDP keeps its cheaper default
    assert not unused("sdxl", False, None, [])  # --network_train_unet_only
    assert not unused("llm", True, None, ["dropout=0.1"])


def _dynamo_script(**values):
    names = ("mixed_precision", "gradient_accumulation_steps", "dynamo_backend", "dynamo_mode", "dynamo_fullgraph",
             "dynamo_dynamic")
    return {n: values.get(n, Setting(False if n in ("dynamo_fullgraph", "dynamo_dynamic") else None, "default"))
            for n in names}


def test_accelerate_dynamo_mode_and_switches_are_sources_not_replaced_by_script_defaults():
    launch = ["accelerate", "launch", "--dynamo_backend", "inductor", "--dynamo_mode", "max-autotune",
              "--dynamo_use_fullgraph", "train_network.py"]
    env = {**LAUNCHED, "ACCELERATE_DYNAMO_BACKEND": "INDUCTOR", "ACCELERATE_DYNAMO_MODE": "max-autotune",
           "ACCELERATE_DYNAMO_USE_FULLGRAPH": "True", "ACCELERATE_DYNAMO_USE_DYNAMIC": "False"}
    out = resolve_accelerate_settings(_dynamo_script(), LaunchContext(environ=env, launch_argv=launch))
    assert out["dynamo_mode"] == Setting("max-autotune", "accelerate launch --dynamo_mode")
    assert out["dynamo_fullgraph"] == Setting(True, "accelerate launch --dynamo_use_fullgraph")
    assert out["dynamo_dynamic"] == Setting(False, "default")
    # accelerate config's dynamo_config block
    yaml_ctx = LaunchContext(environ=env, launch_argv=["accelerate", "launch", "x.py"], yaml_path="/c.yaml",
                             yaml_config={"dynamo_backend": "INDUCTOR", "dynamo_mode": "reduce-overhead",
                                          "dynamo_use_dynamic": True})
    out = resolve_accelerate_settings(_dynamo_script(), yaml_ctx)
    assert out["dynamo_mode"] == Setting("reduce-overhead", "accelerate config /c.yaml")
    assert out["dynamo_dynamic"] == Setting(True, "accelerate config /c.yaml")
    # a plain ACCELERATE_* variable, and the script's own explicit value that disagrees
    out = resolve_accelerate_settings(_dynamo_script(), LaunchContext(
        environ={"ACCELERATE_DYNAMO_USE_DYNAMIC": "true"}, launched=False))
    assert out["dynamo_dynamic"] == Setting(True, "environment ACCELERATE_DYNAMO_USE_DYNAMIC")
    with pytest.raises(UserError, match="dynamo_mode.*default.*command line.*max-autotune.*--dynamo_mode"):
        resolve_accelerate_settings(_dynamo_script(dynamo_mode=Setting("default", "command line")),
                                    LaunchContext(environ=env, launch_argv=launch))


def test_yaml_dynamo_config_keys_are_read_with_accelerates_prefix(tmp_path):
    from library.accelerator import _read_accelerate_yaml

    cfg = tmp_path / "default_config.yaml"
    cfg.write_text("mixed_precision: bf16\ndynamo_config:\n  dynamo_backend: INDUCTOR\n  dynamo_mode: max-autotune\n"
                   "  dynamo_use_fullgraph: true\n")
    assert _read_accelerate_yaml(cfg) == {"mixed_precision": "bf16", "dynamo_backend": "INDUCTOR",
                                          "dynamo_mode": "max-autotune", "dynamo_use_fullgraph": True}


def test_dynamo_plugin_gets_the_resolved_accelerate_values():
    import argparse

    from library.args import build_parser
    from library.train_setup import accelerator_settings

    args = build_parser().parse_args(["--dynamo_backend", "INDUCTOR"])
    sources = {k: "default" for k in vars(args)} | {"dynamo_backend": "command line"}
    ctx = LaunchContext(environ={}, launched=False)
    env = {"ACCELERATE_DYNAMO_MODE": "max-autotune", "ACCELERATE_DYNAMO_USE_FULLGRAPH": "1"}
    settings, resolved = accelerator_settings(argparse.Namespace(**vars(args)), sources,
                                              LaunchContext(environ=env, launched=False))
    plugin = _dynamo_plugin(settings)
    assert plugin.mode == "max-autotune" and plugin.fullgraph is True and plugin.dynamic is False
    assert resolved["dynamo_backend"] == Setting("inductor", "command line")
    assert "dynamo_mode" in settings_table(resolved)
    assert accelerator_settings(args, sources, ctx)[0].dynamo_mode == "default"


@pytest.mark.parametrize("where", ["script", "environment"])
def test_unknown_dynamo_backend_is_a_user_error_listing_the_names(where):
    script = _dynamo_script(dynamo_backend=Setting("bogus", "command line")) if where == "script" else _dynamo_script()
    env = {"ACCELERATE_DYNAMO_BACKEND": "bogus"} if where == "environment" else {}
    with pytest.raises(UserError, match="dynamo_backend 'bogus'.*not one of: no, eager, aot_eager, inductor"):
        resolve_accelerate_settings(script, LaunchContext(environ=env, launched=False))
    ok = resolve_accelerate_settings(_dynamo_script(dynamo_backend=Setting("AOT_Eager", "command line")),
                                     LaunchContext(environ={}, launched=False))
    assert ok["dynamo_backend"].value == "aot_eager"


def test_missing_tracker_package_stops_before_anything_is_created(tmp_path, monkeypatch):
    import importlib.util

    from library.accelerator import prepare_accelerator

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    for log_with in ("wandb", "all"):
        with pytest.raises(UserError, match=f"--log_with {log_with} needs the wandb package: pip install wandb"):
            prepare_accelerator(AcceleratorSettings(log_with=log_with, logging_dir=str(tmp_path / "logs"),
                                                    wandb_api_key="k", cpu=True))
    assert not (tmp_path / "logs").exists()


def test_variable_exported_before_accelerate_launch_counts():
    # `accelerate launch` overwrote ACCELERATE_MIXED_PRECISION with its default; the launcher's own environment
    # still holds the user's bf16.
    ctx = LaunchContext(environ=dict(LAUNCHED), launch_argv=["accelerate", "launch", "x.py"], launched=True,
                        launcher_environ={"ACCELERATE_MIXED_PRECISION": "bf16"})
    out = resolve_accelerate_settings(_script(), ctx)
    assert out["mixed_precision"] == Setting(
        "bf16", "environment ACCELERATE_MIXED_PRECISION (set before accelerate launch)")
    yaml_no = LaunchContext(environ=dict(LAUNCHED), launch_argv=["accelerate", "launch", "x.py"], launched=True,
                            launcher_environ={"ACCELERATE_MIXED_PRECISION": "bf16"}, yaml_path="/c.yaml",
                            yaml_config={"mixed_precision": "no"})
    with pytest.raises(UserError, match="'bf16' from environment.*'no' from accelerate config /c.yaml"):
        resolve_accelerate_settings(_script(), yaml_no)


def test_accumulation_variable_of_one_is_explicit_under_plain_python():
    # Only DeepSpeed launches export ACCELERATE_GRADIENT_ACCUMULATION_STEPS, and only when asked: never a default.
    env = {"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "1", "ACCELERATE_DYNAMO_MODE": "default"}
    with pytest.raises(UserError, match="gradient_accumulation_steps"):
        resolve_accelerate_settings({**_script(), "gradient_accumulation_steps": Setting(4, "config file t.toml")},
                                    LaunchContext(environ=env, launched=False))
    out = resolve_accelerate_settings(_script(), LaunchContext(environ=env))  # launch not known: still explicit
    assert out["gradient_accumulation_steps"].source == "environment ACCELERATE_GRADIENT_ACCUMULATION_STEPS"


def test_default_accelerate_yaml_follows_accelerates_own_lookup(tmp_path):
    import os
    import subprocess
    import sys

    cfg = tmp_path / "xdg" / "huggingface" / "accelerate" / "default_config.yaml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text("mixed_precision: bf16\n")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HOME", "ACCELERATE_CONFIG_DIR")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    code = "from library.accelerator import _default_accelerate_yaml as f; print(f())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(cfg)


def test_full_bf16_needs_bf16_as_resolved_not_only_as_given():
    """--full_bf16 with no --mixed_precision (or accelerate's 'no' / 'fp16') trained a bf16 LoRA on an fp32 model
    without autocast and wrote ss_full_bf16 True beside ss_mixed_precision no (SDXL audit F5)."""
    from library.args import build_parser
    from library.errors import UserError
    from library.train_setup import accelerator_settings

    args = build_parser().parse_args(["--full_bf16"])
    sources = {k: "default" for k in vars(args)} | {"full_bf16": "command line"}
    with pytest.raises(UserError, match=r"needs mixed precision bf16; it is no \(default\)"):
        accelerator_settings(args, sources, LaunchContext(environ={}, launched=False))
    launched = LaunchContext(environ={"ACCELERATE_MIXED_PRECISION": "fp16"}, launched=True)
    with pytest.raises(UserError, match="it is fp16"):
        accelerator_settings(args, sources, launched)
    ok = LaunchContext(environ={"ACCELERATE_MIXED_PRECISION": "bf16"}, launched=True)
    assert accelerator_settings(args, sources, ok)[0].mixed_precision == "bf16"
