"""tools/merge.py: baking LoRAs into a diffusers model, and combining LoRAs (concatenation, SVD)."""

from __future__ import annotations

import copy
import json

import pytest
import safetensors.torch
import torch
from test_tools_common import KOHYA_META, pristine_pipe, random_network, state_deltas

from library.lora_files import read_metadata
from library.tiny_models import save_tiny_sd
from tools import merge


def unet_output(unet) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    latents, context = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 7, 32, generator=gen)
    with torch.no_grad():
        return unet(latents, torch.tensor([10, 700]), encoder_hidden_states=context).sample


def te_output(te) -> torch.Tensor:
    with torch.no_grad():
        return te(torch.tensor([[0, 3, 8, 20, 1, 1]])).last_hidden_state


def only_conv(da: dict, db: dict) -> str:
    """A module only the conv LoRA has (b's kxk convs)."""
    return next(n for n in db if n not in da)


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    folder = tmp_path_factory.mktemp("merge")
    a = random_network(pristine_pipe(), dim=4, alpha=2.0, seed=1)
    b = random_network(pristine_pipe(), dim=2, alpha=1.0, conv_dim=2, seed=2)
    a.save_weights(folder / "a.safetensors", None, KOHYA_META)
    b.save_weights(folder / "b.safetensors", None, {**KOHYA_META, "ss_network_dim": "2"})
    return folder, folder / "a.safetensors", folder / "b.safetensors"


def test_concatenation_is_exact_sum(loras, capsys):
    folder, a, b = loras
    out = folder / "ab.safetensors"
    assert merge.main(["--models", str(a), str(b), "--ratios", "0.8", "-0.5", "--save_to", str(out)]) == 0
    assert "equals the weighted sum" in capsys.readouterr().out
    da, db = state_deltas(safetensors.torch.load_file(a)), state_deltas(safetensors.torch.load_file(b))
    got = state_deltas(safetensors.torch.load_file(out))
    assert set(got) == set(da) | set(db) and len(got) > len(da)  # b adds conv modules
    for name in got:
        want = 0.8 * da.get(name, 0) - 0.5 * db.get(name, 0)
        assert torch.allclose(got[name], want, atol=1e-6), name
    sd = safetensors.torch.load_file(out)
    shared = next(n for n in da if n in db)
    assert sd[f"{shared}.lora_down.weight"].shape[0] == 6  # 4 + 2 stacked
    meta = read_metadata(str(out))
    assert "a.safetensors (0.8)" in meta["ss_training_comment"] and meta["ss_base_model_version"] == "sd_v1"
    assert "sshs_model_hash" in meta
    # the conv modules' alpha as written (concatenation folds the scales: alpha = rank), not left out
    conv_alpha = next(float(v) for k, v in sd.items() if k.startswith(only_conv(da, db)) and k.endswith(".alpha"))
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": str(conv_alpha)}


def test_svd_merge_to_rank(loras, capsys):
    folder, a, b = loras
    out = folder / "ab3.safetensors"
    assert merge.main(["--models", str(a), str(b), "--new_rank", "3", "--save_to", str(out)]) == 0
    report = capsys.readouterr().out
    assert "retained" in report
    sd = safetensors.torch.load_file(out)
    assert max(v.shape[0] for k, v in sd.items() if k.endswith("lora_down.weight")) == 3
    da, db = state_deltas(safetensors.torch.load_file(a)), state_deltas(safetensors.torch.load_file(b))
    got = state_deltas(sd)
    name = next(n for n in da if n in db)
    want = da[name] + db[name]
    # SVD truncation is the best rank-3 fit: error below that of dropping b entirely
    assert float((got[name] - want).norm()) < float((da[name] - want).norm())
    only_b = next(n for n in db if n not in da)  # a conv module: rank 2 <= 3 stays exact
    assert torch.allclose(got[only_b], db[only_b], atol=1e-6)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("merge_base") / "base", seed=0)


