"""tools/convert.py: kohya ↔ diffusers ↔ ComfyUI (SD1) and kohya ↔ PEFT (LLM), verified and loaded by consumers."""

from __future__ import annotations

import copy
import json

import pytest
import safetensors.torch
import torch
from test_tools_common import KOHYA_META, pristine_pipe, random_network, state_deltas

from library.lora_files import read_metadata
from library.tiny_models import save_tiny_sd
from tools import convert


def unet_output(unet) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    latents, context = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 7, 32, generator=gen)
    with torch.no_grad():
        return unet(latents, torch.tensor([10, 700]), encoder_hidden_states=context).sample


def te_output(te) -> torch.Tensor:
    with torch.no_grad():
        return te(torch.tensor([[0, 3, 8, 20, 1, 1]])).last_hidden_state


@pytest.fixture(scope="module")
def kohya(tmp_path_factory):
    folder = tmp_path_factory.mktemp("convert")
    network = random_network(pristine_pipe(), dim=4, alpha=2.0, conv_dim=2)  # alpha != dim: scale matters
    path = folder / "kohya.safetensors"
    network.save_weights(path, None, KOHYA_META)
    ref = copy.deepcopy(pristine_pipe())
    ref.load_lora_weights(str(folder), weight_name=path.name)
    return folder, path, (unet_output(ref.unet), te_output(ref.text_encoder))


@pytest.mark.parametrize("alpha", ["fold", "keep"])
def test_kohya_to_diffusers_loads_with_same_outputs_and_round_trips(kohya, alpha, capsys):
    folder, path, (ref_unet, ref_te) = kohya
    out = folder / f"diffusers_{alpha}.safetensors"
    assert convert.main(["--model", str(path), "--to", "diffusers", "--alpha", alpha, "--save_to", str(out)]) == 0
    assert "every ΔW verified" in capsys.readouterr().out
    sd = safetensors.torch.load_file(out)
    assert all(k.startswith(("unet.", "text_encoder.")) and ".lora_" in k for k in sd)
    meta = read_metadata(str(out))
    assert ("lora_adapter_metadata" in meta) and meta["ss_network_dim"] == "4"
    if alpha == "keep":
        cfg = json.loads(meta["lora_adapter_metadata"])
        assert cfg["unet.lora_alpha"] == 2.0 and cfg["unet.r"] == 4 and cfg["unet.alpha_pattern"]
    pipe = copy.deepcopy(pristine_pipe())
    pipe.load_lora_weights(str(folder), weight_name=out.name)
    assert torch.allclose(unet_output(pipe.unet), ref_unet, atol=1e-5)
    assert torch.allclose(te_output(pipe.text_encoder), ref_te, atol=1e-5)

    back = folder / f"back_{alpha}.safetensors"
    assert convert.main(["--model", str(out), "--to", "kohya", "--save_to", str(back)]) == 0
    src, dst = state_deltas(safetensors.torch.load_file(path)), state_deltas(safetensors.torch.load_file(back))
    assert set(src) == set(dst)
    assert all(torch.allclose(dst[n], src[n], rtol=1e-5, atol=1e-8) for n in src)
    # the metadata says what the files hold: folding makes alpha = rank (tools audit F9)
    want_alpha = "4.0" if alpha == "fold" else "2.0"
    assert meta["ss_network_alpha"] == want_alpha and read_metadata(str(back))["ss_network_alpha"] == want_alpha
    assert {float(v) for k, v in safetensors.torch.load_file(back).items()
            if k.endswith(".alpha") and v.dim() == 0 and "conv" not in k} >= {float(want_alpha)}


def test_shape_metadata_follows_the_modules():
    from library.lora_files import shape_metadata
    from networks.svd import LoRAFactors

    state = {"a": LoRAFactors(torch.zeros(4, 8), torch.zeros(8, 4), 4.0),
             "b": LoRAFactors(torch.zeros(2, 8), torch.zeros(8, 2), 4.0),
             "c": LoRAFactors(torch.zeros(3, 8, 3, 3), torch.zeros(8, 3, 1, 1), 1.5)}  # fmt: skip
    meta = {"ss_network_dim": "4", "ss_network_alpha": "1.0",
            "ss_network_args": json.dumps({"conv_dim": "2", "conv_alpha": "1", "dropout": "0.1"})}  # fmt: skip
    got = shape_metadata(meta, state)
    assert got["ss_network_dim"] == "Dynamic" and got["ss_network_alpha"] == "4.0"
    assert json.loads(got["ss_network_args"]) == {"dropout": "0.1", "conv_dim": "3", "conv_alpha": "1.5"}
    assert shape_metadata({}, state) == {}  # nothing invented for a file without ss_* keys
    no_conv = shape_metadata(meta, {"a": state["a"]})
    assert json.loads(no_conv["ss_network_args"]) == {"dropout": "0.1"} and no_conv["ss_network_dim"] == "4"


