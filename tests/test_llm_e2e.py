"""End to end: `accelerate launch train_network.py --config_file ... --dataset_config ...` on a tiny
Llama folder with --model_type auto, then the PEFT folder is loaded by PEFT.

Proves: auto detection picks the LLM family; the LLM LoRA defaults apply (dim 16, alpha 16, every
Linear of attention and MLP); the PEFT folder and the kohya-style file are written at each save;
PEFT's logits equal our network's; a run resumed from the step-3 state ends with the same adapter
as the straight run; a bad dataset row stops the run with file:line and no traceback.
"""

from __future__ import annotations

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
PROJ = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def launch(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="2", PYTHONPATH=str(ROOT))
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--quiet", str(ROOT / "train_network.py"), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _write_configs(work: Path, model: Path, data: dict[str, Path], output_dir: Path) -> tuple[Path, Path]:
    (work / "train.toml").write_text(f"""
[model]
pretrained_model_name_or_path = "{model}"
[optimisation]
learning_rate = 1e-3
max_train_steps = 6
lr_scheduler = "cosine"
seed = 11
[saving]
output_dir = "{output_dir}"
output_name = "tiny_llm_lora"
save_every_n_steps = 3
save_state = true
""")
    (work / "data.toml").write_text(f"""
[general]
max_seq_length = 64
[[datasets]]
batch_size = 2
  [[datasets.subsets]]
  jsonl_file = "{data['chat']}"
  messages_column = "messages"
  [[datasets.subsets]]
  jsonl_file = "{data['instruct']}"
  prompt_column = "prompt"
  response_column = "response"
  [[datasets.subsets]]
  text_file = "{data['text']}"
""")
    return work / "train.toml", work / "data.toml"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from library.tiny_llm import save_tiny_llm, write_tiny_llm_data

    work = tmp_path_factory.mktemp("llm-e2e")
    model = save_tiny_llm(work / "tiny-llm", seed=0)
    data = write_tiny_llm_data(work / "data")
    return work, model, data


@pytest.fixture(scope="module")
def trained(setup):
    work, model, data = setup
    train, dataset = _write_configs(work, model, data, work / "out")
    result = launch(["--config_file", str(train), "--dataset_config", str(dataset)], work)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return work / "out", result


def _base(model: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model).eval()


def test_outputs_defaults_and_metadata(trained, setup):
    out, result = trained
    _, model, _ = setup
    for stem in ("tiny_llm_lora", "tiny_llm_lora-step00000003"):
        assert (out / stem / "adapter_model.safetensors").is_file() and (out / stem / "adapter_config.json").is_file()
        assert (out / f"{stem}.safetensors").is_file()
    assert (out / "tiny_llm_lora-step00000003-state").is_dir()
    config = json.loads((out / "tiny_llm_lora" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (16, 16, PROJ)
    assert config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == str(model.resolve())
    with safe_open(str(out / "tiny_llm_lora.safetensors"), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["ss_network_dim"] == "16" and meta["ss_network_alpha"] == "16.0"
    assert meta["ss_base_model_version"] == "llm" and meta["modelspec.architecture"] == "llm/lora"
    assert meta["ss_steps"] == "6" and "modelspec.prediction_type" not in meta
    assert "lora_unet_model_layers_1_mlp_down_proj.lora_down.weight" in keys and len(keys) == 2 * 7 * 3
    log = result.stdout + result.stderr
    assert "chat.jsonl (chat), 5 rows" in log and "corpus.txt (text), 8 rows" in log
    assert str(out / "tiny_llm_lora") in log


def test_peft_loads_the_folder_with_our_logits(trained, setup):
    from peft import PeftModel

    import networks.lora as lora

    out, _ = trained
    _, model, _ = setup
    ids = torch.tensor([[0, 5, 9, 40, 77, 120, 3, 200, 11, 60]])
    ours_model = _base(model)
    network, weights = lora.create_network_from_weights(1.0, str(out / "tiny_llm_lora.safetensors"), None, None,
                                                        ours_model)
    network.apply_to(None, ours_model)
    network.load_state_dict(weights)
    network.eval()
    peft_model = PeftModel.from_pretrained(_base(model), str(out / "tiny_llm_lora")).eval()
    with torch.no_grad():
        ours, theirs, plain = ours_model(ids).logits, peft_model(ids).logits, _base(model)(ids).logits
    assert (ours - plain).abs().max() > 1e-4, "training did not move the adapter"
    assert torch.allclose(theirs, ours, atol=1e-5), (theirs - ours).abs().max()


def test_resume_from_step_3_ends_with_the_same_adapter(trained, setup):
    out, _ = trained
    work, model, data = setup
    resumed = work / "resumed"
    train, dataset = _write_configs(work / "data", model, data, resumed)
    result = launch(["--config_file", str(train), "--dataset_config", str(dataset),
                     "--resume", str(out / "tiny_llm_lora-step00000003-state")], work)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    straight = load_file(str(out / "tiny_llm_lora" / "adapter_model.safetensors"))
    again = load_file(str(resumed / "tiny_llm_lora" / "adapter_model.safetensors"))
    assert straight.keys() == again.keys()
    assert all(torch.allclose(straight[k], again[k], atol=1e-6) for k in straight)


def test_a_bad_row_stops_the_run_with_file_and_line(setup, tmp_path):
    _, model, data = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "broken\n', encoding="utf-8")
    train, dataset = _write_configs(tmp_path, model, {**data, "text": data["text"]}, tmp_path / "out")
    dataset.write_text(f'[[datasets]]\n[[datasets.subsets]]\njsonl_file = "{bad}"\n')
    result = launch(["--config_file", str(train), "--dataset_config", str(dataset), "--model_type", "llm"], tmp_path)
    assert result.returncode != 0
    assert f"{bad}:2: not valid JSON" in result.stderr and "on_bad_row" in result.stderr
    assert "Traceback" not in result.stderr
