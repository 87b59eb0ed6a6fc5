"""block_dims / block_alphas: ranks per UNet block in sd-scripts' order (IN00.., MID, OUT00..)."""

from __future__ import annotations

import pytest

from library.errors import UserError
from library.tiny_models import tiny_clip_text_encoder, tiny_unet
from networks.block_dims import block_counts
from networks.lora import create_network, create_network_from_weights
from networks.sgm_names import UNetLayout


@pytest.fixture(scope="module")
def models():
    return tiny_clip_text_encoder(82), tiny_unet()


def test_block_counts_match_sd_scripts():
    sd15 = UNetLayout(down_layers=(2, 2, 2, 2), down_attention=(True, True, True, False),
                      up_attention=(False, True, True, True))
    sdxl = UNetLayout(down_layers=(2, 2, 2), down_attention=(False, True, True), up_attention=(True, True, False))
    assert sum(block_counts(sd15)) + 1 == 25 and sum(block_counts(sdxl)) + 1 == 19


def test_block_dims_set_ranks_per_block(models, tmp_path):
    te, unet = models
    # tiny UNet: IN00 conv_in, IN01 down0 (res+attn), IN02 downsampler, IN03 down1, MID, OUT00..OUT03
    dims = "0,2,4,4,0,4,4,8,8"
    alphas = "1,1,1,1,1,1,1,3,3"
    network = create_network(1.0, 4, 1.0, None, te, unet, block_dims=dims, block_alphas=alphas)
    ranks = {lora.lora_name: (lora.lora_dim, float(lora.alpha)) for lora in network.unet_loras}
    assert not any("mid_block" in n for n in ranks), "MID has dim 0: no LoRA there"
    assert all(r == (2, 1.0) for n, r in ranks.items() if n.startswith("lora_unet_down_blocks_0_attentions_0"))
    # up_blocks.1 holds output blocks 3..5 of SD numbering; in the tiny UNet its attentions are OUT02 and OUT03
    assert ranks["lora_unet_up_blocks_1_attentions_1_proj_in"] == (8, 3.0)
    assert all(lora.lora_dim == 4 for lora in network.text_encoder_loras)  # text encoders keep network_dim
    network.apply_to(te, unet)
    path = tmp_path / "blocks.safetensors"
    network.save_weights(str(path), None, None)
    again, _ = create_network_from_weights(1.0, str(path), None, te, unet)
    assert {lo.lora_name: lo.lora_dim for lo in again.unet_loras} == {n: r[0] for n, r in ranks.items()}


def test_wrong_number_of_block_dims_names_the_count(models):
    te, unet = models
    with pytest.raises(UserError, match="needs 9"):
        create_network(1.0, 4, 1.0, None, te, unet, block_dims="1,2,3")
    with pytest.raises(UserError, match="block_dims"):
        create_network(1.0, 4, 1.0, None, te, unet, block_dims="1,x")


def test_block_dims_alone_keep_the_plain_module_set(models):
    te, unet = models
    # as sd-scripts: without conv_dim / conv_block_dims the ResNets (time_emb_proj, conv_shortcut) get no LoRA
    plain = create_network(1.0, 4, 1.0, None, te, unet)
    blocks = create_network(1.0, 4, 1.0, None, te, unet, block_dims="4,4,4,4,4,4,4,4,4")
    assert [lo.lora_name for lo in blocks.unet_loras] == [lo.lora_name for lo in plain.unet_loras]
    convs = create_network(1.0, 4, 1.0, None, te, unet, conv_block_dims="0,2,2,2,2,2,2,2,2")
    assert any("resnets" in lo.lora_name for lo in convs.unet_loras)


def test_block_dims_with_rslora_store_the_rslora_alpha(models):
    te, unet = models
    network = create_network(1.0, 4, 2.0, None, te, unet, use_rslora="true", block_dims="0,9,4,4,4,4,4,4,4")
    dims = {lo.lora_dim: float(lo.alpha) for lo in network.unet_loras}
    assert dims == {9: 2.0 * 3.0, 4: 2.0 * 2.0}  # alpha · sqrt(dim), so alpha / dim = 2 / sqrt(dim)
