"""tools/merge.py and tools/extract.py on SDXL: SGM key names, both text encoders, exact results.

Expected outputs come from our network applied live (networks.lora), from diffusers'
``load_lora_weights``, and from test_sdxl_lora's hand-derived SGM module table, never from the
tools' own name mapping.
"""

from __future__ import annotations

import copy
import re

import pytest
import safetensors.torch
import torch
from test_sdxl_lora import merge_into, tiny_sdxl, unet_and_text_outputs
from test_sdxl_lora import module_table as sgm_table
from test_tools_common import KOHYA_META, pristine_pipe, random_network, state_deltas

from library.lora_files import read_metadata
from library.tiny_models import save_tiny_sd
from networks import lora
from tools import convert, extract, merge

SDXL_META = {"ss_network_module": "networks.lora", "ss_base_model_version": "sdxl_base_v1-0"}


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """(the tiny SDXL folder, its pipeline loaded once; tests deepcopy it before changing anything)."""
    from diffusers import StableDiffusionXLPipeline

    folder = tiny_sdxl(tmp_path_factory)
    return folder, StableDiffusionXLPipeline.from_pretrained(str(folder))


def encoders(pipe) -> list[torch.nn.Module]:
    return [pipe.text_encoder, pipe.text_encoder_2]


def load_sdxl(folder):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(str(folder))


def assert_outputs_close(got_pipe, want_pipe, base_pipe=None) -> None:
    """UNet, te1 and te2 penultimate states and te2's pooled output agree within 1e-4 (and differ from the base)."""
    got, want = unet_and_text_outputs(got_pipe), unet_and_text_outputs(want_pipe)
    base = unet_and_text_outputs(base_pipe) if base_pipe is not None else [None] * len(got)
    for part, g, w, b in zip(("unet", "te1", "te2", "pooled"), got, want, base, strict=True):
        if b is not None:
            assert not torch.allclose(w, b, atol=1e-3), f"{part}: the LoRA changed nothing; the test would be vacuous"
        assert torch.allclose(g, w, atol=1e-4), (part, float((g - w).abs().max()))


# --- merge --sd_model ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl_loras(sdxl, tmp_path_factory):
    """a: unet + te1 + te2 (linear); b: UNet only, with 3x3 conv modules (LoCon)."""
    _, pristine = sdxl
    folder = tmp_path_factory.mktemp("merge_sdxl")
    pipe = copy.deepcopy(pristine)
    a = random_network(pipe, dim=4, alpha=2.0, seed=1)
    b = random_network(pipe, dim=2, alpha=1.0, conv_dim=2, seed=2, text_encoders=False)
    a.save_weights(folder / "a.safetensors", None, {**SDXL_META, "ss_network_dim": "4"})
    b.save_weights(folder / "b.safetensors", None, {**SDXL_META, "ss_network_dim": "2"})
    return folder, folder / "a.safetensors", folder / "b.safetensors"


def test_lora_files_have_sgm_names(sdxl_loras):
    _, a, b = sdxl_loras
    names_a = {k.split(".")[0] for k in safetensors.torch.load_file(a)}
    names_b = {k.split(".")[0] for k in safetensors.torch.load_file(b)}
    assert {n.split("_")[1] for n in names_a} == {"unet", "te1", "te2"}
    assert {n.split("_")[1] for n in names_b} == {"unet"}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names_a
    assert "lora_unet_input_blocks_1_0_in_layers_2" in names_b  # a 3x3 conv of the first ResNet


