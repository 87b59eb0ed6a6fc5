"""sd-scripts / kohya_ss GUI names and habits: optimizers, schedulers, Adafactor's relative step, list values."""

from __future__ import annotations

import logging
import sys

import pytest
import torch

from library.errors import UserError
from library.optim import (
    AdafactorSchedule,
    create_optimizer,
    create_scheduler,
    effective_scheduler_name,
    parse_key_values,
)


def _groups(*lrs: float) -> list[dict]:
    torch.manual_seed(0)
    return [{"params": [torch.nn.Parameter(torch.randn(64, 64))], "lr": lr} for lr in lrs or (1e-3,)]


def _lrs(optimizer, scheduler, steps: int) -> list[float]:
    """The scheduler's rate after each optimizer step (what the training loop logs)."""
    out = []
    for _ in range(steps):
        for group in optimizer.param_groups:
            group["params"][0].grad = torch.ones_like(group["params"][0])
        optimizer.step()
        scheduler.step()
        out.append(scheduler.get_last_lr()[0])
    return out


# --- Adafactor's relative step ------------------------------------------------------------------

def test_adafactor_relative_step_replaces_the_named_scheduler(caplog):
    groups = _groups(1e-4, 2e-4)
    with caplog.at_level(logging.WARNING):
        optimizer = create_optimizer(groups, "adafactor", 1e-4, ["relative_step=True", "warmup_init=True"])
    assert "different rates (0.0001, 0.0002" in caplog.text  # e.g. LoRA+ or per-part rates: lost, and said so
    assert optimizer.defaults["scale_parameter"] is True  # transformers' default with relative_step, as sd-scripts
    with caplog.at_level(logging.WARNING):
        scheduler = create_scheduler(optimizer, "constant", 10, 0)  # the default --lr_scheduler
    assert isinstance(scheduler, AdafactorSchedule)
    assert "--lr_scheduler constant is replaced by adafactor" in caplog.text
    assert effective_scheduler_name(optimizer, "constant") == "adafactor"
    lrs = _lrs(optimizer, scheduler, 3)
    # warmup_init: the step size grows by 1e-6 × the parameter's RMS per step; every group is reported
    rms = groups[0]["params"][0].detach().pow(2).mean().sqrt().item()
    assert lrs[0] == pytest.approx(1e-6 * rms, rel=0.05) and lrs[1] == pytest.approx(2 * lrs[0], rel=0.05)
    assert len(scheduler.get_last_lr()) == 2 and all(lr > 0 for lr in scheduler.get_last_lr())


def test_lr_scheduler_adafactor_as_in_the_sd_scripts_docs(caplog):
    optimizer = create_optimizer(_groups(), "Adafactor", 1e-4,
                                 ["scale_parameter=True", "relative_step=True", "warmup_init=True"])
    with caplog.at_level(logging.WARNING):
        scheduler = create_scheduler(optimizer, "adafactor", 10, 0)
    assert "replaced" not in caplog.text
    assert scheduler.get_last_lr() == [1e-6]  # before a step: step 1's relative step size, unscaled
    assert all(lr > 0 for lr in _lrs(optimizer, scheduler, 2))


def test_adafactor_warmup_init_turns_relative_step_on_as_sd_scripts():
    optimizer = create_optimizer(_groups(), "Adafactor", 1e-4, ["warmup_init=True"])
    assert optimizer.defaults["relative_step"] is True and optimizer.defaults["lr"] is None
    plain = create_optimizer(_groups(), "Adafactor", 1e-4, None)  # this project's default: the given lr
    assert plain.defaults["relative_step"] is False and plain.defaults["lr"] == 1e-4


@pytest.mark.parametrize("optimizer_args, name, warmup, scheduler_type, message", [
    (None, "adafactor", 0, "", "use it with --optimizer_type Adafactor --optimizer_args relative_step=True"),
    (["relative_step=True"], "constant", 5, "", "--lr_warmup_steps 5: Adafactor with relative_step=True"),
    (["relative_step=True"], "constant", 0, "StepLR", "--lr_scheduler_type StepLR cannot schedule Adafactor"),
])
def test_adafactor_schedule_errors_are_clear(optimizer_args, name, warmup, scheduler_type, message):
    optimizer = create_optimizer(_groups(), "Adafactor", 1e-4, optimizer_args)
    with pytest.raises(UserError, match=message):
        create_scheduler(optimizer, name, 10, warmup, scheduler_type=scheduler_type)


