"""A file written by networks.lora loads in diffusers (``load_lora_weights``) and gives the same
outputs as merging the file's tensors into the weights independently."""

from __future__ import annotations

import copy

import pytest
import safetensors.torch
import torch
from torch import nn

from library.tiny_models import tiny_sd_pipeline
from networks import lora
from networks.functional import merged_weight

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def pristine_pipe():
    return tiny_sd_pipeline(seed=0)


def kohya_module_map(text_encoder: nn.Module, unet: nn.Module) -> dict[str, nn.Module]:
    """kohya name → module, derived here independently of networks.targets."""
    table = {"lora_te_text_model_" + p.replace(".", "_"): m for p, m in text_encoder.named_modules()}
    table.update({"lora_unet_" + p.replace(".", "_"): m for p, m in unet.named_modules()})
    return table


def merge_file_into(modules: dict[str, nn.Module], sd: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for key in sd:
            if key.endswith(".lora_down.weight"):
                name = key.split(".")[0]
                down, up, alpha = sd[key], sd[f"{name}.lora_up.weight"], float(sd[f"{name}.alpha"])
                weight = modules[name].weight
                weight.copy_(merged_weight(weight, down, up, alpha / down.shape[0]))


def count_lora_layers(*models: nn.Module) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(isinstance(m, BaseTunerLayer) for model in models for m in model.modules())


def unet_output(unet: nn.Module) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    latents, context = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 7, 32, generator=gen)
    with torch.no_grad():
        return unet(latents, torch.tensor([10, 700]), encoder_hidden_states=context).sample


def te_output(text_encoder: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return text_encoder(torch.tensor([[0, 3, 8, 20, 1, 1]])).last_hidden_state


@pytest.mark.parametrize("network_args", [{}, {"conv_dim": "2", "conv_alpha": "1.5"}], ids=["linear", "locon"])
def test_diffusers_loads_kohya_file_with_same_outputs(pristine_pipe, tmp_path, network_args):
    pipe = copy.deepcopy(pristine_pipe)
    ref_unet, ref_te = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder)

    # alpha != dim, so a loader that ignored alpha (or used alpha instead of alpha/dim) would fail.
    network = lora.create_network(1.0, 4, 2.0, None, pipe.text_encoder, pipe.unet, **network_args)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in network.all_loras():
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=gen) * 0.1)
    path = tmp_path / "kohya_lora.safetensors"
    network.save_weights(path, None, {"ss_network_module": "networks.lora", "ss_network_dim": "4"})

    pipe.load_lora_weights(str(tmp_path), weight_name=path.name)

    file_sd = safetensors.torch.load_file(path)
    n_modules = len({k.split(".")[0] for k in file_sd})
    assert n_modules == len(network.all_loras())
    assert count_lora_layers(pipe.unet, pipe.text_encoder) == n_modules

    merge_file_into(kohya_module_map(ref_te, ref_unet), file_sd)
    assert not torch.allclose(unet_output(ref_unet), unet_output(pristine_pipe.unet), atol=1e-3)
    assert torch.allclose(unet_output(pipe.unet), unet_output(ref_unet), atol=1e-4)
    assert not torch.allclose(te_output(ref_te), te_output(pristine_pipe.text_encoder), atol=1e-3)
    assert torch.allclose(te_output(pipe.text_encoder), te_output(ref_te), atol=1e-4)


def test_dynamic_resize_output_loads_in_diffusers_with_the_merged_outputs(pristine_pipe, tmp_path):
    """A dynamic resize gives each module its own rank; were the alphas to differ as well (alpha/rank kept,
    as sd-scripts does), diffusers' loader would scale many modules wrongly."""
    import tools.resize as resize

    pipe = copy.deepcopy(pristine_pipe)
    ref_unet, ref_te = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder)
    network = lora.create_network(1.0, 4, 2.0, None, pipe.text_encoder, pipe.unet)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i, module in enumerate(network.all_loras()):
            up = torch.randn(module.lora_up.weight.shape, generator=gen) * 0.1
            up[:, 1 + i % 4:] = 0  # numerical rank 1 to 4, so the dynamic method picks different ranks
            module.lora_up.weight.copy_(up)
    source = tmp_path / "src.safetensors"
    network.save_weights(source, None, {"ss_network_module": "networks.lora", "ss_network_dim": "4"})
    path = tmp_path / "dyn.safetensors"
    assert resize.main(["--model", str(source), "--save_to", str(path), "--new_rank", "4", "--dynamic_method",
                        "sv_fro", "--dynamic_param", "0.999999"]) == 0
    file_sd = safetensors.torch.load_file(path)
    assert len({v.shape[0] for k, v in file_sd.items() if k.endswith("lora_down.weight")}) == 4

    pipe.load_lora_weights(str(tmp_path), weight_name=path.name)
    merge_file_into(kohya_module_map(ref_te, ref_unet), file_sd)
    assert torch.allclose(unet_output(pipe.unet), unet_output(ref_unet), atol=1e-4)
    assert torch.allclose(te_output(pipe.text_encoder), te_output(ref_te), atol=1e-4)