def test_bake_into_model_matches_diffusers_adapters(loras, base_dir, capsys):
    folder, a, b = loras
    out = folder / "baked"
    assert merge.main(["--sd_model", str(base_dir), "--models", str(a), str(b), "--ratios", "0.8", "0.5",
                       "--save_to", str(out)]) == 0  # fmt: skip
    assert list(out.glob("unet/*.safetensors")) and list(out.glob("text_encoder/*.safetensors"))
    assert not list(folder.glob(".baked*"))  # no temporary folder left behind
    from diffusers import StableDiffusionPipeline

    baked = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None, requires_safety_checker=False)
    ref = copy.deepcopy(pristine_pipe())
    ref.load_lora_weights(str(folder), weight_name="a.safetensors", adapter_name="a")
    ref.load_lora_weights(str(folder), weight_name="b.safetensors", adapter_name="b")
    ref.set_adapters(["a", "b"], adapter_weights=[0.8, 0.5])
    assert not torch.allclose(unet_output(baked.unet), unet_output(pristine_pipe().unet), atol=1e-3)
    assert torch.allclose(unet_output(baked.unet), unet_output(ref.unet), atol=1e-4)
    assert torch.allclose(te_output(baked.text_encoder), te_output(ref.text_encoder), atol=1e-4)
    # an existing output folder is refused without --overwrite
    assert merge.main(["--sd_model", str(base_dir), "--models", str(a), "--save_to", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_bake_refuses_lora_for_another_model(loras, base_dir, tmp_path, capsys):
    folder, a, _ = loras
    sd = safetensors.torch.load_file(a)
    sd["lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight"] = torch.zeros(4, 32)
    sd["lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight"] = torch.zeros(32, 4)
    bad = tmp_path / "bad.safetensors"
    safetensors.torch.save_file(sd, str(bad))
    code = merge.main(["--sd_model", str(base_dir), "--models", str(bad), "--save_to", str(tmp_path / "out")])
    assert code == 2 and "not in the model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_ratio_count_must_match(loras, tmp_path, capsys):
    _, a, b = loras
    assert merge.main(["--models", str(a), str(b), "--ratios", "1", "--save_to", str(tmp_path / "x.safetensors")]) == 2
    assert "one ratio per file" in capsys.readouterr().err


def test_refuses_loras_for_different_base_models(loras, tmp_path, capsys):
    # same key names (SD 1.x and 2.x share them), different declared base models: not combined
    _, a, b = loras
    v2 = tmp_path / "v2.safetensors"
    meta = {**KOHYA_META, "ss_base_model_version": "sd_v2"}
    safetensors.torch.save_file(safetensors.torch.load_file(b), str(v2), meta)
    out = tmp_path / "x.safetensors"
    assert merge.main(["--models", str(a), str(v2), "--save_to", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{a} was trained on sd_v1 but {v2} on sd_v2" in err and not out.exists()
    # a .ckpt (no metadata) of the same family merges with either
    ckpt = tmp_path / "b.ckpt"
    torch.save(safetensors.torch.load_file(b), ckpt)
    assert merge.main(["--models", str(a), str(ckpt), "--save_to", str(out)]) == 0, capsys.readouterr().err
    da, db = (state_deltas(safetensors.torch.load_file(p)) for p in (a, b))
    got = state_deltas(safetensors.torch.load_file(out))
    assert set(got) == set(da) | set(db)
    assert all(torch.allclose(got[k], da.get(k, 0) + db.get(k, 0), atol=1e-6) for k in got)


def test_bake_of_a_lora_with_other_widths_names_the_module_and_shapes(loras, base_dir, tmp_path, capsys):
    # an SD 1.x LoRA into an SD 2.x model has the same names and other widths: one clear error, not a traceback
    folder, a, _ = loras
    sd = safetensors.torch.load_file(a)
    key = next(k for k in sd if k.startswith("lora_unet_") and k.endswith("lora_down.weight"))
    sd[key] = torch.zeros(sd[key].shape[0], sd[key].shape[1] + 8, *sd[key].shape[2:])
    bad = tmp_path / "wide.safetensors"
    safetensors.torch.save_file(sd, str(bad))
    code = merge.main(["--sd_model", str(base_dir), "--models", str(bad), "--save_to", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "modules do not fit the model's layers" in err and "SD 1.x vs 2.x" in err
    assert not (tmp_path / "out").exists()


def test_files_naming_one_base_model_in_the_two_vocabularies_merge(loras, tmp_path, capsys):
    # sd-scripts writes ss_base_model_version, other trainers only the ModelSpec architecture
    _, a, b = loras
    spec_only = tmp_path / "spec.safetensors"
    meta = {k: v for k, v in KOHYA_META.items() if k != "ss_base_model_version"}
    meta["modelspec.architecture"] = "stable-diffusion-v1/lora"
    safetensors.torch.save_file(safetensors.torch.load_file(b), str(spec_only), meta)
    out = tmp_path / "ab.safetensors"
    assert merge.main(["--models", str(a), str(spec_only), "--save_to", str(out)]) == 0, capsys.readouterr().err
    v2 = tmp_path / "v2spec.safetensors"
    meta["modelspec.architecture"] = "stable-diffusion-v2-512/lora"
    safetensors.torch.save_file(safetensors.torch.load_file(b), str(v2), meta)
    assert merge.main(["--models", str(a), str(v2), "--save_to", str(tmp_path / "x.safetensors")]) == 2


def test_bake_into_a_single_file_checkpoint_writes_one(loras, base_dir, tmp_path, capsys):
    # what A1111 / Forge / ComfyUI load, as sd-scripts' merge_lora.py: a single file in, a single file out
    from diffusers import StableDiffusionPipeline
    from test_single_file import config_copy

    from library.single_file import load_checkpoint, save_original

    _, a, b = loras
    pipe = StableDiffusionPipeline.from_pretrained(str(base_dir), safety_checker=None, requires_safety_checker=False)
    source = save_original(tmp_path / "model.safetensors", pipe.unet, pipe.vae, [pipe.text_encoder])
    configs = config_copy(base_dir, tmp_path / "configs")  # the tiny architecture (a real one needs none)
    args = ["--models", str(a), str(b), "--ratios", "0.8", "0.5"]
    assert merge.main(["--sd_model", str(base_dir), *args, "--save_to", str(tmp_path / "folder")]) == 0
    reference = StableDiffusionPipeline.from_pretrained(str(tmp_path / "folder"), safety_checker=None,
                                                        requires_safety_checker=False)
    for model, out in ((source, tmp_path / "from_file.safetensors"), (base_dir, tmp_path / "from_folder.safetensors")):
        assert merge.main(["--sd_model", str(model), "--model_config_dir", str(configs), *args,
                           "--save_to", str(out)]) == 0, capsys.readouterr().err
        merged = load_checkpoint(out, "sd", model_config_dir=str(configs))
        assert torch.allclose(unet_output(merged.unet), unet_output(reference.unet), atol=1e-5)
        assert torch.allclose(te_output(merged.text_encoders[0]), te_output(reference.text_encoder), atol=1e-5)
        assert not list(tmp_path.glob(".*.tmp"))
    assert not torch.allclose(unet_output(merged.unet), unet_output(pipe.unet), atol=1e-3)
    assert merge.main(["--sd_model", str(source), *args, "--save_to", str(tmp_path / "as_folder")]) == 2
    assert "single-file checkpoint: give --save_to a .safetensors file" in capsys.readouterr().err


def test_sd_scripts_merge_options_are_understood(loras, tmp_path, capsys):
    """sd-scripts' merge_lora.py / sdxl_merge_lora.py command lines run: each option ignored with a reason, mapped,
    or refused by name (argparse said 'unrecognized arguments')."""
    folder, a, b = loras
    out = tmp_path / "ab.safetensors"
    args = ["--models", str(a), str(b), "--save_to", str(out), "--v2", "--shuffle", "--no_metadata",
            "--loading_device", "cpu", "--working_device", "cpu"]  # fmt: skip
    assert merge.main(args) == 0
    printed = capsys.readouterr().out
    assert "--shuffle (sd-scripts) is ignored" in printed and "--v2 (sd-scripts) is ignored" in printed
    assert "--working_device cpu: read as --device cpu" in printed
    meta = read_metadata(str(out))
    assert "ss_training_comment" not in meta and not any(k.startswith("modelspec.") for k in meta)
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sd_v1"

    assert merge.main(["--models", str(a), "--save_to", str(tmp_path / "x.safetensors"), "--lbws", "[1,0]"]) == 2
    err = capsys.readouterr().err
    assert "--lbws" in err and "--ratios" in err and not (tmp_path / "x.safetensors").exists()
    assert merge.main(["--models", str(a), "--save_to", str(tmp_path / "x.safetensors"), "--device", "cuda",
                       "--working_device", "cpu"]) == 2  # fmt: skip
    assert "disagree" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()


def test_one_alpha_keeps_every_delta_including_a_negative_alpha():
    from networks.svd import LoRAFactors

    torch.manual_seed(0)
    state = {"a": LoRAFactors(torch.randn(4, 8), torch.randn(6, 4), 2.0),
             "b": LoRAFactors(torch.randn(2, 8), torch.randn(6, 2), -1.0),  # some files carry a negative alpha
             "c": LoRAFactors(torch.randn(3, 8), torch.randn(6, 3), 0.0)}  # fmt: skip
    got = merge.one_alpha(state)
    assert {f.alpha for f in got.values()} == {4.0}
    for name, f in state.items():
        assert torch.allclose(got[name].delta(), f.delta(), atol=1e-6), name
