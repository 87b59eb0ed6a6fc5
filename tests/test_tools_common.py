"""Shared helpers of the tools' tests, and unit tests of the pure math under them (networks/svd.py,
library/lora_formats.py names)."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from library.lora_formats import FAMILIES, SD1_LAYOUT, SDXL_LAYOUT, Namer, UNetLayout, split_kohya_path
from networks import lora
from networks.svd import LoRAFactors, concatenate, factorize, refactorize, relative_difference, select_rank
from networks.targets import CLIP_TEXT, SD_UNET, find_targets

KOHYA_META = {
    "ss_network_module": "networks.lora",
    "ss_network_dim": "4",
    "ss_network_alpha": "2.0",
    "ss_base_model_version": "sd_v1",
    "ss_output_name": "test",
}


@functools.lru_cache(maxsize=1)
def pristine_pipe():
    """One tiny SD pipeline per test process; tests deepcopy it before changing anything."""
    from library.tiny_models import tiny_sd_pipeline

    return tiny_sd_pipeline(seed=0)


@pytest.fixture
def tiny_pipe():
    return pristine_pipe()


def random_network(pipe, dim=4, alpha=2.0, conv_dim=None, seed=0, std=0.1, text_encoders=True):
    """A networks.lora network on ``pipe`` (SD or SDXL) whose up weights are random (so every ΔW is non-zero).

    ``text_encoders=False``: a UNet-only network.
    """
    args = {"conv_dim": str(conv_dim), "conv_alpha": "1.5"} if conv_dim else {}
    tes = [te for te in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if te is not None]
    network = lora.create_network(1.0, dim, alpha, None, tes if text_encoders else None, pipe.unet, **args)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.all_loras():
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=gen) * std)
    return network


def state_deltas(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """kohya name → ΔW computed here from the raw tensors (independent of the tools' code)."""
    out = {}
    for key in sd:
        if key.endswith(".lora_down.weight"):
            name = key.split(".")[0]
            down, up = sd[key].double(), sd[f"{name}.lora_up.weight"].double()
            alpha = float(sd.get(f"{name}.alpha", down.shape[0]))
            out[name] = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:]) * alpha / down.shape[0]
    return out


def module_table(pipe) -> dict[str, torch.nn.Module]:
    """kohya name → module of a pipeline, from networks.targets (conv included)."""
    targets = find_targets(pipe.unet, SD_UNET, True) + find_targets(pipe.text_encoder, CLIP_TEXT, True)
    return {t.lora_name: t.module for t in targets}


# --- svd ----------------------------------------------------------------------------------


def test_factorize_exact_for_low_rank_and_reports_error_otherwise():
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(24, 3) @ torch.randn(3, 40)
    f, rep = factorize(delta, 3)
    assert f.rank == 3 and f.alpha == 3.0
    assert relative_difference(f.delta(), delta) < 1e-5
    assert rep.retained_fro == pytest.approx(1.0, abs=1e-6)
    full = torch.randn(24, 40, generator=gen)
    f2, rep2 = factorize(full, 4)
    err = relative_difference(f2.delta(), full)
    assert rep2.relative_error == pytest.approx(err, rel=1e-4)
    assert 0.3 < err < 1.0 and rep2.retained_fro == pytest.approx(math.sqrt(1 - err**2), rel=1e-4)


def test_factorize_conv_kernel_shapes():
    delta = torch.randn(8, 2) @ torch.randn(2, 5 * 9)
    f, rep = factorize(delta.reshape(8, 5, 3, 3), 4)
    assert f.down.shape == (4, 5, 3, 3) and f.up.shape == (8, 4, 1, 1)
    assert rep.retained_fro == pytest.approx(1.0, abs=1e-6)
    assert relative_difference(f.delta(), delta.reshape(8, 5, 3, 3)) < 1e-5


