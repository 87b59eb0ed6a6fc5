"""sd-scripts arguments that act around the optimizer step: --scale_weight_norms, --stop_text_encoder_training,
--lr_scheduler_type, and the accepted no-op switches (unit level, then in-process runs on a tiny SD model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_network
from library.step_controls import TextEncoderStop
from library.tiny_models import tiny_clip_text_encoder, tiny_clip_tokenizer, tiny_unet
from networks import lora
from networks.functional import delta_norm, delta_weight


def _network(conv: bool = True) -> lora.LoRANetwork:
    te, unet = tiny_clip_text_encoder(len(tiny_clip_tokenizer())), tiny_unet()
    extra = {"conv_dim": "4", "conv_alpha": "2"} if conv else {}
    network = lora.create_network(1.0, 4, 8.0, None, te, unet, **extra)
    network.apply_to(te, unet)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in network.all_loras():
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=gen) * 0.1)
    return network


def _delta_norms(loras) -> list[float]:
    return [delta_weight(m.lora_down.weight, m.lora_up.weight, m.scale).norm().item() for m in loras]


def test_delta_norm_equals_the_norm_of_the_delta():
    network = _network()
    convs = [m for m in network.all_loras() if m.lora_down.weight.dim() == 4 and m.lora_down.weight.shape[-1] == 3]
    assert convs, "the check must cover 3x3 conv LoRAs too"
    for module in network.all_loras():
        got = delta_norm(module.lora_down.weight, module.lora_up.weight, module.scale).item()
        assert got == pytest.approx(_delta_norms([module])[0], rel=1e-4)


def test_max_norm_regularization_caps_every_module_and_counts_them():
    network = _network()
    loras = network.all_loras()
    before = _delta_norms(loras)
    limit = sorted(before)[len(before) // 2]  # the median: about half the modules are above it
    weights = {m.lora_name: (m.lora_down.weight.clone(), m.lora_up.weight.clone()) for m in loras}
    keys_scaled, mean_norm, max_norm = network.apply_max_norm_regularization(limit, "cpu")
    after = _delta_norms(loras)
    assert keys_scaled == sum(b > limit for b in before) and 0 < keys_scaled < len(loras)
    assert all(a <= limit * (1 + 1e-5) for a in after)
    for module, b, a in zip(loras, before, after, strict=True):
        down, up = weights[module.lora_name]
        if b > limit:  # scaled to the limit, up and down by the same factor
            assert a == pytest.approx(limit, rel=1e-5)
            ratio = module.lora_up.weight.norm() / up.norm()
            assert (module.lora_down.weight.norm() / down.norm()).item() == pytest.approx(ratio.item(), rel=1e-5)
        else:  # below it: untouched
            assert torch.equal(module.lora_down.weight, down) and torch.equal(module.lora_up.weight, up)
    assert mean_norm == pytest.approx(sum(after) / len(after), rel=1e-4)
    assert max_norm == pytest.approx(limit, rel=1e-5)
    # a second pass finds nothing above the limit (up to rounding) and changes nothing noticeable
    again, _, _ = network.apply_max_norm_regularization(limit * (1 + 1e-4), "cpu")
    assert again == 0


def test_text_encoder_stop_with_several_processes_drops_synced_gradients():
    network = _network(conv=False)
    for p in network.parameters():
        p.grad = torch.ones_like(p)

    class Family:
        train_text_encoder = True

    family, lines = Family(), []
    stop = TextEncoderStop(3, network, family, 2, lines.append)
    stop.update(2)
    stop.drop_gradients()
    assert all(p.grad is not None for p in network.parameters())  # not yet
    stop.update(3)
    stop.drop_gradients()
    te = {id(p) for m in network.text_encoder_loras for p in m.parameters()}
    for p in network.parameters():
        assert (p.grad is None) == (id(p) in te)
        assert p.requires_grad  # DDP was built with these: the graph stays, only their gradients go
    assert family.train_text_encoder and lines and "stops training at step 3" in lines[0]


# --- in-process runs ---------------------------------------------------------------------------


def _data_toml(tmp_path: Path, images: Path, batch_size: int = 2) -> Path:
    path = tmp_path / "data.toml"
    path.write_text(f"[[datasets]]\nresolution = 64\nbatch_size = {batch_size}\n"
                    f"  [[datasets.subsets]]\n  image_dir = \"{images}\"\n")
    return path


def _run(model: Path, data: Path, out: Path, *extra: str) -> int:
    argv = ["--pretrained_model_name_or_path", str(model), "--dataset_config", str(data),
            "--output_dir", str(out), "--output_name", "lora", "--network_dim", "4", "--learning_rate", "1e-2",
            "--seed", "3", "--cache_latents", *extra]
    return train_network.main(argv)


def test_scale_weight_norms_in_training(tmp_path, tiny_sd_dir, tiny_images, monkeypatch):
    import accelerate

    logged: list[dict] = []
    monkeypatch.setattr(accelerate.Accelerator, "log", lambda self, values, step=None, **kw: logged.append(values))
    limit = 1e-4
    assert _run(tiny_sd_dir, _data_toml(tmp_path, tiny_images), tmp_path / "out", "--max_train_steps", "2",
                "--scale_weight_norms", str(limit)) == 0
    sd = load_file(str(tmp_path / "out" / "lora.safetensors"))
    names = [k.removesuffix(".lora_down.weight") for k in sd if k.endswith(".lora_down.weight")]
    for name in names:
        scale = sd[f"{name}.alpha"].item() / sd[f"{name}.lora_down.weight"].shape[0]
        norm = delta_weight(sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"], scale).norm().item()
        assert norm <= limit * (1 + 1e-5), name
    steps = [v for v in logged if "loss/current" in v]
    assert len(steps) == 2
    for values in steps:  # sd-scripts' tracker keys, every step
        assert 0 < values["max_norm/keys_scaled"] <= len(names)
        assert values["max_norm/max_key_norm"] <= limit * (1 + 1e-5)
        assert 0 < values["max_norm/average_key_norm"] <= values["max_norm/max_key_norm"]



def test_sd_scripts_loss_tags_average_and_epoch(tmp_path, tiny_sd_dir, tiny_images, monkeypatch):
    """loss/average: the mean over the last epoch's worth of steps; loss/epoch: each epoch's mean, logged at
    the global step (sd-scripts logs it at step = epoch, behind the steps already logged, which wandb drops)."""
    import accelerate

    logged: list[tuple[int, dict]] = []
    monkeypatch.setattr(accelerate.Accelerator, "log",
                        lambda self, values, step=None, **kw: logged.append((step, values)))
    # 8 images, batch 4: 2 steps per epoch, 3 epochs
    assert _run(tiny_sd_dir, _data_toml(tmp_path, tiny_images, batch_size=4), tmp_path / "out",
                "--max_train_steps", "6", "--network_train_unet_only") == 0
    current = {step: v["loss/current"] for step, v in logged if "loss/current" in v}
    average = {step: v["loss/average"] for step, v in logged if "loss/average" in v}
    assert sorted(current) == [1, 2, 3, 4, 5, 6]
    assert average[1] == pytest.approx(current[1])
    for step in range(2, 7):
        assert average[step] == pytest.approx((current[step - 1] + current[step]) / 2)
    epochs = [(step, v["loss/epoch"]) for step, v in logged if "loss/epoch" in v]
    assert epochs == [(2, pytest.approx((current[1] + current[2]) / 2)),
                      (4, pytest.approx((current[3] + current[4]) / 2)),
                      (6, pytest.approx((current[5] + current[6]) / 2))]

def test_stop_text_encoder_training_freezes_only_the_text_encoder(tmp_path, tiny_sd_dir, tiny_images, capsys):
    out = tmp_path / "out"
    assert _run(tiny_sd_dir, _data_toml(tmp_path, tiny_images), out, "--max_train_steps", "4",
                "--save_every_n_steps", "1", "--stop_text_encoder_training", "2") == 0
    assert "--stop_text_encoder_training 2: the text encoder LoRA stops training at step 2" in capsys.readouterr().out
    files = [load_file(str(out / f"lora-step{s:08d}.safetensors")) for s in (1, 2, 3)]
    files.append(load_file(str(out / "lora.safetensors")))  # step 4

    def part(sd: dict, prefix: str) -> dict:
        return {k: v for k, v in sd.items() if k.startswith(prefix) and "lora_up" in k}

    te = [part(sd, "lora_te_") for sd in files]
    unet = [part(sd, "lora_unet_") for sd in files]
    assert te[0] and unet[0]
    assert any(not torch.equal(te[0][k], te[1][k]) for k in te[0])  # trained up to step 2
    for later in te[2:]:  # then frozen exactly
        assert all(torch.equal(te[1][k], later[k]) for k in te[1])
    for a, b in zip(unet[1:], unet[2:], strict=False):  # the UNet trains on: steps 2 -> 3 -> 4
        assert any(not torch.equal(a[k], b[k]) for k in a)


def test_lr_scheduler_type_and_no_op_switches_in_training(tmp_path, tiny_sd_dir, tiny_images, capsys):
    out, split, data = tmp_path / "out", tmp_path / "split", _data_toml(tmp_path, tiny_images)
    step_lr = ["--network_train_unet_only", "--lr_scheduler_type", "torch.optim.lr_scheduler.StepLR",
               "--lr_scheduler_args", "step_size=2", "gamma=0.5"]
    assert _run(tiny_sd_dir, data, out, "--max_train_steps", "4", *step_lr,
                "--xformers", "--mem_eff_attn", "--lowram", "--highvram") == 0
    rows = (out / "lora_loss.csv").read_text().strip().splitlines()[1:]
    # the learning rate after each step: StepLR halves it every 2 scheduler steps
    assert [float(r.split(",")[2]) for r in rows] == pytest.approx([1e-2, 5e-3, 5e-3, 2.5e-3])
    printed = capsys.readouterr().out
    for flag in ("--xformers", "--mem_eff_attn", "--lowram", "--highvram"):
        assert f"{flag}: accepted for sd-scripts compatibility;" in printed
    # the custom scheduler's position is part of the saved state: a resumed run continues it exactly
    assert _run(tiny_sd_dir, data, split, "--max_train_steps", "3", "--save_state", *step_lr) == 0
    assert _run(tiny_sd_dir, data, split, "--max_train_steps", "4", "--resume", "latest", *step_lr) == 0
    assert (split / "lora_loss.csv").read_text() == (out / "lora_loss.csv").read_text()
    a, b = load_file(str(out / "lora.safetensors")), load_file(str(split / "lora.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
