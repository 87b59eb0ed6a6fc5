"""tools/show.py: metadata, recomputed hashes, module table, --json."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
from test_tools_common import KOHYA_META, pristine_pipe, random_network

from library.lora_files import read_metadata
from library.metadata import add_hashes
from tools import show


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("show") / "a.safetensors"
    network = random_network(pristine_pipe(), dim=4, alpha=2.0, conv_dim=2)
    meta = {**KOHYA_META, "modelspec.title": "test", "modelspec.architecture": "stable-diffusion-v1/lora"}
    network.save_weights(path, None, meta)
    return path, network


def test_json_reports_modules_ranks_alphas_and_valid_hashes(lora_file, capsys):
    path, network = lora_file
    assert show.main(["--model", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "kohya"
    assert info["modules"] == len(network.all_loras())
    assert set(info["ranks"]) == {"4", "2"}  # linear dim 4, conv_dim 2
    assert info["metadata"]["modelspec.title"] == "test"
    assert all(h["ok"] for h in info["hashes"].values()) and len(info["hashes"]) == 2
    row = next(r for r in info["module_table"] if r["kind"] == "conv")
    module = getattr(network, row["name"])
    expected = float((module.lora_up.weight.flatten(1) @ module.lora_down.weight.flatten(1)).detach().norm()) * 1.5 / 2
    assert row["delta_norm"] == pytest.approx(expected, rel=1e-5)
    assert row["alpha"] == 1.5 and row["rank"] == 2


def test_tampered_tensor_fails_hash_check(lora_file, tmp_path, capsys):
    path, _ = lora_file
    tensors = safetensors.torch.load_file(path)
    meta = read_metadata(str(path))
    key = next(k for k in tensors if k.endswith("lora_up.weight"))
    tensors[key] = tensors[key] + 1.0
    bad = tmp_path / "bad.safetensors"
    safetensors.torch.save_file(tensors, str(bad), meta)
    assert show.main(["--model", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH" in out and "sshs_model_hash" in out
    # re-hashing the changed tensors makes it valid again
    good = tmp_path / "good.safetensors"
    safetensors.torch.save_file(tensors, str(good), add_hashes(tensors, meta))
    assert show.main(["--model", str(good), "--no_modules"]) == 0


def test_missing_file_is_a_user_error(tmp_path, capsys):
    assert show.main(["--model", str(tmp_path / "nope.safetensors")]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.fixture(scope="module")
def dora(tmp_path_factory):
    from test_tools_common import llm_adapter

    return llm_adapter(tmp_path_factory.mktemp("show_dora"), use_dora=True)


def test_peft_folder_is_read_as_an_llm_adapter_without_family(dora, capsys):
    # README writes the path positionally; --model is the same thing
    assert show.main([str(dora["peft"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "peft" and info["modules"] == len(dora["network"].unet_loras)
    assert show.main(["--model", str(dora["peft"]), "--no_modules"]) == 0
    assert "format: peft (DoRA)" in capsys.readouterr().out


def test_peft_folder_with_a_family_without_peft_names_is_a_user_error(dora, capsys):
    assert show.main(["--model", str(dora["peft"]), "--family", "sd1"]) == 2
    assert "use --family llm" in capsys.readouterr().err


@pytest.mark.parametrize("which", ["kohya", "peft"])
def test_dora_files_list_their_magnitudes(dora, which, capsys):
    assert show.main([str(dora[which]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["dora"] is True
    module = dora["network"].unet_loras[0]
    row = next(r for r in info["module_table"] if r["name"] == module.lora_name)
    assert row["magnitude_norm"] == pytest.approx(float(module.magnitude.detach().norm()), rel=1e-6)
    assert show.main([str(dora[which])]) == 0
    assert "|m|" in capsys.readouterr().out


def test_path_is_needed_once(capsys):
    with pytest.raises(SystemExit):
        show.main([])
    with pytest.raises(SystemExit):
        show.main(["a.safetensors", "--model", "b.safetensors"])


# --- .ckpt / .pt files (the trainer's --save_model_as ckpt / pt) ----------------------------


def test_reads_the_trainers_ckpt_and_a_nested_pt(lora_file, tmp_path, capsys):
    import torch

    path, network = lora_file
    assert show.main(["--model", str(path), "--json"]) == 0
    want = json.loads(capsys.readouterr().out)
    ckpt = tmp_path / "last.ckpt"
    network.save_weights(ckpt, torch.float16, None)  # what train_network.py --save_model_as ckpt writes
    nested = tmp_path / "nested.pt"
    torch.save({"state_dict": safetensors.torch.load_file(path), "epoch": 3}, nested)  # sd-scripts' nesting
    for file, rel in ((ckpt, 2e-3), (nested, 1e-6)):
        assert show.main(["--model", str(file), "--json"]) == 0, capsys.readouterr().err
        info = json.loads(capsys.readouterr().out)
        assert info["format"] == "kohya" and info["modules"] == want["modules"] and info["hashes"] == {}
        got = {r["name"]: r["delta_norm"] for r in info["module_table"]}
        assert got == pytest.approx({r["name"]: r["delta_norm"] for r in want["module_table"]}, rel=rel)


class _RunsCode:
    def __reduce__(self):
        return (print, ("PICKLE CODE RAN",))


def test_pickled_code_in_a_ckpt_is_not_run(tmp_path, capsys):
    import torch

    bad = tmp_path / "evil.ckpt"
    torch.save({"lora_te_x.alpha": torch.tensor(1.0), "payload": _RunsCode()}, bad)
    assert show.main(["--model", str(bad)]) == 2
    captured = capsys.readouterr()
    assert "PICKLE CODE RAN" not in captured.out + captured.err
    assert str(bad) in captured.err and "weights only" in captured.err
    not_a_lora = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], not_a_lora)
    assert show.main(["--model", str(not_a_lora)]) == 2
    assert "expected a dict of LoRA tensors" in capsys.readouterr().err
    assert show.main(["--model", str(tmp_path / "x.onnx")]) == 2  # .bin is a torch state dict (diffusers)
    assert ".ckpt/.pt" in capsys.readouterr().err


def test_only_the_stored_hashes_are_checked(lora_file, tmp_path, capsys):
    path, _ = lora_file
    tensors = safetensors.torch.load_file(path)
    meta = {k: v for k, v in read_metadata(str(path)).items() if k != "sshs_legacy_hash"}
    partial = tmp_path / "model_hash_only.safetensors"
    safetensors.torch.save_file(tensors, str(partial), meta)
    assert show.main(["--model", str(partial), "--no_modules"]) == 0
    assert "MISMATCH" not in capsys.readouterr().out


@pytest.mark.parametrize("tensors, said", [
    ({"lora_unet_a.hada_w1_a": (4, 8), "lora_unet_a.hada_w1_b": (8, 4)}, "LyCORIS LoHa"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (4, 4)}, "looks like a model checkpoint, not a LoRA"),
    ({"lora_unet_a.lokr_w1": (4, 4), "lora_unet_a.lokr_w2": (2, 2)}, "LyCORIS LoKr"),  # old diffusers keys are read
    ({"lora_unet_a.lora_down.weight": (4, 8), "lora_unet_a.lora_up.weight": (8, 4),
      "lora_unet_a.dora_scale": (1, 8)}, "dora_scale"),
])
def test_files_that_are_not_readable_loras_say_what_they_are(tmp_path, capsys, tensors, said):
    import torch

    path = tmp_path / "x.safetensors"
    safetensors.torch.save_file({k: torch.zeros(shape) for k, shape in tensors.items()}, str(path))
    assert show.main(["--model", str(path)]) == 2
    assert said in capsys.readouterr().err
