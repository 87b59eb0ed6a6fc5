"""Text steps are token-weighted: accumulation and several processes equal one big batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_network
from library.loss_curve import read_loss_curve

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from library.tiny_llm import save_tiny_llm, write_tiny_llm_data

    work = tmp_path_factory.mktemp("llm-weighting")
    model = save_tiny_llm(work / "model")
    files = write_tiny_llm_data(work / "data")

    def data(batch_size: int) -> Path:
        path = work / f"data{batch_size}.toml"
        # no packing and mixed formats: the sequences have very different numbers of label tokens
        path.write_text(f"[general]\nmax_seq_length = 64\npacking = false\n"
                        f"[[datasets]]\nbatch_size = {batch_size}\n"
                        f"  [[datasets.subsets]]\n  jsonl_file = \"{files['chat']}\"\n"
                        f"  messages_column = \"messages\"\n"
                        f"  [[datasets.subsets]]\n  text_file = \"{files['text']}\"\n")
        return path

    return model, data


def _args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--dataset_config", str(data), "--output_dir", str(out),
            "--output_name", "lora", "--network_dim", "4", "--optimizer_type", "SGD", "--learning_rate", "0.5",
            "--max_grad_norm", "0", "--seed", "3", "--max_train_steps", "3", "--save_model_as", "safetensors",
            *extra]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "lora.safetensors"))


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, f"largest difference {worst}"
    assert any(a[k].abs().sum() > 0 for k in a if "lora_up" in k)


def test_accumulated_gradient_is_the_mean_over_all_tokens():
    """Two micro-batches with 3 and 1 loss tokens: the gradient is the mean over the 4 tokens,
    not the mean of the two micro-batch means (which would weigh the lone token 3 times more)."""
    from types import SimpleNamespace

    from library.train_setup import TokenWeighting

    weight = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    per_token = [torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), torch.tensor([[3.0, 0.0]])]
    accelerator = SimpleNamespace(num_processes=1, device=torch.device("cpu"))
    tokens = TokenWeighting()
    accumulation = 2
    for x in per_token:
        mean_loss = (x @ weight).mean()
        # accelerate divides every backward by the accumulation steps
        (tokens.weigh(mean_loss, {"num_label_tokens": len(x)}) / accumulation).backward()
    tokens.normalise([weight], accelerator, accumulation)
    expected = torch.cat(per_token).mean(dim=0)  # d/dw of the mean over all 4 tokens
    assert torch.allclose(weight.grad, expected)
    assert tokens.tokens == 0  # reset for the next step


def test_two_processes_equal_one(tmp_path, llm, free_port):
    model, data = llm
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port),
           "--quiet", str(ROOT / "train_network.py"), *_args(model, data(1), tmp_path / "two")]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "num_processes                2" in result.stdout + result.stderr
    assert train_network.main(_args(model, data(2), tmp_path / "one")) == 0
    _assert_same(_weights(tmp_path / "one"), _weights(tmp_path / "two"))


def test_accumulation_equals_one_big_batch(tmp_path, llm):
    """Batch 1 x accumulation 2 trains the same sequences per step as batch 2 (library/data/sampler.py),
    and token weighting makes the accumulated gradient the mean over the step's tokens."""
    model, data = llm
    assert train_network.main(_args(model, data(1), tmp_path / "accumulated", "--gradient_accumulation_steps",
                                    "2")) == 0
    assert train_network.main(_args(model, data(2), tmp_path / "one")) == 0
    _assert_same(_weights(tmp_path / "one"), _weights(tmp_path / "accumulated"))
    # the logged loss is token-weighted like the gradient, so the two runs log the same curve
    curves = [read_loss_curve(next((tmp_path / run).glob("*_loss.csv")), up_to=10**9) for run in ("one", "accumulated")]
    assert [s for s, _, _ in curves[0]] == [s for s, _, _ in curves[1]] and curves[0]
    for (_, a, _), (_, b, _) in zip(*curves, strict=True):
        assert a == pytest.approx(b, rel=1e-5)


def test_gradient_checkpointing_trains_the_same_adapter(tmp_path, llm, monkeypatch):
    """Checkpointed decoder layers (non-reentrant) under the chunked loss give the plain run's adapter."""
    import torch.utils.checkpoint

    model, data = llm
    calls = []
    real = torch.utils.checkpoint._checkpoint_without_reentrant_generator

    def counting(*args, **kwargs):  # (transformers binds checkpoint() itself early; this is looked up per call)
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "_checkpoint_without_reentrant_generator", counting)
    assert train_network.main(_args(model, data(2), tmp_path / "ckpt", "--gradient_checkpointing")) == 0
    assert calls, "no decoder layer was checkpointed (non-reentrant)"
    monkeypatch.undo()
    assert train_network.main(_args(model, data(2), tmp_path / "plain")) == 0
    _assert_same(_weights(tmp_path / "plain"), _weights(tmp_path / "ckpt"))