def test_bake_sdxl_matches_our_network_and_diffusers(sdxl, sdxl_loras):
    base_dir, pristine = sdxl
    folder, a, b = sdxl_loras
    out = folder / "baked"
    assert merge.main(["--sd_model", str(base_dir), "--models", str(a), str(b), "--ratios", "0.8", "0.5",
                       "--save_to", str(out)]) == 0  # fmt: skip
    for part in ("unet", "text_encoder", "text_encoder_2"):
        assert list(out.glob(f"{part}/*.safetensors")), part
    assert not list(folder.glob(".baked*"))  # no temporary folder left behind
    baked = load_sdxl(out)

    # our network, applied live (not merged) with the same multipliers
    ours = copy.deepcopy(pristine)
    for path, ratio in ((a, 0.8), (b, 0.5)):
        network, _ = lora.create_network_from_weights(ratio, str(path), None, encoders(ours), ours.unet)
        network.apply_to(encoders(ours), ours.unet)
        network.load_weights(str(path))
    assert_outputs_close(baked, ours, pristine)

    # diffusers' own loader
    ref = copy.deepcopy(pristine)
    ref.load_lora_weights(str(folder), weight_name=a.name, adapter_name="a")
    ref.load_lora_weights(str(folder), weight_name=b.name, adapter_name="b")
    ref.set_adapters(["a", "b"], adapter_weights=[0.8, 0.5])
    assert_outputs_close(baked, ref)


def test_a_merged_sdxl_lora_loads_in_diffusers_as_its_two_files_do(sdxl, sdxl_loras, tmp_path):
    """Concatenation gave modules different alphas (stacked ranks); diffusers applied them through name patterns
    that miss SDXL's middle block, 17% off there (SDXL audit F4). The merged file stores one alpha."""
    _, pristine = sdxl
    folder, a, b = sdxl_loras
    out = tmp_path / "ab.safetensors"
    assert merge.main(["--models", str(a), str(b), "--ratios", "0.8", "0.5", "--save_to", str(out)]) == 0
    tensors = safetensors.torch.load_file(out)
    ranks = {v.shape[0] for k, v in tensors.items() if k.endswith("lora_down.weight")}
    assert len(ranks) > 1  # the vacuous case would be a file whose modules all have one rank
    assert {float(v) for k, v in tensors.items() if k.endswith(".alpha")} == {float(max(ranks))}
    merged = copy.deepcopy(pristine)
    merged.load_lora_weights(str(tmp_path), weight_name=out.name)
    ref = copy.deepcopy(pristine)
    ref.load_lora_weights(str(folder), weight_name=a.name, adapter_name="a")
    ref.load_lora_weights(str(folder), weight_name=b.name, adapter_name="b")
    ref.set_adapters(["a", "b"], adapter_weights=[0.8, 0.5])
    assert_outputs_close(merged, ref, pristine)
    # the LoRA's effect on the UNet, not only the output within an absolute tolerance
    got, want, base = (unet_and_text_outputs(p)[0] for p in (merged, ref, pristine))
    assert float((got - want).norm() / (want - base).norm()) < 1e-4


def diffusers_format(network, pipe) -> dict[str, torch.Tensor]:
    """The network's LoRA in diffusers naming (``unet.<diffusers path>.lora_A.weight``, alpha folded into B)."""
    paths = {id(m): f"{prefix}.{p}" for prefix, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder),
                                                           ("text_encoder_2", pipe.text_encoder_2))
             for p, m in model.named_modules()}  # fmt: skip
    sd = {}
    for module in network.all_loras():
        key = paths[id(module.org_module)]
        sd[f"{key}.lora_A.weight"] = module.lora_down.weight.detach().clone()
        sd[f"{key}.lora_B.weight"] = (module.lora_up.weight * module.scale).detach().clone()
    return sd


