"""Other tools' LoRA files, read by every tool (library/lora_foreign.py): PEFT on a diffusers UNet, diffusers'
kohya output, old diffusers attention-processor keys, ``pytorch_lora_weights.bin``, and ``--family`` for resize
and merge.

The files are written here by the other tools themselves (peft ``save_pretrained`` /
``get_peft_model_state_dict``, diffusers' ``convert_state_dict_to_kohya``) or, for the old diffusers layout that
no current library writes, key by key from a PEFT adapter. Expected module names come from the models' own
module paths (SDXL: test_sdxl_lora's hand-derived SGM table) and expected ΔW from PEFT's ``get_delta_weight``,
never from the code under test.
"""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from test_sdxl_lora import module_table as sgm_table

from library.errors import UserError
from library.lora_files import file_family, load_lora
from library.tiny_models import tiny_sd_pipeline, tiny_sdxl_pipeline
from tools import merge, resize, show

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


def kohya_table(pipe) -> dict[str, str]:
    """kohya module name → "<component>.<module path>" for every module of the pipeline's UNet and text encoders.

    SD 1.x/2.x: the diffusers path with "." as "_" (``lora_te_text_model_...``); SDXL: test_sdxl_lora's table.
    """
    components = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    if getattr(pipe, "text_encoder_2", None) is not None:
        components["text_encoder_2"] = pipe.text_encoder_2
        where = {id(m): f"{c}.{p}" for c, model in components.items() for p, m in model.named_modules()}
        return {name: where[id(m)] for name, m in sgm_table(pipe).items() if id(m) in where}
    te_inner = "" if hasattr(pipe.text_encoder, "text_model") else "text_model_"
    table = {"lora_unet_" + p.replace(".", "_"): f"unet.{p}" for p, _ in pipe.unet.named_modules() if p}
    table.update({"lora_te_" + te_inner + p.replace(".", "_"): f"text_encoder.{p}"
                  for p, _ in pipe.text_encoder.named_modules() if p})  # fmt: skip
    return table


