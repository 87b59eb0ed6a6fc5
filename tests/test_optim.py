"""Optimizers and schedulers by kohya's names; LoRA+ parameter groups."""

from __future__ import annotations

import pytest
import torch

from library.errors import UserError
from library.optim import create_optimizer, create_scheduler, parse_key_values, warmup_steps


def _groups():
    torch.manual_seed(0)
    return [{"params": [torch.nn.Parameter(torch.randn(8, 8))], "lr": 1e-3}]


@pytest.mark.parametrize("name, cls_name", [
    ("", "AdamW"), ("AdamW", "AdamW"), ("AdamW8bit", "AdamW8bit"), ("PagedAdamW8bit", "PagedAdamW8bit"),
    ("Lion", "Lion"), ("Lion8bit", "Lion8bit"), ("Prodigy", "Prodigy"), ("SGD", "SGD"),
    ("Adafactor", "Adafactor"), ("torch.optim.RMSprop", "RMSprop"),
])
def test_every_named_optimizer_builds_and_steps(name, cls_name):
    groups = _groups()
    before = groups[0]["params"][0].detach().clone()
    optimizer = create_optimizer(groups, name, 1e-3, ["weight_decay=0.0"] if name != "Prodigy" else None)
    assert type(optimizer).__name__ == cls_name
    groups[0]["params"][0].grad = torch.ones(8, 8)
    optimizer.step()
    assert not torch.equal(before, groups[0]["params"][0].detach())


def test_optimizer_args_are_typed_and_passed():
    assert parse_key_values(["momentum=0.9", "nesterov=True", "betas=(0.9,0.99)", "name=x"], "x") == {
        "momentum": 0.9, "nesterov": True, "betas": (0.9, 0.99), "name": "x"}
    optimizer = create_optimizer(_groups(), "SGD", 0.1, ["momentum=0.9", "nesterov=True"])
    assert optimizer.defaults["momentum"] == 0.9 and optimizer.defaults["nesterov"] is True
    with pytest.raises(UserError, match="rejects"):
        create_optimizer(_groups(), "SGD", 0.1, ["bogus=1"])


def test_adafactor_relative_step_drops_the_manual_lr():
    optimizer = create_optimizer(_groups(), "Adafactor", 1e-3, ["relative_step=True", "warmup_init=True"])
    assert optimizer.defaults["relative_step"] is True and optimizer.defaults["lr"] is None


def test_schedulers_and_warmup_ratio():
    assert warmup_steps(0.1, 200) == 20 and warmup_steps(15, 200) == 15
    for name in ("constant", "linear", "cosine", "cosine_with_restarts", "polynomial"):
        optimizer = create_optimizer(_groups(), "SGD", 1.0, None)
        scheduler = create_scheduler(optimizer, name, 100, 10)
        lrs = []
        for _ in range(100):
            lrs.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        # the group's own lr (1e-3) is the peak; warmup applies to every schedule, "constant" too
        assert lrs[0] == 0.0 and lrs[10] == pytest.approx(1e-3)
        if name != "constant":
            assert lrs[-1] < 0.2e-3
    with pytest.raises(UserError, match="did you mean 'cosine'"):
        create_scheduler(create_optimizer(_groups(), "SGD", 1.0, None), "cosin", 10, 0)


def test_loraplus_splits_up_weights_into_a_faster_group(tiny_sd_dir):
    from library.families.sd import SDFamily
    from networks.lora import create_network

    family = SDFamily.load(str(tiny_sd_dir))
    network = create_network(1.0, 4, 1.0, None, family.text_encoder, family.unet, loraplus_lr_ratio="16",
                             loraplus_text_encoder_lr_ratio="4")
    network.apply_to(family.text_encoder, family.unet)
    groups, descriptions = network.prepare_optimizer_params(1e-5, 1e-4, 1e-4)
    by_name = dict(zip(descriptions, groups, strict=True))
    assert set(by_name) == {"textencoder", "textencoder plus", "unet", "unet plus"}
    assert by_name["unet plus"]["lr"] == pytest.approx(1.6e-3) and by_name["unet"]["lr"] == 1e-4
    assert by_name["textencoder plus"]["lr"] == pytest.approx(4e-5)
    ups = {id(m.lora_up.weight) for m in network.unet_loras}
    assert {id(p) for p in by_name["unet plus"]["params"]} == ups
    assert not ups & {id(p) for p in by_name["unet"]["params"]}
    total = sum(len(g["params"]) for g in groups)
    assert total == len(list(network.parameters()))


