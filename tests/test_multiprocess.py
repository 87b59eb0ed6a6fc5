"""Two processes (gloo on CPU) train the same LoRA as one process with twice the batch.

`accelerate launch --cpu --num_processes 2` starts only one process; two real processes need
ACCELERATE_USE_CPU=true with --multi_gpu (see ../shared/TINY_MODELS.md). The test checks the
run's own report that two processes ran.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

import train_network
from library.loss_curve import read_loss_curve

ROOT = Path(__file__).resolve().parent.parent


def test_two_processes_equal_one_with_the_global_batch(tmp_path, tiny_sd_dir, tiny_images, free_port):
    def data(batch_size: int) -> Path:
        path = tmp_path / f"data{batch_size}.toml"
        path.write_text(f"[[datasets]]\nresolution = 64\nbatch_size = {batch_size}\n"
                        f"[[datasets.subsets]]\nimage_dir = \"{tiny_images}\"\n")
        return path

    common = ["--pretrained_model_name_or_path", str(tiny_sd_dir), "--output_name", "lora", "--network_dim", "4",
              "--learning_rate", "0.5", "--seed", "5",
              # SGD is linear in the gradient, so float reduction-order noise stays small (Adam's
              # g/sqrt(v) would blow it up to the size of a whole step for near-zero gradients).
              "--optimizer_type", "SGD", "--max_grad_norm", "0", "--max_train_steps", "4", "--cache_latents",
              # a schedule that moves: accelerate's prepared scheduler would step once per process (2x fast)
              "--lr_scheduler", "cosine", "--lr_warmup_steps", "1"]
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port),
           "--quiet", str(ROOT / "train_network.py"), *common, "--dataset_config", str(data(1)),
           "--output_dir", str(tmp_path / "two"), "--save_state", "--save_every_n_steps", "2"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "num_processes                2" in output, "two processes did not really run"
    assert "global batch           2 = 1 per process x 2 processes" in output
    # each process's random states reach the state folder, and no temporary folder is left beside it
    state = tmp_path / "two" / "lora-step00000002-state"
    assert (state / "random_states_0.pkl").is_file() and (state / "random_states_1.pkl").is_file()
    assert not list((tmp_path / "two").glob("*.tmp"))

    assert train_network.main([*common, "--dataset_config", str(data(2)), "--output_dir", str(tmp_path / "one")]) == 0
    two = load_file(str(tmp_path / "two" / "lora.safetensors"))
    one = load_file(str(tmp_path / "one" / "lora.safetensors"))
    assert two.keys() == one.keys()
    moved = sum(one[k].abs().sum().item() for k in one if "lora_up" in k)
    assert moved > 0
    worst = max((two[k] - one[k]).abs().max().item() for k in one)
    assert worst < 1e-5, f"largest difference {worst}"
    lrs = [[lr for _, _, lr in read_loss_curve(tmp_path / run / "lora_loss.csv", up_to=10)] for run in ("two", "one")]
    assert lrs[0] == pytest.approx(lrs[1]) and len(set(lrs[0])) > 2, lrs


def test_two_processes_with_parameters_that_get_no_gradient(tmp_path, tiny_sd_dir, tiny_images, free_port):
    """--clip_skip 2 leaves the text encoder's last layer unread and module_dropout skips modules at random
    (differently per process): DDP must be told to look for unused parameters, or the second step stops with
    'Expected to have finished reduction in the prior iteration'."""
    data = tmp_path / "data.toml"
    data.write_text(f"[[datasets]]\nresolution = 64\nbatch_size = 1\n"
                    f"[[datasets.subsets]]\nimage_dir = \"{tiny_images}\"\n")
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port), "--quiet", str(ROOT / "train_network.py"),
           "--pretrained_model_name_or_path", str(tiny_sd_dir), "--dataset_config", str(data),
           "--output_dir", str(tmp_path / "out"), "--output_name", "lora", "--network_dim", "4", "--seed", "2",
           "--max_train_steps", "3", "--cache_latents", "--clip_skip", "2", "--network_args", "module_dropout=0.5"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert (tmp_path / "out" / "lora.safetensors").is_file()


def test_an_error_every_process_hits_is_printed_once(tmp_path, tiny_sd_dir, tiny_images, free_port):
    data = tmp_path / "data.toml"
    data.write_text(f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = \"{tiny_images}\"\n")
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    missing = tmp_path / "missing.safetensors"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port), "--quiet", str(ROOT / "train_network.py"),
           "--pretrained_model_name_or_path", str(tiny_sd_dir), "--dataset_config", str(data),
           "--output_dir", str(tmp_path / "out"), "--network_weights", str(missing), "--max_train_steps", "1"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert output.count(f"error: LoRA weights file not found: {missing}") == 1, output[-4000:]
