"""LyCORIS plugs in through kohya's network contract: --network_module lycoris.kohya (LoHa)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import train_network

pytest.importorskip("lycoris.kohya")


def _train_lycoris(tmp_path, tiny_sd_dir, tiny_images, algo: str, steps: int):
    """A LyCORIS run on the tiny SD model; returns the path of its file."""
    data = tmp_path / "data.toml"
    data.write_text(f"[[datasets]]\nresolution = 64\nbatch_size = 2\n"
                    f"[[datasets.subsets]]\nimage_dir = \"{tiny_images}\"\n")
    out = tmp_path / "out"
    # preset=attn-mlp: LyCORIS' default preset also names time_embedding modules twice on diffusers 0.42's UNet
    code = train_network.main([
        "--pretrained_model_name_or_path", str(tiny_sd_dir), "--dataset_config", str(data), "--output_dir", str(out),
        "--output_name", algo, "--network_module", "lycoris.kohya", "--network_dim", "4", "--network_alpha", "1",
        "--network_args", f"algo={algo}", "preset=attn-mlp", "--max_train_steps", str(steps), "--learning_rate",
        "1e-2", "--seed", "1", "--cache_latents"])
    assert code == 0
    return out / f"{algo}.safetensors"


def test_loha_trains_and_saves_through_the_contract(tmp_path, tiny_sd_dir, tiny_images):
    sd = load_file(str(_train_lycoris(tmp_path, tiny_sd_dir, tiny_images, "loha", 3)))
    loha_keys = [k for k in sd if k.endswith(".hada_w1_a")]
    assert loha_keys and all(k.startswith(("lora_unet_", "lora_te_")) for k in loha_keys)
    moved = [k for k in sd if k.endswith(".hada_w2_a") and sd[k].abs().sum() > 0]
    assert moved, "LoHa weights did not train"
    with torch.no_grad():
        assert all(torch.isfinite(v).all() for v in sd.values())


def test_lycoris_lora_file_names_hashes_and_merge(tmp_path, tiny_sd_dir, tiny_images, capsys):
    """What a consumer meets in a LyCORIS file from this trainer (SDXL audit F1-F3): encoder keys with
    text_model_ (ComfyUI / A1111 map no other form), hashes that tools/show.py verifies, and merge --sd_model
    baking every module, the time embedding a LyCORIS preset adapts included."""
    from safetensors import safe_open

    from library.metadata import compute_sshs_hashes
    from tools import merge, show

    path = _train_lycoris(tmp_path, tiny_sd_dir, tiny_images, "lora", 2)
    sd = load_file(str(path))
    modules = {k.split(".")[0] for k in sd}
    te = [m for m in modules if m.startswith("lora_te_")]
    assert te and all(m.startswith("lora_te_text_model_encoder_layers_") for m in te), sorted(te)[:3]
    assert any("time_embedding" in m for m in modules)  # beyond networks.lora's targets
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == compute_sshs_hashes(sd, meta)
    capsys.readouterr()
    assert show.main([str(path)]) == 0, capsys.readouterr().out
    baked = tmp_path / "baked"
    assert merge.main(["--sd_model", str(tiny_sd_dir), "--models", str(path), "--save_to", str(baked)]) == 0, \
        capsys.readouterr().err
    assert f"merged {len(modules)} modules" in capsys.readouterr().out
