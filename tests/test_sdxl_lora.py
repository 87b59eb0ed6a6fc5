"""SDXL LoRA files: SGM key names as kohya/ComfyUI write them, and diffusers loads them exactly.

The expected names are written by hand from the original SDXL UNet layout (input_blocks /
middle_block / output_blocks); the module table used for the independent merge is derived
here with the SGM arithmetic, not with networks/sgm_names.py.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from networks import lora
from networks.sgm_names import SDXL_LAYOUT, UNetLayout, block_table, to_sgm

pytest.importorskip("peft")


def tiny_sdxl(tmp_path_factory) -> Path:
    """The tiny SDXL folder, written once per session and shared by the SDXL test modules."""
    from library.tiny_models import save_tiny_sdxl

    folder = tmp_path_factory.getbasetemp() / "tiny-sdxl"
    if not (folder / "model_index.json").is_file():
        save_tiny_sdxl(folder, seed=0)
    return folder


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl(tmp_path_factory)))


# --- names ---------------------------------------------------------------------------------

# (diffusers module path, the kohya/ComfyUI key) for representative modules of the tiny model,
# whose two levels keep SDXL's numbering (input_blocks.4.1 is the first transformer).
EXPECTED_NAMES = [
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
     "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"),
    ("down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_out.0",
     "lora_unet_input_blocks_5_1_transformer_blocks_1_attn2_to_out_0"),
    ("down_blocks.1.attentions.0.proj_in", "lora_unet_input_blocks_4_1_proj_in"),
    ("mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
     "lora_unet_middle_block_1_transformer_blocks_0_ff_net_0_proj"),
    ("mid_block.attentions.0.proj_out", "lora_unet_middle_block_1_proj_out"),
    ("up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k",
     "lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_k"),
    ("up_blocks.0.attentions.2.transformer_blocks.1.ff.net.2",
     "lora_unet_output_blocks_2_1_transformer_blocks_1_ff_net_2"),
]
EXPECTED_CONV_NAMES = [
    ("down_blocks.0.resnets.0.conv1", "lora_unet_input_blocks_1_0_in_layers_2"),
    ("down_blocks.0.downsamplers.0.conv", "lora_unet_input_blocks_3_0_op"),
    ("down_blocks.1.resnets.0.conv_shortcut", "lora_unet_input_blocks_4_0_skip_connection"),
    ("mid_block.resnets.1.conv2", "lora_unet_middle_block_2_out_layers_3"),
    ("up_blocks.0.resnets.2.time_emb_proj", "lora_unet_output_blocks_2_0_emb_layers_1"),
    ("up_blocks.0.upsamplers.0.conv", "lora_unet_output_blocks_2_2_conv"),
    ("up_blocks.1.resnets.2.conv2", "lora_unet_output_blocks_5_0_out_layers_3"),
]
EXPECTED_TE_NAMES = [
    ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj"),
    ("lora_te1_text_model_encoder_layers_1_mlp_fc2"),
    ("lora_te2_text_model_encoder_layers_0_self_attn_out_proj"),
    ("lora_te2_text_model_encoder_layers_1_mlp_fc1"),
]


def test_real_sdxl_layout_names():
    """Real SDXL base numbering (3 levels): second downsampler, last attentions, both upsamplers."""
    table = block_table(SDXL_LAYOUT)
    assert to_sgm("down_blocks.1.downsamplers.0.conv", table) == "input_blocks.6.0.op"
    assert to_sgm("down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_v", table) == \
        "input_blocks.8.1.transformer_blocks.9.attn2.to_v"
    assert to_sgm("up_blocks.1.upsamplers.0.conv", table) == "output_blocks.5.2.conv"
    assert to_sgm("up_blocks.2.resnets.2.conv1", table) == "output_blocks.8.0.in_layers.2"
    assert to_sgm("mid_block.resnets.1.time_emb_proj", table) == "middle_block.2.emb_layers.1"
    assert to_sgm("conv_in", table) == "input_blocks.0.0"
    with pytest.raises(ValueError, match="no SGM name"):
        to_sgm("down_blocks.3.resnets.0.conv1", table)
    # an up block without attention puts its upsampler at index 1 (SD 1.x-style layouts)
    sd1 = UNetLayout((2, 2), (True, False), (False, True))
    assert to_sgm("up_blocks.0.upsamplers.0.conv", block_table(sd1)) == "output_blocks.2.1.conv"


def test_network_keys_are_the_sgm_names(pristine):
    network = lora.create_network(1.0, 4, 1.0, None, [pristine.text_encoder, pristine.text_encoder_2],
                                  pristine.unet, conv_dim="2")
    by_name = {m.lora_name: m for m in network.all_loras()}
    unet_modules = dict(pristine.unet.named_modules())
    for path, name in EXPECTED_NAMES + EXPECTED_CONV_NAMES:
        assert name in by_name, name
        assert by_name[name].org_module is unet_modules[path], (name, path)
    for name in EXPECTED_TE_NAMES:
        assert name in by_name, name
    assert not [n for n in by_name if re.match(r"lora_unet_(down|mid|up)_block", n)], "diffusers names leaked"
    assert {n.split("_")[1] for n in by_name} == {"unet", "te1", "te2"}
    # a file's SGM names find their modules again (--network_weights, --dim_from_weights, tools)
    again, _ = lora.create_network_from_weights(1.0, None, None, [pristine.text_encoder, pristine.text_encoder_2],
                                                pristine.unet, weights_sd=network.state_dict())
    assert {m.lora_name: m.org_module for m in again.all_loras()} == {n: m.org_module for n, m in by_name.items()}


# --- an independent table: kohya name → module of the diffusers pipeline ---------------------

_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1",
           "conv_shortcut": "skip_connection"}


def _sgm_block(parts: list[str], layers: int = 2) -> tuple[str, int] | None:
    """(SGM block prefix, number of path parts consumed), by the layout arithmetic."""
    per = layers + 1
    if parts[0] == "down_blocks" and len(parts) > 4:
        i, kind, j = int(parts[1]), parts[2], int(parts[3])
        n = 1 + i * per + (layers if kind == "downsamplers" else j)
        return f"input_blocks_{n}_{1 if kind == 'attentions' else 0}", 4
    if parts[0] == "up_blocks" and len(parts) > 4:
        i, kind, j = int(parts[1]), parts[2], int(parts[3])
        n = i * per + (layers if kind == "upsamplers" else j)
        return f"output_blocks_{n}_{ {'resnets': 0, 'attentions': 1, 'upsamplers': 2}[kind] }", 4
    if parts[0] == "mid_block" and len(parts) > 3:
        return f"middle_block_{ {'resnets.0': 0, 'attentions.0': 1, 'resnets.1': 2}[f'{parts[1]}.{parts[2]}'] }", 3
    return None


def module_table(pipe) -> dict[str, nn.Module]:
    table = {}
    for path, module in pipe.unet.named_modules():
        block = _sgm_block(path.split("."))
        if block is None:
            continue
        prefix, used = block
        rest = path.split(".")[used:]
        if rest:
            rest[0] = _RESNET.get(rest[0], "op" if rest[0] == "conv" and "downsamplers" in path else rest[0])
        table["lora_unet_" + "_".join([prefix, *rest])] = module
    for prefix, te in (("lora_te1_", pipe.text_encoder), ("lora_te2_", pipe.text_encoder_2)):
        inner = "" if hasattr(te, "text_model") else "text_model_"  # transformers 5 flattened CLIPTextModel
        table.update({prefix + inner + p.replace(".", "_"): m for p, m in te.named_modules() if p})
    return table


def merge_into(pipe, sd: dict[str, torch.Tensor]) -> None:
    """W += (alpha / r) · up ⊗ down for every module in the file."""
    table = module_table(pipe)
    with torch.no_grad():
        for key in sd:
            if key.endswith(".lora_down.weight"):
                name = key.split(".")[0]
                down, up, alpha = sd[key].float(), sd[f"{name}.lora_up.weight"].float(), float(sd[f"{name}.alpha"])
                weight = table[name].weight
                delta = (up.flatten(1) @ down.flatten(1)) * (alpha / down.shape[0])
                weight += delta.reshape(weight.shape)


def unet_and_text_outputs(pipe) -> tuple[torch.Tensor, ...]:
    """UNet noise prediction with SDXL's added conditioning, and both encoders' outputs."""
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 16, 16, generator=gen)
    ids = torch.tensor([[0, 3, 8, 20, 1, 1], [0, 5, 7, 1, 1, 1]])
    with torch.no_grad():
        te1 = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        out2 = pipe.text_encoder_2(ids, output_hidden_states=True)
        te2, pooled = out2.hidden_states[-2], out2.text_embeds
        context = torch.randn(2, 6, 64, generator=gen)  # fixed, so the UNet comparison is the UNet's alone
        time_ids = torch.tensor([[64.0, 48.0, 0.0, 8.0, 32.0, 32.0], [32.0, 32.0, 0.0, 0.0, 32.0, 32.0]])
        cond = {"text_embeds": torch.randn(2, 32, generator=gen), "time_ids": time_ids}
        unet = pipe.unet(latents, torch.tensor([10, 700]), context, added_cond_kwargs=cond).sample
    return unet, te1, te2, pooled


@pytest.mark.parametrize("network_args", [{}, {"conv_dim": "2", "conv_alpha": "1.5"}], ids=["linear", "locon"])
def test_diffusers_loads_the_file_with_merged_outputs(pristine, tmp_path, network_args):
    from peft.tuners.tuners_utils import BaseTunerLayer

    pipe = copy.deepcopy(pristine)
    network = lora.create_network(1.0, 4, 2.0, None, [pipe.text_encoder, pipe.text_encoder_2], pipe.unet,
                                  **network_args)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in network.all_loras():
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=gen) * 0.1)
    path = tmp_path / "sdxl_lora.safetensors"
    network.save_weights(path, None, {"ss_base_model_version": "sdxl_base_v1-0"})
    sd = load_file(str(path))
    names = {k.split(".")[0] for k in sd}

    table = module_table(pristine)
    assert names <= set(table), sorted(names - set(table))[:5]  # every key names a real module

    reference = copy.deepcopy(pristine)
    merge_into(reference, sd)
    pipe.load_lora_weights(str(tmp_path), weight_name=path.name)
    wrapped = [m for model in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2) for m in model.modules()
               if isinstance(m, BaseTunerLayer)]
    assert len(wrapped) == len(names) == len(network.all_loras())

    loaded, expected, base = (unet_and_text_outputs(p) for p in (pipe, reference, pristine))
    for got, want, before in zip(loaded, expected, base, strict=True):
        assert not torch.allclose(want, before, atol=1e-3), "the LoRA changed nothing; the test would be vacuous"
        assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
