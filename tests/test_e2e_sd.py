"""End to end: `accelerate launch train_network.py` on a tiny SD model, then the LoRA file is
loaded by diffusers and checked against an independent merge of its weights.

This is the foundation issue's "Done when": every key names a real module; diffusers'
load_lora_weights applies exactly as many modules as the file holds; the UNet output after
loading equals an independent merge to 1e-4; training moved the weights; the stored
sshs_model_hash recomputes to the same value.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent


def launch(args: list[str], tmp_path: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run train_network.py through `accelerate launch`, as a user would."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="2",
               PYTHONPATH=str(ROOT))
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--quiet", str(ROOT / "train_network.py"), *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_sd_dir, tiny_images):
    work = tmp_path_factory.mktemp("e2e")
    (work / "train.toml").write_text(f"""
[model]
pretrained_model_name_or_path = "{tiny_sd_dir}"
[network]
network_module = "networks.lora"
network_dim = 4
network_alpha = 2.0
[optimisation]
learning_rate = 1e-2
max_train_steps = 6
lr_scheduler = "cosine"
lr_warmup_steps = 1
seed = 7
[saving]
output_dir = "{work / 'out'}"
output_name = "tiny_lora"
save_every_n_steps = 3
[logging]
logging_dir = "{work / 'logs'}"
""")
    (work / "data.toml").write_text(f"""
[general]
caption_extension = ".caption"
[[datasets]]
resolution = 64
batch_size = 2
  [[datasets.subsets]]
  image_dir = "{tiny_images}"
  num_repeats = 1
""")
    result = launch(["--config_file", str(work / "train.toml"), "--dataset_config", str(work / "data.toml")], work)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return work, result


def _module_table(unet, text_encoder) -> dict[str, torch.nn.Module]:
    """kohya name → module, computed here independently of networks/lora.py."""
    table = {"lora_unet_" + n.replace(".", "_"): m for n, m in unet.named_modules() if n}
    # transformers 5 dropped CLIPTextModel's `text_model` level; kohya names keep it.
    te_prefix = "lora_te_" if hasattr(text_encoder, "text_model") else "lora_te_text_model_"
    table.update({te_prefix + n.replace(".", "_"): m for n, m in text_encoder.named_modules() if n})
    return table


def _merge_into(unet, text_encoder, sd: dict[str, torch.Tensor]) -> None:
    """W += (alpha / r) · up @ down for every module in the file."""
    table = _module_table(unet, text_encoder)
    for key in sd:
        if not key.endswith(".lora_down.weight"):
            continue
        name = key.split(".")[0]
        down, up = sd[key].float(), sd[f"{name}.lora_up.weight"].float()
        alpha = sd[f"{name}.alpha"].item()
        weight = table[name].weight
        delta = (up.flatten(1) @ down.flatten(1)) * (alpha / down.shape[0])
        with torch.no_grad():
            weight += delta.reshape(weight.shape).to(weight.dtype)


def test_outputs_exist_and_are_reported(trained):
    work, result = trained
    out = work / "out"
    assert (out / "tiny_lora.safetensors").is_file()
    assert (out / "tiny_lora-step00000003.safetensors").is_file()
    assert (out / "tiny_lora_loss.png").is_file() and (out / "tiny_lora_loss.csv").is_file()
    rows = (out / "tiny_lora_loss.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 6  # header + one row per optimizer step
    assert str(out / "tiny_lora.safetensors") in result.stdout + result.stderr
    assert any((work / "logs").rglob("events.out.tfevents.*")), "tensorboard scalars missing"
    assert not list(out.glob("*.tmp*")), "a temporary file was left behind"


def test_file_loads_in_diffusers_exactly_as_merged(trained, tiny_sd_dir):
    from diffusers import StableDiffusionPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer

    work, _ = trained
    lora_file = work / "out" / "tiny_lora.safetensors"
    sd = load_file(str(lora_file))
    names = {k.split(".")[0] for k in sd}

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_dir), safety_checker=None)
    # every key names a real module of the model
    table = _module_table(pipe.unet, pipe.text_encoder)
    assert names <= set(table), sorted(names - set(table))[:5]
    assert any(n.startswith("lora_unet_") for n in names) and any(n.startswith("lora_te_") for n in names)
    # training moved the weights
    assert all(sd[f"{n}.lora_up.weight"].abs().sum() > 0 for n in names)

    merged_unet, merged_te = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder)
    _merge_into(merged_unet, merged_te, sd)

    pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
    applied = [m for model in (pipe.unet, pipe.text_encoder) for m in model.modules()
               if isinstance(m, BaseTunerLayer)]
    assert len(applied) == len(names)

    torch.manual_seed(0)
    latents = torch.randn(2, 4, 16, 16)
    ids = pipe.tokenizer(["sks red square", "a blue circle"], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        context = pipe.text_encoder(ids)[0]
        merged_context = merged_te(ids)[0]
        assert torch.allclose(context, merged_context, atol=1e-4)
        t = torch.tensor([10, 500])
        loaded = pipe.unet(latents, t, merged_context).sample
        expected = merged_unet(latents, t, merged_context).sample
    assert torch.allclose(loaded, expected, atol=1e-4), (loaded - expected).abs().max()


def test_metadata_and_hash(trained):
    work, _ = trained
    path = work / "out" / "tiny_lora.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_steps"] == "6"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert json.loads(meta["ss_tag_frequency"])  # captions were counted
    # sshs_model_hash: SHA-256 of the tensor bytes of the file serialised with only ss_* metadata
    from safetensors.torch import save

    tensors = load_file(str(path))
    ss_only = {k: v for k, v in meta.items() if k.startswith("ss_")}
    raw = save(tensors, ss_only)
    header = int.from_bytes(raw[:8], "little")
    assert hashlib.sha256(raw[8 + header:]).hexdigest() == meta["sshs_model_hash"]
    # and the tensor bytes in the file on disk hash the same
    disk = path.read_bytes()
    disk_header = int.from_bytes(disk[:8], "little")
    assert hashlib.sha256(disk[8 + disk_header:]).hexdigest() == meta["sshs_model_hash"]


def test_bad_config_key_is_a_clean_error(tmp_path, tiny_sd_dir, tiny_images):
    (tmp_path / "train.toml").write_text(f'pretrained_model_name_or_path = "{tiny_sd_dir}"\n'
                                         f'output_dir = "{tmp_path / "out"}"\nnetwork_dimm = 4\n')
    (tmp_path / "data.toml").write_text(f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{tiny_images}"\n')
    result = launch(["--config_file", str(tmp_path / "train.toml"), "--dataset_config",
                     str(tmp_path / "data.toml")], tmp_path, timeout=120)
    assert result.returncode != 0
    assert "network_dimm" in result.stderr and "did you mean 'network_dim'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