def adapt(pipe, alpha: float = 8.0, patterns: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """Add PEFT LoRA adapters (rank 4, random B) to the UNet and text encoders; "<component>.<path>" → ΔW.

    ``patterns``: also a rank_pattern (conv1 rank 2) and an alpha_pattern (to_k alpha 2), as trainers write them.
    """
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    extra = {"rank_pattern": {"conv1": 2}, "alpha_pattern": {"to_k": 2.0}} if patterns else {}
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=alpha, target_modules=UNET_TARGETS, **extra))
    encoders = [c for c in ("text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None]
    for name in encoders:
        getattr(pipe, name).add_adapter(LoraConfig(r=4, lora_alpha=alpha, target_modules=TEXT_TARGETS))
    gen = torch.Generator().manual_seed(seed)
    deltas = {}
    with torch.no_grad():
        for comp in ("unet", *encoders):
            for path, module in getattr(pipe, comp).named_modules():
                if isinstance(module, LoraLayer):
                    up = module.lora_B["default"].weight
                    up.copy_(torch.randn(up.shape, generator=gen) * 0.1)
                    deltas[f"{comp}.{path}"] = module.get_delta_weight("default").float()
    return deltas


def peft_state(model, prefix: str = "") -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {prefix + k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def a_b_deltas(sd: dict[str, torch.Tensor], prefix: str = "", component: str = "unet") -> dict[str, torch.Tensor]:
    """"<component>.<path>" → B A of a lora_A / lora_B state dict without alphas (alpha = rank)."""
    out = {}
    for key, down in sd.items():
        if key.endswith(".lora_A.weight"):
            up = sd[key.replace(".lora_A.", ".lora_B.")].float()
            module = key[len(prefix) : -len(".lora_A.weight")]
            out[f"{component}.{module}"] = (up.flatten(1) @ down.float().flatten(1)).reshape(up.shape[0],
                                                                                             *down.shape[1:])
    return out


def assert_reads_as(lora, table: dict[str, str], expected: dict[str, torch.Tensor], rtol: float = 1e-5) -> None:
    """Every module read has a name of the model's and the ΔW the source file gives that module."""
    unknown = sorted(set(lora.state) - set(table))
    assert not unknown, f"names the model does not have: {unknown[:5]}"
    got = {table[name]: f.delta() for name, f in lora.state.items()}
    assert set(got) == set(expected), (sorted(set(expected) - set(got))[:5], sorted(set(got) - set(expected))[:5])
    for path, delta in expected.items():
        assert got[path].shape == delta.shape, path
        err = float((got[path] - delta).norm() / delta.norm())
        assert err < rtol, (path, err)


@pytest.fixture(scope="module")
def sd1():
    """(the tiny SD pipeline with PEFT adapters, its kohya table, the adapters' ΔW)."""
    pipe = tiny_sd_pipeline(seed=0)
    table = kohya_table(pipe)
    return pipe, table, adapt(pipe)


@pytest.fixture(scope="module")
def sdxl():
    pipe = tiny_sdxl_pipeline(seed=0)
    table = kohya_table(pipe)
    return pipe, table, adapt(pipe)


def only(expected: dict[str, torch.Tensor], component: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in expected.items() if k.startswith(component + ".")}


# --- 1. PEFT adapters of a diffusers UNet --------------------------------------------------


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_peft_folder_of_a_unet_is_read_as_its_family(kind, sd1, sdxl, tmp_path):
    """peft's save_pretrained of a UNet (base_model.model.down_blocks... + adapter_config.json with its alpha and
    patterns) was read as an LLM adapter; it is the family's UNet LoRA, with PEFT's scale."""
    from peft import get_peft_model

    pipe, table, expected = sd1 if kind == "sd1" else sdxl
    unet = type(pipe.unet).from_config(pipe.unet.config)
    peft_model = get_peft_model(unet, pipe.unet.peft_config["default"])
    peft_model.load_state_dict({f"base_model.model.{k}": v for k, v in pipe.unet.state_dict().items()}, strict=False)
    peft_model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["auto_mapping"]["base_model_class"] == "UNet2DConditionModel"  # what PEFT writes for a UNet
    assert next(iter(safetensors.torch.load_file(tmp_path / "adapter" / "adapter_model.safetensors"))).startswith(
        "base_model.model.")

    assert file_family(str(tmp_path / "adapter"))[0] == kind
    lora = load_lora(str(tmp_path / "adapter"))
    assert lora.format == "peft"
    assert_reads_as(lora, table, only(expected, "unet"))
    name = ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k" if kind == "sd1"
            else "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_k")  # fmt: skip
    assert lora.state[name].alpha == 2.0  # the alpha_pattern of adapter_config.json

    peft_model.save_pretrained(tmp_path / "bin", safe_serialization=False)  # adapter_model.bin, as older PEFT saved
    assert (tmp_path / "bin" / "adapter_model.bin").is_file()
    assert_reads_as(load_lora(str(tmp_path / "bin")), table, only(expected, "unet"))


@pytest.mark.parametrize("prefix", ["base_model.model.", ""])
def test_peft_state_dict_of_a_unet_in_a_safetensors_file(prefix, sd1, sdxl, tmp_path, capsys):
    """get_peft_model_state_dict saved as one file: PEFT's prefix (a PeftModel) or none (unet.add_adapter); no
    config, so alpha = rank and ΔW = B A."""
    for kind, (pipe, table, _) in (("sd1", sd1), ("sdxl", sdxl)):
        path = tmp_path / f"{kind}.safetensors"
        sd = peft_state(pipe.unet, prefix)
        safetensors.torch.save_file(sd, path)
        lora = load_lora(str(path))
        assert_reads_as(lora, table, a_b_deltas(sd, prefix))
        assert show.main([str(path), "--json", "--no_modules"]) == 0
        assert json.loads(capsys.readouterr().out)["family"] == kind


# --- 2. diffusers' kohya output ------------------------------------------------------------


def test_diffusers_kohya_output_of_sd1_reads_te1_as_the_text_encoder(tmp_path):
    """convert_state_dict_to_kohya names SD 1.x's text encoder lora_te1_ (kohya: lora_te_); that made the file
    SDXL's. Its alpha is rank (an int64 tensor), so the PEFT adapters' alpha is rank too."""
    from diffusers.utils import convert_state_dict_to_kohya

    pipe = tiny_sd_pipeline(seed=0)
    table = kohya_table(pipe)
    expected = adapt(pipe, alpha=4.0, patterns=False)
    sd = convert_state_dict_to_kohya({**peft_state(pipe.unet, "unet."), **peft_state(pipe.text_encoder,
                                                                                      "text_encoder.")})
    assert any(k.startswith("lora_te1_") for k in sd) and not any(k.startswith("lora_te_") for k in sd)
    safetensors.torch.save_file(sd, tmp_path / "sd1.safetensors")

    assert file_family(str(tmp_path / "sd1.safetensors"))[0] == "sd1"
    lora = load_lora(str(tmp_path / "sd1.safetensors"))
    assert lora.format == "kohya"
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in lora.state
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0" in lora.state
    assert_reads_as(lora, table, expected)


def test_diffusers_kohya_output_of_sdxl_reads_diffusers_blocks_as_sgm_names(tmp_path):
    """convert_state_dict_to_kohya keeps diffusers block names under lora_unet_ for SDXL (kohya: input_blocks_...)."""
    from diffusers.utils import convert_state_dict_to_kohya

    pipe = tiny_sdxl_pipeline(seed=0)
    table = kohya_table(pipe)
    expected = adapt(pipe, alpha=4.0, patterns=False)
    sd = convert_state_dict_to_kohya({**peft_state(pipe.unet, "unet."),
                                      **peft_state(pipe.text_encoder, "text_encoder."),
                                      **peft_state(pipe.text_encoder_2, "text_encoder_2.")})
    assert any(k.startswith("lora_unet_down_blocks_1_attentions_0") for k in sd)
    safetensors.torch.save_file(sd, tmp_path / "sdxl.safetensors")

    lora = load_lora(str(tmp_path / "sdxl.safetensors"))
    assert "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_out_0" in lora.state
    assert "lora_unet_output_blocks_0_1_proj_in" in lora.state
    assert "lora_unet_input_blocks_1_0_in_layers_2" in lora.state  # down_blocks.0.resnets.0.conv1
    assert "lora_te2_text_model_encoder_layers_0_mlp_fc1" in lora.state
    assert_reads_as(lora, table, expected)


# --- 3. old diffusers attention-processor keys --------------------------------------------


def old_diffusers_keys(pipe, expected: dict[str, torch.Tensor], attn_procs: bool) -> dict[str, torch.Tensor]:
    """The adapters in diffusers ≤ 0.20's layouts, scale folded into ``up`` (those files store no alpha).

    ``attn_procs``: unet.save_attn_procs' ``<attention>.processor.to_q_lora.down.weight`` (no "unet." prefix) for
    the attention projections; otherwise LoRACompatibleLinear's ``unet.<module>.lora.down.weight``. Text encoders:
    ``text_encoder.<module>.lora_linear_layer.down.weight``, and the older ``self_attn.to_q_lora`` for q_proj.
    """
    from peft.tuners.lora import LoraLayer

    out = {}
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, comp, None)
        for path, module in (model.named_modules() if model is not None else ()):
            if not isinstance(module, LoraLayer):
                continue
            down = module.lora_A["default"].weight.detach().clone()
            up = module.lora_B["default"].weight.detach() * module.scaling["default"]
            if comp == "unet" and attn_procs and path.endswith(("to_q", "to_k", "to_v", "to_out.0")):
                attention, slot = path.removesuffix(".0").rsplit(".", 1)  # to_out.0 is the processor's to_out
                key = f"{attention}.processor.{slot}_lora"
            elif comp == "unet":
                key = f"unet.{path}.lora"
            elif path.endswith("self_attn.q_proj"):
                key = f"{comp}.{path[: -len('q_proj')]}to_q_lora"
            else:
                key = f"{comp}.{path}.lora_linear_layer"
            out[f"{key}.down.weight"], out[f"{key}.up.weight"] = down, up.clone()
            assert torch.allclose(expected[f"{comp}.{path}"], (up.flatten(1) @ down.flatten(1)).reshape(
                up.shape[0], *down.shape[1:]).float(), atol=1e-6)  # fmt: skip
    return out


@pytest.mark.parametrize("attn_procs", [True, False])
def test_old_diffusers_keys_map_to_kohya_modules(attn_procs, sd1, sdxl, tmp_path):
    """processor.to_out_lora is to_out.0, lora.down / lora_linear_layer.down are the module's; alpha = rank."""
    for kind, (pipe, table, expected) in (("sd1", sd1), ("sdxl", sdxl)):
        sd = old_diffusers_keys(pipe, expected, attn_procs)
        safetensors.torch.save_file(sd, tmp_path / f"{kind}.safetensors")
        lora = load_lora(str(tmp_path / f"{kind}.safetensors"))
        assert lora.format == "diffusers-old"
        assert file_family(str(tmp_path / f"{kind}.safetensors"))[0] == kind
        assert_reads_as(lora, table, expected)
        assert all(f.alpha == f.rank for f in lora.state.values())
    if attn_procs:
        assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight" not in sd
        assert "down_blocks.1.attentions.0.transformer_blocks.1.attn1.processor.to_out_lora.up.weight" in sd
        assert "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_out_0" in lora.state


def test_old_diffusers_alpha_is_used_when_stored(sd1, tmp_path):
    pipe, table, expected = sd1
    sd = old_diffusers_keys(pipe, expected, attn_procs=False)
    key = "unet.down_blocks.0.attentions.0.proj_in.lora"
    sd[f"{key}.alpha"] = torch.tensor(2.0)
    sd[f"{key}.up.weight"] = sd[f"{key}.up.weight"] * 2  # rank 4, alpha 2: the same ΔW
    safetensors.torch.save_file(sd, tmp_path / "alpha.safetensors")
    lora = load_lora(str(tmp_path / "alpha.safetensors"))
    assert lora.state["lora_unet_down_blocks_0_attentions_0_proj_in"].alpha == 2.0
    assert_reads_as(lora, table, expected)


# --- 4. pytorch_lora_weights.bin ------------------------------------------------------------


def test_pytorch_lora_weights_bin_is_read_as_weights_only(sd1, tmp_path, capsys):
    pipe, table, expected = sd1
    path = tmp_path / "pytorch_lora_weights.bin"
    torch.save(old_diffusers_keys(pipe, expected, attn_procs=True), path)
    lora = load_lora(str(path))
    assert lora.format == "diffusers-old"
    assert_reads_as(lora, table, expected)
    assert show.main([str(path), "--no_modules"]) == 0
    assert "format: diffusers-old, family sd1" in capsys.readouterr().out

    evil = tmp_path / "evil.bin"
    torch.save({"x": torch.zeros(1), "code": print}, evil)  # a pickled function: never unpickled
    with pytest.raises(UserError, match="weights only"):
        load_lora(str(evil))


# --- 5. --family for resize and merge ------------------------------------------------------


@pytest.fixture
def undecidable(sdxl, tmp_path):
    """An SDXL UNet LoRA in diffusers names, no metadata, only modules SD 1.x has too (its middle block's first
    transformer block and ResNets)."""
    pipe, table, _ = sdxl

    def shared(key: str) -> bool:
        return key.startswith("unet.mid_block.") and "transformer_blocks.1" not in key

    sd = {k: v for k, v in peft_state(pipe.unet, "unet.").items() if shared(k)}
    path = tmp_path / "mid.safetensors"
    safetensors.torch.save_file(sd, path)
    assert file_family(str(path)) == (None, "")
    return path, table, a_b_deltas(sd, "unet.")


def test_resize_family_names_an_undetectable_file(undecidable, tmp_path):
    path, table, expected = undecidable
    out = tmp_path / "out.safetensors"
    assert resize.main(["--model", str(path), "--save_to", str(out), "--new_rank", "4", "--family", "sdxl"]) == 0
    names = {k.split(".")[0] for k in safetensors.torch.load_file(out)}
    assert "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q" in names
    assert names <= set(table)
    resized = load_lora(str(out))
    assert_reads_as(resized, table, expected, rtol=1e-4)  # rank 4 of rank ≤ 4: exact up to the SVD's rounding

    assert resize.main(["--model", str(path), "--save_to", str(out), "--new_rank", "4", "--overwrite"]) == 0
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.alpha" in safetensors.torch.load_file(
        out)  # without --family: SD 1.x names, which an SDXL loader does not match