def test_lr_scheduler_type_by_dotted_path_with_args():
    optimizer = create_optimizer(_groups(), "SGD", 1.0, None)
    scheduler = create_scheduler(optimizer, "cosine", 100, 0, scheduler_type="torch.optim.lr_scheduler.StepLR",
                                 scheduler_args=["step_size=2", "gamma=0.5"])
    assert type(scheduler).__name__ == "StepLR"  # --lr_scheduler is replaced, not combined
    lrs = []
    for _ in range(6):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4, 2.5e-4])
    # a bare name is looked up in torch.optim.lr_scheduler, as in sd-scripts
    bare = create_scheduler(create_optimizer(_groups(), "SGD", 1.0, None), "constant", 10, 0,
                            scheduler_type="ExponentialLR", scheduler_args=["gamma=0.9"])
    assert type(bare).__name__ == "ExponentialLR" and bare.gamma == 0.9


@pytest.mark.parametrize("scheduler_type, args, warmup, message", [
    ("torch.optim.lr_scheduler.StepLr", ["step_size=2"], 0, "did you mean 'StepLR'"),
    ("no_such_module.Scheduler", None, 0, "cannot import"),
    ("torch.optim.lr_scheduler.StepLR", ["step_sise=2"], 0, "rejects them"),
    ("torch.optim.lr_scheduler.StepLR", ["step_size=2"], 10, "--lr_warmup_steps does not apply"),
])
def test_lr_scheduler_type_errors_are_clear(scheduler_type, args, warmup, message):
    optimizer = create_optimizer(_groups(), "SGD", 1.0, None)
    with pytest.raises(UserError, match=message):
        create_scheduler(optimizer, "constant", 10, warmup, scheduler_type=scheduler_type, scheduler_args=args)


def test_loraplus_command_line_ratios_fill_what_network_args_leave(tiny_sd_dir):
    from library.args import build_parser
    from library.families.sd import SDFamily
    from library.train_setup import build_network, loraplus_ratios

    cli = {"loraplus_lr_ratio": 8.0, "loraplus_unet_lr_ratio": None, "loraplus_text_encoder_lr_ratio": 2.0}
    assert loraplus_ratios({}, dict.fromkeys(cli)) is None  # none given: the network's own values stand
    assert loraplus_ratios({"loraplus_unet_lr_ratio": "4"}, cli) == (8.0, 4.0, 2.0)
    assert loraplus_ratios({"loraplus_lr_ratio": "8"}, cli) == (8.0, None, 2.0)  # the same value twice is fine
    with pytest.raises(UserError, match="given twice with different values"):
        loraplus_ratios({"loraplus_lr_ratio": "16"}, cli)

    family = SDFamily.load(str(tiny_sd_dir))
    args = build_parser().parse_args(["--network_dim", "4", "--loraplus_lr_ratio", "8",
                                      "--loraplus_text_encoder_lr_ratio", "2", "--network_args",
                                      "loraplus_unet_lr_ratio=4"])
    network, _ = build_network(args, family, print)
    groups, descriptions = network.prepare_optimizer_params(1e-5, 1e-4, 1e-4)
    by_name = dict(zip(descriptions, groups, strict=True))
    assert by_name["unet plus"]["lr"] == pytest.approx(4e-4)  # network_args' UNet ratio
    assert by_name["textencoder plus"]["lr"] == pytest.approx(2e-5)  # the command line's text encoder ratio
    assert {id(p) for p in by_name["unet plus"]["params"]} == {id(m.lora_up.weight) for m in network.unet_loras}
