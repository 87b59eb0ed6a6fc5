"""LyCORIS plugs in through kohya's network contract: --network_module lycoris.kohya (LoHa)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import train_network

pytest.importorskip("lycoris.kohya")


def test_loha_trains_and_saves_through_the_contract(tmp_path, tiny_sd_dir, tiny_images):
    data = tmp_path / "data.toml"
    data.write_text(f"[[datasets]]\nresolution = 64\nbatch_size = 2\n"
                    f"[[datasets.subsets]]\nimage_dir = \"{tiny_images}\"\n")
    out = tmp_path / "out"
    # preset=attn-mlp: LyCORIS' default preset also names time_embedding modules twice on diffusers 0.42's UNet
    code = train_network.main([
        "--pretrained_model_name_or_path", str(tiny_sd_dir), "--dataset_config", str(data), "--output_dir", str(out),
        "--output_name", "loha", "--network_module", "lycoris.kohya", "--network_dim", "4", "--network_alpha", "1",
        "--network_args", "algo=loha", "preset=attn-mlp", "--max_train_steps", "3", "--learning_rate", "1e-2",
        "--seed", "1", "--cache_latents"])
    assert code == 0
    sd = load_file(str(out / "loha.safetensors"))
    loha_keys = [k for k in sd if k.endswith(".hada_w1_a")]
    assert loha_keys and all(k.startswith(("lora_unet_", "lora_te_")) for k in loha_keys)
    moved = [k for k in sd if k.endswith(".hada_w2_a") and sd[k].abs().sum() > 0]
    assert moved, "LoHa weights did not train"
    with torch.no_grad():
        assert all(torch.isfinite(v).all() for v in sd.values())