def test_show_reports_the_family_given_for_an_undetectable_file(undecidable, capsys):
    assert show.main(["--model", str(undecidable[0]), "--family", "sdxl", "--no_modules"]) == 0
    assert "family sdxl" in capsys.readouterr().out
    assert show.main(["--model", str(undecidable[0]), "--no_modules"]) == 0
    assert "family unknown" in capsys.readouterr().out


def test_merge_family_names_undetectable_files_and_checks_the_others(undecidable, sdxl, sd1, tmp_path, capsys):
    path, table, expected = undecidable
    out = tmp_path / "merged.safetensors"
    assert merge.main(["--models", str(path), str(path), "--ratios", "1", "0.5", "--family", "sdxl",
                       "--save_to", str(out)]) == 0  # fmt: skip
    merged = load_lora(str(out))
    assert "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q" in merged.state
    assert_reads_as(merged, table, {k: v * 1.5 for k, v in expected.items()}, rtol=1e-4)

    sd1_file = tmp_path / "sd1.safetensors"
    safetensors.torch.save_file(peft_state(sd1[0].unet, "unet."), sd1_file)  # detected as SD 1.x by its blocks
    assert merge.main(["--models", str(path), str(sd1_file), "--family", "sdxl", "--save_to",
                       str(tmp_path / "x.safetensors")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "is a LoRA for sd1" in err and "--family sdxl" in err
    assert merge.main(["--models", str(path), "--family", "sdxl", "--sd_model", str(tmp_path),
                       "--save_to", str(tmp_path / "y")]) == 2  # fmt: skip
    assert "--family applies to merging LoRAs" in capsys.readouterr().err


# --- still refused, saying what the file is -------------------------------------------------


def test_comfyui_lorasave_differences_are_named(tmp_path, capsys):
    """ComfyUI's LoraSave stores full differences (.diff / .diff_b) next to LoRA pairs: no LoRA holds them."""
    sd = {"diffusion_model.input_blocks.1.1.proj_in.lora_down.weight": torch.zeros(4, 32),
          "diffusion_model.input_blocks.1.1.proj_in.lora_up.weight": torch.zeros(32, 4),
          "diffusion_model.input_blocks.1.0.in_layers.0.diff": torch.zeros(32)}  # fmt: skip
    safetensors.torch.save_file(sd, tmp_path / "lorasave.safetensors")
    assert show.main([str(tmp_path / "lorasave.safetensors")]) == 2
    assert "ComfyUI's LoraSave .diff" in capsys.readouterr().err


def test_a_family_override_that_contradicts_the_file_is_refused(sd1, tmp_path, capsys):
    # resize / convert / show force --family on undetectable files; on a detectable one it must agree
    f = tmp_path / "sd1.safetensors"
    safetensors.torch.save_file(peft_state(sd1[0].unet, "unet."), f)
    out = tmp_path / "out.safetensors"
    from tools import convert

    for tool, argv in ((resize, ["--save_to", str(out), "--new_rank", "2"]),
                       (convert, ["--to", "kohya", "--save_to", str(out)]), (show, [])):
        assert tool.main(["--model", str(f), "--family", "sdxl", *argv]) == 2, tool.__name__
        assert "is a LoRA for sd1" in capsys.readouterr().err and not out.exists()
    assert show.main(["--model", str(f), "--family", "sd1", "--no_modules"]) == 0