def test_comfyui_names_use_original_block_numbers(kohya, tmp_path_factory, capsys):
    folder, path, _ = kohya
    base = save_tiny_sd(tmp_path_factory.mktemp("convert_base") / "base")
    out = folder / "comfy.safetensors"
    assert convert.main(["--model", str(path), "--to", "comfyui", "--base_model", str(base),
                         "--save_to", str(out)]) == 0  # fmt: skip
    keys = set(safetensors.torch.load_file(out))
    # tiny UNet: layers_per_block 1, so down_blocks.0.attentions.0 is input_blocks.1.1
    assert "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_up.weight" in keys
    assert "diffusion_model.input_blocks.3.0.in_layers.2.lora_down.weight" in keys  # down_blocks.1.resnets.0.conv1
    assert "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.alpha" in keys
    back = folder / "comfy_back.safetensors"
    assert convert.main(["--model", str(out), "--to", "kohya", "--base_model", str(base), "--save_to", str(back)]) == 0
    assert set(safetensors.torch.load_file(back)) == set(safetensors.torch.load_file(path))



def test_sd2_text_encoder_is_clip_h_in_comfyui_names(kohya, tmp_path):
    """ComfyUI calls SD 2.x's text encoder clip_h; under clip_l its LoRA would be skipped with a warning."""
    folder, path, _ = kohya
    tensors = safetensors.torch.load_file(path)
    sd2 = tmp_path / "sd2.safetensors"
    safetensors.torch.save_file(tensors, sd2, {"ss_base_model_version": "sd_v2_v", "ss_v2": "True"})
    out = tmp_path / "comfy.safetensors"
    assert convert.main(["--model", str(sd2), "--to", "comfyui", "--save_to", str(out)]) == 0
    te = {k.split(".")[1] for k in safetensors.torch.load_file(out) if k.startswith("text_encoders.")}
    assert te == {"clip_h"}
    back = tmp_path / "back.safetensors"  # and ComfyUI's clip_h names read back
    assert convert.main(["--model", str(out), "--to", "kohya", "--family", "sd1", "--save_to", str(back)]) == 0
    assert set(safetensors.torch.load_file(back)) == set(tensors)

def test_a_dropped_module_fails_loudly(kohya, monkeypatch, capsys):
    folder, path, _ = kohya
    real = convert.write_comfy

    def lossy(state, namer, dtype=None, v2=False):
        out = real(state, namer, dtype, v2=v2)
        victim = sorted(k for k in out if k.endswith(".lora_up.weight"))[0][: -len(".lora_up.weight")]
        return {k: v for k, v in out.items() if not k.startswith(victim + ".")}

    monkeypatch.setattr(convert, "write_comfy", lossy)
    out = folder / "lossy.safetensors"
    assert convert.main(["--model", str(path), "--to", "comfyui", "--save_to", str(out)]) == 2
    assert "1 modules dropped" in capsys.readouterr().err
    assert not out.exists()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=101)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("llm")
    model.save_pretrained(folder / "model")
    return folder, model


def test_llm_kohya_to_peft_loads_in_peft_and_round_trips(llama, capsys):
    from peft import PeftModel

    folder, model = llama
    gen = torch.Generator().manual_seed(0)
    sd, merged = {}, copy.deepcopy(model)
    for path, module in model.named_modules():
        if path.endswith(("q_proj", "v_proj", "down_proj")):
            name = "lora_unet_" + path.replace(".", "_")
            rank = 4 if "down" not in path else 2  # mixed ranks → rank_pattern
            down = torch.randn(rank, module.in_features, generator=gen) * 0.1
            up = torch.randn(module.out_features, rank, generator=gen) * 0.1
            sd.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                       f"{name}.alpha": torch.tensor(8.0)})  # fmt: skip
            with torch.no_grad():
                merged.get_submodule(path).weight += up @ down * 8.0 / rank
    kohya_file = folder / "llm_kohya.safetensors"
    safetensors.torch.save_file(sd, str(kohya_file))
    adapter = folder / "adapter"
    assert convert.main(["--model", str(kohya_file), "--family", "llm", "--to", "peft", "--save_to", str(adapter),
                         "--base_model_name_or_path", "tiny-llama"]) == 0  # fmt: skip
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["lora_alpha"] == 8.0 and config["r"] == 4 and sorted(config["target_modules"]) == [
        "down_proj", "q_proj", "v_proj"]  # fmt: skip
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(adapter)).eval()
    ids = torch.tensor([[1, 5, 9, 33, 2]])
    with torch.no_grad():
        want, got, plain = merged(ids).logits, peft_model(ids).logits, model(ids).logits
    assert not torch.allclose(want, plain, atol=1e-3)
    assert torch.allclose(got, want, atol=1e-4)

    back = folder / "llm_back.safetensors"
    assert convert.main(["--model", str(adapter), "--to", "kohya", "--save_to", str(back)]) == 0
    src, dst = state_deltas(sd), state_deltas(safetensors.torch.load_file(back))
    assert set(src) == set(dst) and all(torch.allclose(dst[n], src[n], atol=1e-6) for n in src)