def test_select_rank_dynamic_methods():
    s = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5])
    assert select_rank(s, 8) == 5 and select_rank(s, 3) == 3
    assert select_rank(s, 8, "sv_ratio", 4) == 2  # keep s >= 10/4
    assert select_rank(s, 8, "sv_cumulative", 0.8) == 2  # (10+5)/18.5 = 0.81
    fro = torch.sqrt(torch.cumsum(s**2, 0) / (s**2).sum())
    assert select_rank(s, 8, "sv_fro", float(fro[2]) - 1e-6) == 3
    assert select_rank(s, 2, "sv_fro", 0.9999) == 2  # capped by max rank


def test_refactorize_and_concatenate_keep_delta():
    gen = torch.Generator().manual_seed(1)
    a = LoRAFactors(torch.randn(4, 6, 3, 3, generator=gen), torch.randn(7, 4, 1, 1, generator=gen), 2.0)
    b = LoRAFactors(torch.randn(2, 6, 3, 3, generator=gen), torch.randn(7, 2, 1, 1, generator=gen), 1.0)
    cat = concatenate([(a, 0.5), (b, -1.0)])
    assert cat.rank == 6
    want = 0.5 * a.delta() - b.delta()
    assert relative_difference(cat.delta(), want) < 1e-6
    small, rep = refactorize(cat, 6)
    assert relative_difference(small.delta(), want) < 1e-5 and rep.new_rank == 6
    smaller, rep = refactorize(cat, 3)
    assert smaller.rank == 3 and 0 < rep.relative_error < 1
    assert relative_difference(smaller.delta(), want) == pytest.approx(rep.relative_error, rel=1e-3)


# --- names ----------------------------------------------------------------------------------


def test_vocabulary_recovers_every_sd_module_path(tiny_pipe):
    for root, spec, prefix in ((tiny_pipe.unet, SD_UNET, ""), (tiny_pipe.text_encoder, CLIP_TEXT, "text_model.")):
        for t in find_targets(root, spec, True):
            mangled = t.lora_name[len(spec.prefix) + 1 :]
            assert split_kohya_path(mangled) == (t.path if t.path.startswith(prefix) else prefix + t.path)