def test_bake_sdxl_reads_diffusers_format_and_refuses_foreign_modules(sdxl, tmp_path, capsys):
    base_dir, pristine = sdxl
    pipe = copy.deepcopy(pristine)
    network = random_network(pipe, dim=3, alpha=1.5, seed=3)
    kohya = {k: v.detach().clone() for k, v in network.state_dict().items()}
    safetensors.torch.save_file(diffusers_format(network, pipe), str(tmp_path / "diffusers.safetensors"))
    out = tmp_path / "baked"
    assert merge.main(["--sd_model", str(base_dir), "--models", str(tmp_path / "diffusers.safetensors"),
                       "--save_to", str(out)]) == 0  # fmt: skip
    reference = copy.deepcopy(pristine)
    merge_into(reference, kohya)  # the independent SGM table
    baked = load_sdxl(out)
    for part in ("unet", "text_encoder", "text_encoder_2"):
        got, want = getattr(baked, part).state_dict(), getattr(reference, part).state_dict()
        assert set(got) == set(want)
        worst = max(float((got[k] - want[k]).abs().max()) for k in want)
        assert worst < 1e-6, (part, worst)

    # an SD 1.x module name is not in an SDXL model: refused, nothing written
    kohya["lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight"] = torch.zeros(3, 64)
    kohya["lora_unet_down_blocks_1_attentions_0_proj_in.lora_up.weight"] = torch.zeros(64, 3)
    safetensors.torch.save_file(kohya, str(tmp_path / "bad.safetensors"))
    code = merge.main(["--sd_model", str(base_dir), "--models", str(tmp_path / "bad.safetensors"),
                       "--save_to", str(tmp_path / "out2")])  # fmt: skip
    assert code == 2 and "not in the model" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()


# --- extract ---------------------------------------------------------------------------------


def is_linear_target(name: str, module: torch.nn.Module) -> bool:
    """A Linear networks.lora adapts without conv_dim: in a transformer block or a CLIP attention / MLP."""
    if not isinstance(module, torch.nn.Linear):
        return False
    if name.startswith("lora_unet_"):
        return re.search(r"_1_(transformer_blocks_|proj_in$|proj_out$)", name) is not None
    return re.search(r"_(self_attn_(q|k|v|out)_proj|mlp_fc[12])$", name) is not None


# modules the tuned copy must change: their names are asserted in the file
CHANGED = ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
           "lora_unet_middle_block_1_transformer_blocks_0_ff_net_0_proj",
           "lora_unet_output_blocks_2_1_proj_out",
           "lora_te1_text_model_encoder_layers_1_mlp_fc2",
           "lora_te2_text_model_encoder_layers_0_self_attn_out_proj")  # fmt: skip


@pytest.fixture(scope="module")
def sdxl_tuned(sdxl, tmp_path_factory):
    """A 'fine-tuned' SDXL folder whose targeted Linear weights moved by known rank-2 deltas (some stay)."""
    _, pristine = sdxl
    folder = tmp_path_factory.mktemp("extract_sdxl")
    tuned = copy.deepcopy(pristine)
    table = {n: m for n, m in sgm_table(tuned).items() if is_linear_target(n, m)}
    assert set(CHANGED) <= set(table)
    gen = torch.Generator().manual_seed(5)
    deltas = {}
    with torch.no_grad():
        for i, (name, module) in enumerate(sorted(table.items())):
            if i % 5 == 2 and name not in CHANGED:
                continue  # unchanged: left out of the file
            w = module.weight
            delta = (torch.randn(w.shape[0], 2, generator=gen) @ torch.randn(2, w.shape[1], generator=gen)) * 0.01
            w += delta
            deltas[name] = delta
    assert {n.split("_")[1] for n in deltas} == {"unet", "te1", "te2"}
    tuned.save_pretrained(folder / "tuned")
    return folder, folder / "tuned", deltas, tuned


def test_extract_sdxl_recovers_low_rank_deltas(sdxl, sdxl_tuned, capsys):
    base_dir, pristine = sdxl
    folder, tuned_dir, deltas, tuned = sdxl_tuned
    out = folder / "diff.safetensors"
    assert extract.main(["--model_org", str(base_dir), "--model_tuned", str(tuned_dir), "--save_to", str(out),
                         "--dim", "4"]) == 0  # fmt: skip
    assert f"{len(deltas)} modules extracted" in capsys.readouterr().out
    sd = safetensors.torch.load_file(out)
    got = state_deltas(sd)
    assert set(got) == set(deltas)  # the exact SGM / te1 / te2 names, unchanged modules left out
    assert set(CHANGED) <= set(got)
    for name, want in deltas.items():
        assert float((got[name] - want.double()).norm() / want.norm()) < 1e-4, name
    assert {v.shape[0] for k, v in sd.items() if k.endswith("lora_down.weight")} == {4}
    meta = read_metadata(str(out))
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_network_dim"] == "4"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora" and "sshs_model_hash" in meta

    # baked back into the base, the file gives the tuned weights: targeted ones moved, every other one equal
    baked_dir = folder / "baked"
    assert merge.main(["--sd_model", str(base_dir), "--models", str(out), "--save_to", str(baked_dir)]) == 0
    baked = load_sdxl(baked_dir)
    for part in ("unet", "text_encoder", "text_encoder_2"):
        got_sd, want_sd = getattr(baked, part).state_dict(), getattr(tuned, part).state_dict()
        worst = max(float((got_sd[k] - want_sd[k]).abs().max()) for k in want_sd)
        assert worst < 1e-6, (part, worst)
    assert_outputs_close(baked, tuned, pristine)

    # diffusers loads the file into the base pipeline and gives the tuned model's outputs
    pipe = copy.deepcopy(pristine)
    pipe.load_lora_weights(str(folder), weight_name=out.name)
    assert_outputs_close(pipe, tuned)