def test_adafactor_relative_step_trains_and_logs_its_step_size(tmp_path, tiny_sd_dir, tiny_images):
    import train_network

    data = tmp_path / "data.toml"
    data.write_text(f'[[datasets]]\nresolution = 64\nbatch_size = 2\n'
                    f'  [[datasets.subsets]]\n  image_dir = "{tiny_images}"\n')
    out = tmp_path / "out"
    assert train_network.main(["--pretrained_model_name_or_path", str(tiny_sd_dir), "--dataset_config", str(data),
                               "--output_dir", str(out), "--output_name", "lora", "--network_dim", "4",
                               "--max_train_steps", "2", "--seed", "3", "--optimizer_type", "adafactor",
                               "--optimizer_args", "relative_step=True", "warmup_init=True"]) == 0
    rows = (out / "lora_loss.csv").read_text().strip().splitlines()[1:]
    lrs = [float(row.split(",")[2]) for row in rows]
    assert 0 < lrs[0] < 1e-5 and lrs[1] == pytest.approx(2 * lrs[0], rel=0.1)  # warmup_init's growing step
    from safetensors import safe_open

    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        assert f.metadata()["ss_lr_scheduler"] == "adafactor"  # the schedule that ran, not --lr_scheduler's default


# --- optimizer names from tutorials and the GUI ---------------------------------------------------

@pytest.mark.parametrize("name, cls_name", [
    ("SGDNesterov", "SGD"), ("SGDNesterov8bit", "SGD8bit"), ("PagedAdamW", "PagedAdamW"),
    ("PagedAdamW8bit", "PagedAdamW8bit"), ("PagedAdamW32bit", "PagedAdamW32bit"), ("PagedLion8bit", "PagedLion8bit"),
    ("AdEMAMix8bit", "AdEMAMix8bit"), ("PagedAdEMAMix8bit", "PagedAdEMAMix8bit"),
    ("DAdaptation", "DAdaptAdamPreprint"), ("DAdaptAdamPreprint", "DAdaptAdamPreprint"),
    ("DAdaptAdam", "DAdaptAdam"), ("DAdaptAdaGrad", "DAdaptAdaGrad"), ("DAdaptAdan", "DAdaptAdan"),
    ("DAdaptAdanIP", "DAdaptAdanIP"), ("DAdaptLion", "DAdaptLion"), ("dadaptsgd", "DAdaptSGD"),
])
def test_tutorial_and_gui_optimizer_names_build_and_step_on_cpu(name, cls_name):
    if name.lower().startswith("dadapt"):
        pytest.importorskip("dadaptation")
    lr = 1.0 if name.lower().startswith("dadapt") else 1e-3
    groups = _groups(lr)
    before = groups[0]["params"][0].detach().clone()
    optimizer = create_optimizer(groups, name, lr, None)
    assert type(optimizer).__name__ == cls_name
    for _ in range(2):
        groups[0]["params"][0].grad = torch.randn(64, 64)
        optimizer.step()
    assert not torch.equal(before, groups[0]["params"][0].detach())


def test_sgd_nesterov_gets_momentum_0_9_unless_given():
    defaults = create_optimizer(_groups(), "SGDNesterov", 0.1, None).defaults
    assert defaults["nesterov"] is True and defaults["momentum"] == 0.9
    assert create_optimizer(_groups(), "SGDNesterov", 0.1, ["momentum=0.5"]).defaults["momentum"] == 0.5


def test_dadaptation_missing_names_its_pip_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "dadaptation", None)  # import fails as if not installed
    with pytest.raises(UserError, match="pip install dadaptation"):
        create_optimizer(_groups(), "DAdaptation", 1.0, None)
    with pytest.raises(UserError, match="did you mean 'DAdaptAdam'"):
        create_optimizer(_groups(), "DAdaptAdamm", 1.0, None)


def test_dadaptation_and_prodigy_warn_about_a_learning_rate_far_below_1(caplog):
    with caplog.at_level(logging.WARNING):
        create_optimizer(_groups(1.0), "Prodigy", 1.0, None)
        assert "too low" not in caplog.text
        create_optimizer(_groups(1e-4), "Prodigy", 1e-4, None)
    assert "learning rate 0.0001 is too low" in caplog.text


# --- scheduler names of the GUI, and --lr_scheduler_args for named schedulers ----------------------

