"""train_network.py on a tiny causal LM: arguments that only make sense for images, and --fp8_base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import train_network


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    from library.tiny_llm import save_tiny_llm

    return save_tiny_llm(tmp_path_factory.mktemp("models") / "tiny-llm", seed=0)


@pytest.fixture(scope="module")
def data_toml(tmp_path_factory) -> Path:
    from library.tiny_llm import write_tiny_llm_data

    folder = tmp_path_factory.mktemp("llm-data")
    data = write_tiny_llm_data(folder)
    path = folder / "data.toml"
    path.write_text(f'[[datasets]]\nmax_seq_length = 64\nbatch_size = 2\n  [[datasets.subsets]]\n'
                    f'  jsonl_file = "{data["instruct"]}"\n  prompt_column = "prompt"\n'
                    f'  response_column = "response"\n')
    return path


def _run(model: Path, data: Path, out: Path, *extra: str) -> int:
    return train_network.main(["--pretrained_model_name_or_path", str(model), "--dataset_config", str(data),
                               "--output_dir", str(out), "--output_name", "lora", "--max_train_steps", "2",
                               "--learning_rate", "1e-3", "--seed", "1", "--save_model_as", "safetensors", *extra])


def _no_model_load(monkeypatch) -> None:
    import library.families

    monkeypatch.setattr(library.families, "load_family", lambda *a, **k: pytest.fail("the model was loaded"))


def test_image_only_arguments_are_refused_for_an_llm(llm_dir, data_toml, tmp_path, capsys, monkeypatch):
    _no_model_load(monkeypatch)
    out = tmp_path / "out"
    assert _run(llm_dir, data_toml, out, "--noise_offset", "0.1", "--min_snr_gamma", "5", "--cache_latents") == 2
    err = capsys.readouterr().err
    assert "apply to diffusion models, not to the causal LM" in err
    assert all(name in err for name in ("--noise_offset", "--min_snr_gamma", "--cache_latents"))
    assert not any(out.glob("lora*")), "a refused run leaves no output"


def test_a_bad_row_stops_the_run_before_the_model_loads(llm_dir, tmp_path, capsys, monkeypatch):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n', encoding="utf-8")
    data = tmp_path / "data.toml"
    data.write_text(f'[[datasets]]\nmax_seq_length = 64\n[[datasets.subsets]]\njsonl_file = "{rows}"\n'
                    'prompt_column = "prompt"\nresponse_column = "response"\n')
    _no_model_load(monkeypatch)
    out = tmp_path / "out"
    assert _run(llm_dir, data, out) == 2
    err = capsys.readouterr().err
    assert f"{rows}:2" in err and "response" in err
    assert not out.exists()


def test_rows_read_before_the_model_loads_are_the_rows_it_trains_on(llm_dir, data_toml, tmp_path, monkeypatch):
    """The data is tokenised once, before the model loads (with its tokenizer and config.json only), and the
    family trains on those sequences instead of reading the rows again."""
    from library.data import text_data

    calls = []
    real = text_data.build_text_data

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(text_data, "build_text_data", counting)
    assert _run(llm_dir, data_toml, tmp_path / "out") == 0
    assert len(calls) == 1


def test_fp8_base_without_mixed_precision_trains_an_llm(llm_dir, data_toml, tmp_path):
    out = tmp_path / "out"
    assert _run(llm_dir, data_toml, out, "--fp8_base") == 0
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        metadata = f.metadata()
        weights = {k: f.get_tensor(k) for k in f.keys()}
    assert all(torch.isfinite(v.float()).all() for v in weights.values())
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_up" in k)
    # The loss an LLM trains with, not the diffusion default "l2".
    assert metadata["ss_loss_type"] == "cross_entropy"
    assert metadata["ss_fp8_base"] == "True"
    assert json.loads(metadata["ss_network_args"]) is not None


def test_resume_with_network_dropout_is_exact(llm_dir, data_toml, tmp_path):
    # Dropout draws from the global RNG the state restores; starting the data iterator after the restore
    # must not take a draw from it (torch's DataLoader does, unless it has its own generator).
    from safetensors.torch import load_file

    common = ("--network_dropout", "0.2", "--max_train_steps", "4", "--lr_scheduler", "cosine")
    straight = tmp_path / "straight"
    assert _run(llm_dir, data_toml, straight, *common, "--save_every_n_steps", "2", "--save_state") == 0
    resumed = tmp_path / "resumed"
    assert _run(llm_dir, data_toml, resumed, *common, "--resume", str(straight / "lora-step00000002-state")) == 0
    a, b = load_file(str(straight / "lora.safetensors")), load_file(str(resumed / "lora.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), max((a[k] - b[k]).abs().max().item() for k in a)


def test_validation_loss_is_the_mean_over_label_tokens():
    import contextlib

    from library.train_setup import validation_loss

    class Family:
        model = torch.nn.Dropout(0.5)  # in training mode, as transformers' own checkpointing leaves a model

        def loss(self, batch, epoch):
            assert not self.model.training, "the validation loss ran with the model's dropout on"
            return batch["mean"]

        def network_inputs(self):
            return None, None, self.model

    class Accelerator:
        device = torch.device("cpu")
        process_index, num_processes = 0, 1

        def autocast(self):
            return contextlib.nullcontext()

    batches = [{"mean": torch.tensor(1.0), "num_label_tokens": torch.tensor(1)},
               {"mean": torch.tensor(3.0), "num_label_tokens": torch.tensor(3)}]
    # (1 * 1 + 3 * 3) / 4 tokens, not the mean of the two batch means (2.0)
    assert validation_loss(Family(), torch.nn.Linear(1, 1), batches, Accelerator(), None) == pytest.approx(2.5)
    images = [{"mean": torch.tensor(1.0)}, {"mean": torch.tensor(3.0)}]
    assert validation_loss(Family(), torch.nn.Linear(1, 1), images, Accelerator(), None) == pytest.approx(2.0)
    # two processes share the batches (every other one) and their sums add up to the one-process sums
    from library.train_setup import validation_sums

    assert Family.model.training, "the model's own mode is restored afterwards"
    Family.model.eval()  # validation_sums alone does not set modes
    three = [*batches, {"mean": torch.tensor(5.0), "num_label_tokens": torch.tensor(2)}]
    shares = [validation_sums(Family(), three, Accelerator(), None, rank, 2) for rank in (0, 1)]
    assert shares[1].tolist() == [9.0, 3.0]  # only the second batch
    assert (shares[0] + shares[1]).tolist() == validation_sums(Family(), three, Accelerator(), None, 0, 1).tolist()


def _kohya_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_network_weights_takes_the_peft_folder_a_run_wrote(llm_dir, data_toml, tmp_path):
    first = tmp_path / "first"
    assert _run(llm_dir, data_toml, first) == 0
    assert (first / "lora" / "adapter_config.json").is_file()
    start = _kohya_tensors(first / "lora.safetensors")
    for given in (first / "lora", first / "lora" / "adapter_model.safetensors"):
        again = tmp_path / f"again-{given.name}"
        # A learning rate this small leaves the weights where they started, so the output shows the start.
        assert _run(llm_dir, data_toml, again, "--network_weights", str(given), "--learning_rate", "1e-12") == 0
        end = _kohya_tensors(again / "lora.safetensors")
        assert end.keys() == start.keys()
        assert all(torch.allclose(end[k].float(), start[k].float(), atol=1e-6) for k in start), given


def test_network_weights_takes_a_peft_folder_written_by_peft(llm_dir, data_toml, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(llm_dir),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    model.save_pretrained(str(tmp_path / "theirs"))
    out = tmp_path / "out"
    assert _run(llm_dir, data_toml, out, "--network_weights", str(tmp_path / "theirs"), "--dim_from_weights",
                "--learning_rate", "1e-12") == 0
    ours = _kohya_tensors(out / "lora.safetensors")
    ups = {k: v for k, v in ours.items() if k.endswith("lora_up.weight")}
    assert len(ups) == 2 * 2  # q_proj and v_proj of the tiny model's two layers, nothing else
    assert all(k.split(".")[0].endswith(("q_proj", "v_proj")) for k in ours)
    assert all(v.shape[1] == 2 and v.abs().sum() > 0 for v in ups.values())
    assert all(float(v) == 4.0 for k, v in ours.items() if k.endswith(".alpha"))


def test_network_weights_folder_without_adapter_config_is_refused(llm_dir, data_toml, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    assert _run(llm_dir, data_toml, out, "--network_weights", str(tmp_path / "empty")) != 0
    err = capsys.readouterr().err
    assert "empty is a folder without adapter_config.json" in err
    assert not any(out.glob("lora*"))


def test_without_a_length_an_llm_trains_three_epochs_not_1600_steps(llm_dir, data_toml, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--pretrained_model_name_or_path", str(llm_dir), "--dataset_config", str(data_toml), "--output_dir",
            str(out), "--output_name", "lora"]
    assert train_network.main(argv) == 0
    printed = capsys.readouterr().out
    assert "epochs                 3" in printed, printed[-2000:]


def test_command_line_validation_split_holds_out_llm_rows(llm_dir, data_toml, tmp_path, capsys):
    # sd-scripts' --validation_split: the lowest level of the dataset lookup, for text TOMLs as for images
    assert _run(llm_dir, data_toml, tmp_path / "out", "--validation_split", "0.5", "--validation_seed", "3") == 0
    summary = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("datasets[0]: "))
    held = int(summary.split(", ")[-1].split(" validation samples")[0])
    assert held > 0, summary