@pytest.fixture(scope="module")
def dora(tmp_path_factory):
    from test_tools_common import llm_adapter

    return llm_adapter(tmp_path_factory.mktemp("convert_dora"), use_dora=True)


def test_dora_kohya_to_peft_loads_in_peft_and_round_trips(dora, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "peft"
    assert convert.main(["--model", str(dora["kohya"]), "--to", "peft", "--save_to", str(adapter),
                         "--base_model_name_or_path", str(dora["base"])]) == 0  # fmt: skip
    assert "DoRA magnitude verified" in capsys.readouterr().out
    assert json.loads((adapter / "adapter_config.json").read_text())["use_dora"] is True
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(dora["base"])), str(adapter))
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        want, got = dora["model"](ids).logits, peft_model.eval()(ids).logits  # our DoRA forward vs PEFT's
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()

    back = tmp_path / "back.safetensors"
    assert convert.main(["--model", str(adapter), "--to", "kohya", "--save_to", str(back)]) == 0
    src, dst = safetensors.torch.load_file(dora["kohya"]), safetensors.torch.load_file(back)
    assert set(src) == set(dst) and any(k.endswith(".magnitude") for k in dst)
    assert all(torch.allclose(dst[k], src[k]) for k in src)


@pytest.mark.parametrize("target", ["diffusers", "comfyui"])
def test_dora_to_a_format_without_magnitudes_is_refused(dora, target, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    assert convert.main(["--model", str(dora["kohya"]), "--family", "llm", "--to", target, "--save_to", str(out)]) == 2
    err = capsys.readouterr().err
    assert "DoRA" in err and "--to kohya or --to peft" in err and not out.exists()


# --- broken and overflowing files (the tools audit) ------------------------------------------------------


def _damaged(kohya, tmp_path, how: str):
    _, path, _ = kohya
    sd = safetensors.torch.load_file(path)
    up = next(k for k in sd if k.endswith("lora_up.weight"))
    if how == "nan":
        sd[up] = sd[up].clone()
        sd[up][0, 0] = float("nan")
    elif how == "rank":
        sd[up] = sd[up][:, :2].clone()
    else:  # "huge": finite in float32, past fp16's range
        sd = {k: v * 1e7 if k.endswith("lora_up.weight") else v for k, v in sd.items()}
    out = tmp_path / f"{how}.safetensors"
    safetensors.torch.save_file(sd, str(out), KOHYA_META)
    return out, up.split(".")[0]


@pytest.mark.parametrize("how, message", [("nan", "modules hold NaN/inf values"),
                                          ("rank", "have different ranks")])
def test_a_broken_file_is_named_by_every_tool_and_nothing_is_written(kohya, tmp_path, capsys, how, message):
    from tools import merge, show

    bad, module = _damaged(kohya, tmp_path, how)
    out = tmp_path / "out.safetensors"
    assert convert.main(["--model", str(bad), "--to", "diffusers", "--save_to", str(out)]) == 2
    assert merge.main(["--models", str(bad), str(kohya[1]), "--save_to", str(out)]) == 2
    assert show.main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count(f"{bad}: ") == 3 and message in err and module in err and "Traceback" not in err, err
    assert not out.exists() and not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_an_fp16_overflow_fails_and_overwrite_keeps_the_file(kohya, tmp_path, capsys):
    huge, _ = _damaged(kohya, tmp_path, "huge")
    before = huge.read_bytes()
    # in place, as a user converting a file to fp16 "to save space" might: the check fails, the file stays
    code = convert.main(["--model", str(huge), "--to", "kohya", "--save_precision", "fp16", "--save_to", str(huge),
                         "--overwrite"])
    assert code == 2 and "exceed the range of float16" in capsys.readouterr().err
    assert huge.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["huge.safetensors"]  # no partial file left


def test_a_format_error_among_several_models_names_the_file(kohya, tmp_path, capsys):
    from tools import merge

    loha = tmp_path / "loha.safetensors"
    safetensors.torch.save_file({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, str(loha))
    assert merge.main(["--models", str(kohya[1]), str(loha), "--save_to", str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err
    assert f"{loha}: unknown LoRA format" in err and "LoHa" in err, err


def test_a_lora_given_as_merges_model_says_where_each_goes(kohya, tmp_path, capsys):
    from tools import merge

    out = str(tmp_path / "m.safetensors")
    assert merge.main(["--sd_model", str(kohya[1]), "--models", str(kohya[1]), "--save_to", out]) == 2
    err = capsys.readouterr().err
    assert "is a LoRA/network file, not a model" in err and "tools/merge.py: --sd_model" in err, err