def test_ldm_names_round_trip_and_known_values(tiny_pipe):
    layout = UNetLayout.from_config(tiny_pipe.unet.config)
    paths = [n for n, m in tiny_pipe.unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    ldm = {layout.to_ldm(p) for p in paths}
    assert len(ldm) == len(paths)
    for p in paths:
        assert layout.from_ldm(layout.to_ldm(p)) == p
    # SD1.5 numbering as every SD1 checkpoint has it
    assert SD1_LAYOUT.to_ldm("down_blocks.1.attentions.1.proj_in") == "input_blocks.5.1.proj_in"
    assert SD1_LAYOUT.to_ldm("down_blocks.2.downsamplers.0.conv") == "input_blocks.9.0.op"
    assert SD1_LAYOUT.to_ldm("up_blocks.0.upsamplers.0.conv") == "output_blocks.2.1.conv"
    assert SD1_LAYOUT.to_ldm("up_blocks.1.upsamplers.0.conv") == "output_blocks.5.2.conv"
    assert SD1_LAYOUT.to_ldm("up_blocks.3.resnets.2.conv_shortcut") == "output_blocks.11.0.skip_connection"
    assert SD1_LAYOUT.to_ldm("mid_block.resnets.1.conv1") == "middle_block.2.in_layers.2"
    # SDXL kohya names (KOHYA_COMPAT.md §4)
    namer = Namer(FAMILIES["sdxl"])
    comp = FAMILIES["sdxl"].components[0]
    name = namer.kohya_name(comp, "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
    assert name == "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert SDXL_LAYOUT.from_ldm("middle_block.1.proj_in") == "mid_block.attentions.0.proj_in"
    assert namer.locate(name) == (comp, "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")


def test_ldm_names_with_a_different_layer_count_per_level():
    # layers_per_block may be a list (one count per level): the numbering must follow each level's count
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=(1, 2), cross_attention_dim=8,
                                attention_head_dim=2, norm_num_groups=4, sample_size=8,
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    layout = UNetLayout.from_config(unet.config)
    paths = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert len({layout.to_ldm(p) for p in paths}) == len(paths)
    assert all(layout.from_ldm(layout.to_ldm(p)) == p for p in paths)
    # level 0 has one ResNet: input_blocks 1; its downsampler is input_blocks 2; level 1 starts at 3
    assert layout.to_ldm("down_blocks.0.attentions.0.proj_in") == "input_blocks.1.1.proj_in"
    assert layout.to_ldm("down_blocks.0.downsamplers.0.conv") == "input_blocks.2.0.op"
    assert layout.to_ldm("down_blocks.1.attentions.1.proj_in") == "input_blocks.4.1.proj_in"


def llm_adapter(folder, use_dora: bool, seed: int = 0) -> dict:
    """A tiny Llama folder and a trained-looking LoRA (or DoRA) on it, written as the trainer writes both
    outputs: the PEFT folder and the kohya file. The network stays applied to ``model`` (our forward)."""
    from transformers import AutoModelForCausalLM

    from library.tiny_llm import save_tiny_llm
    from networks.peft_export import write_peft_adapter

    base = save_tiny_llm(folder / "base")
    model = AutoModelForCausalLM.from_pretrained(str(base)).eval()
    args = {"use_dora": "true"} if use_dora else {}
    network = lora.create_network(1.0, 4, 2.0, None, None, model, **args)
    network.apply_to(None, model, apply_text_encoder=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.unet_loras:
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=gen) * 0.05)
            if use_dora:  # a magnitude away from ‖W‖_row, as after training
                module.magnitude.mul_(1 + 0.2 * torch.rand(module.magnitude.shape, generator=gen))
    peft_dir = write_peft_adapter(network, model, folder / "adapter", str(base))
    kohya = folder / "adapter.safetensors"
    network.save_weights(kohya, None, {"ss_network_dim": "4"})
    return {"base": base, "model": model, "network": network, "peft": peft_dir, "kohya": kohya}


# --- families -------------------------------------------------------------------------------


def test_detect_family_from_keys_then_metadata():
    from library.lora_files import detect_family

    sd1 = ["lora_te_text_model_encoder_layers_0_mlp_fc1.alpha", "lora_unet_down_blocks_0_attentions_0_proj_in.alpha"]
    assert detect_family(sd1, {"ss_base_model_version": "sdxl_base_v1-0"}) == (
        "sd1", "key lora_te_text_model_encoder_layers_0_mlp_fc1")  # the names win over a wrong label
    assert detect_family(["lora_unet_input_blocks_4_1_proj_in.lora_up.weight"], {})[0] == "sdxl"
    assert detect_family(["lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha"], {})[0] == "sdxl"
    assert detect_family(["text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_A.weight"], {})[0] == "sdxl"
    assert detect_family(["lora_unet_model_layers_0_self_attn_q_proj.alpha"], {})[0] == "llm"
    assert detect_family(["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"], {})[0] == "llm"
    # a diffusers / ComfyUI UNet-only file: the names fit SD1 and SDXL, the metadata decides
    unet_only = ["unet.down_blocks.1.attentions.0.proj_in.lora_A.weight"]  # a block both have
    assert detect_family(unet_only, {}) == (None, "")
    # without metadata, a block only one of them has decides (the file written without metadata by diffusers'
    # SDXL script, a ComfyUI UNet-only file, an SD 1.x file in the original block names)
    assert detect_family(["unet.down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q.lora_A.weight"],
                         {})[0] == "sdxl"
    assert detect_family(["diffusion_model.input_blocks.1.1.proj_in.lora_down.weight"], {})[0] == "sd1"
    assert detect_family(["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"], {})[0] == "sd1"
    assert detect_family(["lora_unet_input_blocks_1_1_proj_in.lora_down.weight"], {})[0] == "sd1"
    assert detect_family(["lora_unet_input_blocks_4_1_proj_in.lora_down.weight"], {})[0] == "sdxl"  # both: kohya's SDXL
    assert detect_family(unet_only, {"ss_base_model_version": "sdxl_base_v1-0"}) == (
        "sdxl", "ss_base_model_version sdxl_base_v1-0")
    assert detect_family(unet_only, {"modelspec.architecture": "stable-diffusion-v1/lora"})[0] == "sd1"