def _schedule(name: str, steps: int = 10, warmup: float = 0, args: list[str] | None = None, **kw) -> list[float]:
    optimizer = create_optimizer(_groups(1.0), "SGD", 1.0, None)
    scheduler = create_scheduler(optimizer, name, steps, warmup, scheduler_args=args, **kw)
    lrs = []
    for _ in range(steps):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return lrs


def test_gui_scheduler_names():
    assert _schedule("piecewise_constant", 6, args=["step_rules=1:2,0.5:4,0.1"]) == pytest.approx(
        [1, 1, 0.5, 0.5, 0.1, 0.1])
    floor = _schedule("cosine_with_min_lr", args=["min_lr_rate=0.1"])
    assert floor[0] == 1 and min(floor) >= 0.1 and floor[-1] < 0.2
    assert _schedule("cosine_with_min_lr", min_lr_ratio=0.5)[-1] >= 0.5  # sd-scripts' --lr_scheduler_min_lr_ratio
    # warmup 2, stable 4, decay 4 steps (a ratio when below 1, like --lr_warmup_steps), down to min_lr_ratio
    wsd = _schedule("warmup_stable_decay", 10, 2, ["num_decay_steps=0.4", "min_lr_ratio=0.1"])
    assert wsd[:6] == pytest.approx([0.1, 0.55, 1, 1, 1, 1]) and 0.1 <= wsd[-1] < 0.5  # warmup from the floor
    assert _schedule("inverse_sqrt", 8, 4)[:5] == pytest.approx([0, 0.25, 0.5, 0.75, 1])
    assert _schedule("inverse_sqrt", 8, 0, timescale=1)[1] == pytest.approx(2 ** -0.5)


def test_named_scheduler_takes_lr_scheduler_args_as_keywords():
    # sd-scripts passes them on: a quarter-period cosine (num_cycles=0.25) ends far above the half period's 0
    quarter = _schedule("cosine", 10, args=["num_cycles=0.25"])
    assert quarter[-1] > 0.1 and _schedule("cosine", 10)[-1] < 0.05
    assert _schedule("polynomial", 4, args=["lr_end=0.5"]) == pytest.approx([1, 0.875, 0.75, 0.625])


@pytest.mark.parametrize("name, args, message", [
    ("cosine", ["num_cycle=2"], "--lr_scheduler cosine has no argument 'num_cycle' .*did you mean 'num_cycles'"),
    ("cosine_with_restarts", ["num_cycles=3"], "takes num_cycles from --lr_scheduler_num_cycles"),
    ("linear", ["num_warmup_steps=3"], "takes num_warmup_steps from --lr_warmup_steps"),
    ("piecewise_constant", None, "step_rules="),
    ("cosine_with_min_lr", None, "min_lr_rate=0.1"),
    ("warmup_stable_decay", ["num_decay_steps=20"], "exceed the 10 training steps"),
    ("adafactor", None, "relative_step=True"),
])
def test_named_scheduler_errors_name_the_argument(name, args, message):
    with pytest.raises(UserError, match=message):
        _schedule(name, 10, 0, args)


# --- empty values and list values from GUI configs ------------------------------------------------

def test_empty_key_value_strings_are_no_arguments():
    assert parse_key_values([""], "--optimizer_args") == {} and parse_key_values(["", " a=1"], "x") == {"a": 1}
    assert type(create_optimizer(_groups(), "AdamW", 1e-3, [""])).__name__ == "AdamW"
    assert _schedule("constant", 3, 0, [""]) == [1.0, 1.0, 1.0]


def test_two_text_encoder_rates_on_a_one_encoder_model_use_the_first(tiny_sd_dir, caplog):
    from library.families.sd import SDFamily
    from networks.lora import create_network

    family = SDFamily.load(str(tiny_sd_dir))
    network = create_network(1.0, 4, 1.0, None, family.text_encoder, family.unet)
    network.apply_to(family.text_encoder, family.unet)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        groups, descriptions = network.prepare_optimizer_params([5e-5, 5e-5], 1e-4, 1e-4)  # kohya_ss GUI v25
    assert dict(zip(descriptions, (g["lr"] for g in groups), strict=True)) == {"textencoder": 5e-5, "unet": 1e-4}
    assert not caplog.text
    with caplog.at_level(logging.WARNING):
        groups, descriptions = network.prepare_optimizer_params([5e-5, 1e-5], 1e-4, 1e-4)
    assert groups[descriptions.index("textencoder")]["lr"] == 5e-5
    assert "1 text encoder(s); using 5e-05, not 1e-05" in caplog.text
