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