def test_extract_refuses_sd1_against_sdxl(sdxl, tmp_path, capsys):
    base_dir, _ = sdxl
    sd1 = save_tiny_sd(tmp_path / "sd1", seed=0)
    code = extract.main(["--model_org", str(sd1), "--model_tuned", str(base_dir), "--save_to",
                         str(tmp_path / "x.safetensors")])  # fmt: skip
    assert code == 2 and "is SD 1.x but --model_tuned" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


# --- families: convert detects SDXL, merge refuses to mix families ------------------------------


def test_convert_detects_sdxl_without_family(sdxl, sdxl_loras, tmp_path, capsys):
    base_dir, pristine = sdxl
    folder, a, _ = sdxl_loras
    out = tmp_path / "a_diffusers.safetensors"
    assert convert.main(["--model", str(a), "--to", "diffusers", "--save_to", str(out)]) == 0, capsys.readouterr()
    assert "family: sdxl" in capsys.readouterr().out
    assert any(k.startswith("text_encoder_2.") for k in safetensors.torch.load_file(out))
    got, want = copy.deepcopy(pristine), copy.deepcopy(pristine)
    got.load_lora_weights(str(tmp_path), weight_name=out.name)
    want.load_lora_weights(str(folder), weight_name=a.name)  # diffusers reading the kohya file itself
    assert_outputs_close(got, want, pristine)
    comfy = tmp_path / "a_comfy.safetensors"
    assert convert.main(["--model", str(a), "--to", "comfyui", "--base_model", str(base_dir),
                         "--save_to", str(comfy)]) == 0  # fmt: skip
    assert any(k.startswith("text_encoders.clip_g.") for k in safetensors.torch.load_file(comfy))
    # an explicit --family that contradicts the detected family is refused, nothing written
    wrong = tmp_path / "wrong.safetensors"
    assert convert.main(["--model", str(a), "--family", "sd1", "--to", "diffusers", "--save_to", str(wrong)]) == 2
    assert "is a LoRA for sdxl" in capsys.readouterr().err and not wrong.exists()


def test_merge_refuses_sd1_with_sdxl(sdxl, sdxl_loras, tmp_path, capsys):
    base_dir, _ = sdxl
    _, a, _ = sdxl_loras
    sd1 = tmp_path / "sd1.safetensors"
    random_network(pristine_pipe(), dim=4, alpha=2.0).save_weights(sd1, None, KOHYA_META)
    out = tmp_path / "mixed.safetensors"
    for extra in ([], ["--new_rank", "2"]):
        assert merge.main(["--models", str(sd1), str(a), "--ratios", "1", "1", "--save_to", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert f"{sd1} is a LoRA for sd1" in err and f"{a} is one for sdxl" in err, err
        assert not out.exists()
    # baking: the SD1 file is named against the SDXL model before anything is merged
    baked = tmp_path / "baked"
    assert merge.main(["--sd_model", str(base_dir), "--models", str(a), str(sd1), "--save_to", str(baked)]) == 2
    assert f"{sd1} is a LoRA for sd1" in capsys.readouterr().err and not baked.exists()
