"""train_network.main() in-process on a tiny SD model: cadence, naming, resume, errors.

The launcher adds nothing to these behaviours, so they run without `accelerate launch`
to keep the suite fast; tests/test_e2e_sd.py covers the launched path.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import train_network


def _data_toml(tmp_path: Path, images: Path, batch_size: int = 2, repeats: int = 1) -> Path:
    path = tmp_path / "data.toml"
    path.write_text(f"[[datasets]]\nresolution = 64\nbatch_size = {batch_size}\n"
                    f"  [[datasets.subsets]]\n  image_dir = \"{images}\"\n  num_repeats = {repeats}\n")
    return path


def _run(model: Path, data: Path, out: Path, *extra: str) -> int:
    argv = ["--pretrained_model_name_or_path", str(model), "--dataset_config", str(data),
            "--output_dir", str(out), "--output_name", "lora", "--network_dim", "4", "--learning_rate", "1e-2",
            "--seed", "3", "--cache_latents", *extra]
    return train_network.main(argv)


def test_epoch_cadence_names_and_rotation(tmp_path, tiny_sd_dir, tiny_images):
    data = _data_toml(tmp_path, tiny_images)  # 8 images, batch 2 -> 4 steps per epoch
    out = tmp_path / "out"
    assert _run(tiny_sd_dir, data, out, "--max_train_epochs", "4", "--save_every_n_epochs", "1",
                "--save_last_n_epochs", "2", "--network_train_unet_only") == 0
    names = sorted(p.name for p in out.glob("*.safetensors"))
    # epochs 1..3 were saved, rotation kept the last two; the final file has no epoch suffix
    assert names == ["lora-000002.safetensors", "lora-000003.safetensors", "lora.safetensors"]
    sd = load_file(str(out / "lora.safetensors"))
    assert not any(k.startswith("lora_te_") for k in sd), "--network_train_unet_only saved text-encoder modules"
    rows = (out / "lora_loss.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 16


def test_state_folders_rotate_with_their_own_counts(tmp_path, tiny_sd_dir, tiny_images):
    data = _data_toml(tmp_path, tiny_images, batch_size=4)  # 8 images, batch 4 -> 2 steps per epoch, 8 in all
    out = tmp_path / "out"
    assert _run(tiny_sd_dir, data, out, "--max_train_epochs", "4", "--network_train_unet_only", "--save_state",
                "--save_every_n_epochs", "1", "--save_last_n_epochs", "2", "--save_last_n_epochs_state", "1",
                "--save_every_n_steps", "3", "--save_last_n_steps_state", "3") == 0
    models = sorted(p.name for p in out.glob("*.safetensors"))
    states = sorted(p.name for p in out.glob("*-state"))
    # files: epochs 1-3 saved, the last 2 kept; steps 3 and 6 saved, all kept (no --save_last_n_steps)
    assert models == ["lora-000002.safetensors", "lora-000003.safetensors", "lora-step00000003.safetensors",
                      "lora-step00000006.safetensors", "lora.safetensors"]
    # states: only the last epoch state and the step states saved in the last 3 steps (at step 6 - 3 = 3 or later,
    # as sd-scripts), plus the final one
    assert states == ["lora-000003-state", "lora-state", "lora-step00000003-state", "lora-step00000006-state"]
    assert not list(out.glob("*.tmp")) and not list(out.glob("*.old"))


def test_resume_continues_exactly(tmp_path, tiny_sd_dir, tiny_images):
    data = _data_toml(tmp_path, tiny_images, batch_size=2, repeats=1)
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _run(tiny_sd_dir, data, straight, "--max_train_steps", "6") == 0
    # 3 steps (in the middle of the first 4-step epoch), state saved, then resumed to 6
    assert _run(tiny_sd_dir, data, split, "--max_train_steps", "3", "--save_state") == 0
    assert (split / "lora-state" / "train_state.json").is_file()
    assert _run(tiny_sd_dir, data, split, "--max_train_steps", "6", "--resume", "latest") == 0
    a, b = load_file(str(straight / "lora.safetensors")), load_file(str(split / "lora.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    rows = (split / "lora_loss.csv").read_text().strip().splitlines()
    # the resumed run trained steps 4-6 and its loss curve still holds steps 1-3 of the first run
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4", "5", "6"]
    straight_rows = (straight / "lora_loss.csv").read_text().strip().splitlines()
    assert [r.split(",")[1] for r in rows[1:]] == [r.split(",")[1] for r in straight_rows[1:]]


def test_resume_without_state_is_an_error(tmp_path, tiny_sd_dir, tiny_images, capsys):
    data = _data_toml(tmp_path, tiny_images)
    code = _run(tiny_sd_dir, data, tmp_path / "out", "--max_train_steps", "2", "--resume", "latest")
    assert code == 2
    assert "no complete state folder" in capsys.readouterr().err


def test_output_dir_below_a_file_is_an_error(tmp_path, tiny_sd_dir, tiny_images, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = _run(tiny_sd_dir, _data_toml(tmp_path, tiny_images), blocker / "out", "--max_train_steps", "1")
    assert code == 2
    assert "a file is in the way" in capsys.readouterr().err


def test_network_weights_continue_from_a_file(tmp_path, tiny_sd_dir, tiny_images):
    data = _data_toml(tmp_path, tiny_images)
    first = tmp_path / "first"
    assert _run(tiny_sd_dir, data, first, "--max_train_steps", "2") == 0
    second = tmp_path / "second"
    # a vanishing learning rate: the output must equal the loaded weights exactly
    assert _run(tiny_sd_dir, data, second, "--max_train_steps", "1", "--learning_rate", "1e-30",
                "--network_weights", str(first / "lora.safetensors")) == 0
    a, b = load_file(str(first / "lora.safetensors")), load_file(str(second / "lora.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dim_from_weights_records_the_files_ranks_not_the_command_lines(tmp_path, tiny_sd_dir, tiny_images):
    data = _data_toml(tmp_path, tiny_images)
    first = tmp_path / "first"
    assert _run(tiny_sd_dir, data, first, "--max_train_steps", "1", "--network_alpha", "2", "--network_args",
                "conv_dim=2", "conv_alpha=1") == 0
    second = tmp_path / "second"
    # --network_dim 8 / --network_alpha 8 are not used (the file decides), so they must not be recorded
    assert _run(tiny_sd_dir, data, second, "--max_train_steps", "1", "--network_dim", "8", "--network_alpha", "8",
                "--network_weights", str(first / "lora.safetensors"), "--dim_from_weights") == 0
    with safe_open(str(second / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "2.0")
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0"}


def test_ranks_of_modules_says_dynamic_where_modules_differ():
    from library.train_metadata import ranks_of_modules
    from networks.lora import LoRAModule

    loras = [LoRAModule("a", torch.nn.Linear(8, 8), lora_dim=4, alpha=2),
             LoRAModule("b", torch.nn.Linear(8, 8), lora_dim=2, alpha=2),
             LoRAModule("c", torch.nn.Conv2d(8, 8, 3), lora_dim=2, alpha=1)]
    assert ranks_of_modules(loras) == ("Dynamic", 2.0, {"conv_dim": "2", "conv_alpha": "1.0"})
    assert ranks_of_modules(loras[:1]) == (4, 2.0, {})
    assert ranks_of_modules([torch.nn.Linear(2, 2)]) is None  # not a LoRA module: the caller keeps its values


def test_a_train_batch_size_the_toml_overrides_is_warned_about(tmp_path, tiny_sd_dir, tiny_images, caplog):
    data = _data_toml(tmp_path, tiny_images, batch_size=2)
    with caplog.at_level("WARNING"):
        assert _run(tiny_sd_dir, data, tmp_path / "out", "--max_train_steps", "1", "--train_batch_size", "1") == 0
    assert f"--train_batch_size 1 (command line) is not used: batch_size = 2 in {data} wins" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # the same value, or none given: nothing to say
        assert _run(tiny_sd_dir, data, tmp_path / "again", "--max_train_steps", "1", "--train_batch_size", "2") == 0
    assert "--train_batch_size" not in caplog.text


def test_missing_caption_files_are_reported(tmp_path, tiny_sd_dir, tiny_images, capsys):
    data = tmp_path / "data.toml"
    data.write_text(f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = \"{tiny_images}\"\n"
                    "caption_extension = \".txt\"\n")
    code = _run(tiny_sd_dir, data, tmp_path / "out", "--max_train_steps", "1")
    err = capsys.readouterr().err
    assert code == 2 and ".caption" in err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize("extra, message", [
    (["--mixed_precision", "fp32"], None),  # argparse rejects it itself (exit via SystemExit)
    (["--optimizer_type", "AdamX"], "did you mean 'AdamW'"),
    (["--lr_scheduler", "cosin"], "did you mean 'cosine'"),
    (["--network_args", "conv_dimm=4"], "did you mean 'conv_dim'"),
    (["--learning_rate", "0"], "nothing to train"),
])
def test_bad_arguments_are_clear_errors(tmp_path, tiny_sd_dir, tiny_images, capsys, extra, message):
    data = _data_toml(tmp_path, tiny_images)
    if message is None:
        with pytest.raises(SystemExit):
            _run(tiny_sd_dir, data, tmp_path / "out", *extra)
        return
    assert _run(tiny_sd_dir, data, tmp_path / "out", "--max_train_steps", "1", *extra) == 2
    assert message in capsys.readouterr().err


def test_two_resumes_in_a_row_with_buckets_equal_a_straight_run(tmp_path, tiny_sd_dir):
    from PIL import Image

    images = tmp_path / "mixed"
    images.mkdir()
    for i, size in enumerate([(64, 64)] * 5 + [(96, 48)] * 4 + [(48, 96)] * 3):
        Image.new("RGB", size, (40 * i % 255, 90, 200 - 10 * i)).save(images / f"{i:02d}.png")
        (images / f"{i:02d}.caption").write_text(f"sks shape {i}")
    data = tmp_path / "data.toml"
    data.write_text(f"[[datasets]]\nresolution = 64\nbatch_size = 2\nenable_bucket = true\nmin_bucket_reso = 32\n"
                    f"max_bucket_reso = 128\nbucket_reso_steps = 16\n"
                    f"[[datasets.subsets]]\nimage_dir = \"{images}\"\nnum_repeats = 1\n")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _run(tiny_sd_dir, data, straight, "--max_train_steps", "8") == 0
    # 3 and 5 are inside an epoch (buckets of 5, 4 and 3 samples give 3 + 2 + 2 = 7 steps per epoch)
    for steps in ("3", "5"):
        extra = ["--resume", "latest"] if steps == "5" else []
        assert _run(tiny_sd_dir, data, split, "--max_train_steps", steps, "--save_state", *extra) == 0
    assert _run(tiny_sd_dir, data, split, "--max_train_steps", "8", "--resume", "latest") == 0
    a, b = load_file(str(straight / "lora.safetensors")), load_file(str(split / "lora.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_validation_loss_is_logged_with_fixed_draws(tmp_path, tiny_sd_dir, tiny_images, capsys):
    data = tmp_path / "data.toml"
    data.write_text(f"[[datasets]]\nresolution = 64\nbatch_size = 2\nvalidation_split = 0.25\n"
                    f"[[datasets.subsets]]\nimage_dir = \"{tiny_images}\"\n")
    # a vanishing learning rate: the weights do not move, so every validation must give the same value
    assert _run(tiny_sd_dir, data, tmp_path / "out", "--max_train_steps", "4", "--learning_rate", "1e-30",
                "--validate_every_n_steps", "2") == 0
    out = capsys.readouterr().out
    values = [line.split(": ")[1] for line in out.splitlines() if line.startswith("validation loss at step")]
    assert len(values) == 2 and values[0] == values[1]
    assert "6 training images" in out  # 2 of the 8 images were held out
    assert "(validation)" in out or "validation" in out


def test_latents_cached_to_disk_are_reused_and_invalidated(tmp_path, tiny_sd_dir, tiny_images):
    import shutil

    from PIL import Image

    images = tmp_path / "images"
    shutil.copytree(tiny_images, images)
    data = _data_toml(tmp_path, images)
    assert _run(tiny_sd_dir, data, tmp_path / "disk", "--max_train_steps", "2", "--cache_latents_to_disk") == 0
    files = sorted(images.glob("*.latent.safetensors"))
    assert len(files) == 8 and files[0].name == "img_000_64x64.latent.safetensors"
    stamps = {f.name: f.stat().st_mtime_ns for f in files}
    # same result as the in-memory cache
    assert _run(tiny_sd_dir, data, tmp_path / "memory", "--max_train_steps", "2") == 0
    a = load_file(str(tmp_path / "disk" / "lora.safetensors"))
    b = load_file(str(tmp_path / "memory" / "lora.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # change one image: only its cache file is rewritten on the next run
    Image.new("RGB", (64, 64), (1, 2, 3)).save(images / "img_003.png")
    assert _run(tiny_sd_dir, data, tmp_path / "again", "--max_train_steps", "1", "--cache_latents_to_disk") == 0
    changed = {f.name for f in images.glob("*.latent.safetensors") if f.stat().st_mtime_ns != stamps[f.name]}
    assert changed == {"img_003_64x64.latent.safetensors"}


def test_fp8_base_trains_with_float8_weights(tmp_path, tiny_sd_dir, tiny_images, monkeypatch):
    from library import fp8

    seen = {}
    real = fp8.store_in_fp8

    def spy(model, dtype):
        seen["count"] = real(model, dtype)
        seen["dtypes"] = {m.weight.dtype for m in model.modules() if isinstance(m, torch.nn.Linear)}
        return seen["count"]

    monkeypatch.setattr(train_network, "store_in_fp8", spy)
    data = _data_toml(tmp_path, tiny_images)
    assert _run(tiny_sd_dir, data, tmp_path / "out", "--max_train_steps", "2", "--fp8_base",
                "--mixed_precision", "bf16") == 0
    assert seen["count"] > 0 and seen["dtypes"] == {torch.float8_e4m3fn}
    sd = load_file(str(tmp_path / "out" / "lora.safetensors"))
    assert all(torch.isfinite(v.float()).all() for v in sd.values())
    assert any(v.abs().sum() > 0 for k, v in sd.items() if "lora_up" in k)


def test_fp8_linear_is_close_to_bf16():
    from library.fp8 import store_in_fp8

    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Conv2d(4, 8, 3, padding=1))
    x, img = torch.randn(5, 64), torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        ref_lin, ref_conv = layer[0](x), layer[1](img)
        assert store_in_fp8(layer, torch.bfloat16) == 2
        got_lin, got_conv = layer[0](x).float(), layer[1](img).float()
    assert layer[0].weight.dtype == torch.float8_e4m3fn
    assert (got_lin - ref_lin).abs().max() < 0.1 * ref_lin.abs().max()
    assert (got_conv - ref_conv).abs().max() < 0.1 * ref_conv.abs().max()


def test_torch_compile_regionally_gives_the_eager_result(tmp_path, tiny_sd_dir, tiny_images, capsys):
    data = _data_toml(tmp_path, tiny_images)
    # dynamo's "eager" backend traces the blocks without code generation: the fast way to prove the
    # LoRA forward compiles inside each block; inductor is the same path with generated kernels.
    assert _run(tiny_sd_dir, data, tmp_path / "compiled", "--max_train_steps", "2", "--dynamo_backend", "eager",
                "--network_train_unet_only") == 0
    assert "repeated blocks compiled one by one" in capsys.readouterr().out
    assert _run(tiny_sd_dir, data, tmp_path / "eager", "--max_train_steps", "2", "--network_train_unet_only") == 0
    a = load_file(str(tmp_path / "compiled" / "lora.safetensors"))
    b = load_file(str(tmp_path / "eager" / "lora.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_gradient_checkpointing_gives_the_same_weights(tmp_path, tiny_sd_dir, tiny_images):
    data = _data_toml(tmp_path, tiny_images)
    assert _run(tiny_sd_dir, data, tmp_path / "ckpt", "--max_train_steps", "2", "--gradient_checkpointing") == 0
    assert _run(tiny_sd_dir, data, tmp_path / "plain", "--max_train_steps", "2") == 0
    a = load_file(str(tmp_path / "ckpt" / "lora.safetensors"))
    b = load_file(str(tmp_path / "plain" / "lora.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_resume_without_seed_takes_the_saved_seed(tmp_path, tiny_sd_dir, tiny_images):
    data = _data_toml(tmp_path, tiny_images)
    args = ["--pretrained_model_name_or_path", str(tiny_sd_dir), "--dataset_config", str(data), "--output_dir",
            str(tmp_path / "out"), "--output_name", "lora", "--network_dim", "4", "--cache_latents"]
    assert train_network.main([*args, "--max_train_steps", "1", "--save_state"]) == 0
    # no --seed either time: the resume must reuse the first run's random seed, not refuse it as changed
    assert train_network.main([*args, "--max_train_steps", "2", "--resume", "latest"]) == 0


def test_full_bf16_and_no_half_vae(tmp_path, tiny_sd_dir, tiny_images, monkeypatch):
    from library import train_setup

    seen = {}
    real = train_setup.build_network

    def spy(args, family, log):
        network, kwargs = real(args, family, log)
        seen["lora"] = {p.dtype for p in network.parameters()}
        seen["vae"], seen["unet"] = family.vae.dtype, family.unet.dtype
        return network, kwargs

    monkeypatch.setattr(train_setup, "build_network", spy)
    data = _data_toml(tmp_path, tiny_images)
    assert _run(tiny_sd_dir, data, tmp_path / "out", "--max_train_steps", "1", "--mixed_precision", "bf16",
                "--full_bf16", "--no_half_vae") == 0
    assert seen == {"lora": {torch.bfloat16}, "vae": torch.float32, "unet": torch.bfloat16}
    # saved as float32 (the default --save_precision) whatever the training dtype
    assert {v.dtype for v in load_file(str(tmp_path / "out" / "lora.safetensors")).values()} == {torch.float32}


def test_attention_is_sdpa_by_default(tiny_sd_dir):
    from diffusers.models.attention_processor import AttnProcessor2_0

    from library.families.sd import SDFamily

    family = SDFamily.load(str(tiny_sd_dir))
    processors = set(type(p) for p in family.unet.attn_processors.values())
    assert processors == {AttnProcessor2_0}  # torch's scaled_dot_product_attention


def test_in_json_fine_tuning_layout_trains_with_the_json_captions(tmp_path, tiny_sd_dir, tiny_images, capsys):
    # sd-scripts' fine-tune layout: --train_data_dir (flat) + --in_json (image name -> caption / tags)
    import json

    names = sorted(p.stem for p in tiny_images.glob("*.png"))[:5]
    meta = tmp_path / "md.json"
    meta.write_text(json.dumps({n: {"caption": "a photo of zqx", "tags": "red, square"} for n in names}))
    out = tmp_path / "out"
    argv = ["--pretrained_model_name_or_path", str(tiny_sd_dir), "--train_data_dir", str(tiny_images),
            "--in_json", str(meta), "--dataset_repeats", "2", "--resolution", "64", "--output_dir", str(out),
            "--output_name", "lora", "--network_dim", "4", "--max_train_steps", "1", "--seed", "1"]
    assert train_network.main(argv) == 0
    metadata = safe_open(str(out / "lora.safetensors"), "pt").metadata()
    assert metadata["ss_num_train_images"] == "10"  # the 5 images of the JSON, not the folder's 8, x 2 repeats
    # training switches under sd-scripts' names
    keys = ("ss_max_grad_norm", "ss_loss_type", "ss_gradient_checkpointing", "ss_debiased_estimation",
            "ss_ip_noise_gamma", "ss_huber_scale")
    assert [metadata[k] for k in keys] == ["1.0", "l2", "False", "False", "None", "1.0"]
    tags = json.loads(metadata["ss_tag_frequency"])
    assert tags[tiny_images.name] == {"a photo of zqx": 5, "red": 5, "square": 5}  # keyed by folder
    # --in_json without the folder it refers to is refused before anything loads
    assert train_network.main([a for a in argv if a not in ("--train_data_dir", str(tiny_images))]) == 2
    assert "--in_json needs --train_data_dir" in capsys.readouterr().err


def test_each_parameter_group_logs_its_learning_rate(tmp_path, tiny_sd_dir, tiny_images):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from library.loss_curve import read_loss_curve

    out, logs = tmp_path / "out", tmp_path / "logs"
    assert _run(tiny_sd_dir, _data_toml(tmp_path, tiny_images), out, "--max_train_steps", "2", "--unet_lr", "1e-3",
                "--text_encoder_lr", "1e-5", "--logging_dir", str(logs)) == 0
    events = EventAccumulator(str(next(logs.rglob("events.out.tfevents.*")).parent)).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"lr/textencoder", "lr/unet"} <= scalars
    assert events.Scalars("lr/unet")[-1].value == pytest.approx(1e-3)
    assert events.Scalars("lr/textencoder")[-1].value == pytest.approx(1e-5)
    # the loss curve's learning rate is the UNet's, not the first group's (the text encoder's)
    assert read_loss_curve(out / "lora_loss.csv", up_to=10)[-1][2] == pytest.approx(1e-3)
