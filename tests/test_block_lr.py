"""Block learning rates: down_lr_weight / mid_lr_weight / up_lr_weight / block_lr_zero_threshold (sd-scripts).

The expected numbers are computed here from sd-scripts' formulas (presets) and its block indexing
(``get_block_index``: a regex over SD 1.x diffusers names, the SGM block number for SDXL), written
independently of networks/block_lr.py.
"""

from __future__ import annotations

import json
import math
import re

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

import train_network
from library.errors import UserError
from library.tiny_models import tiny_clip_text_encoder, tiny_unet
from networks.block_lr import Preset, parse_lr_weights, preset_weights
from networks.lora import create_network, create_network_from_weights

LR = 1e-3


@pytest.fixture(scope="module")
def models():
    return tiny_clip_text_encoder(82), tiny_unet()


def sd1_layout_unet():
    """SD 1.x's block structure (4 levels, 2 layers each: 12 input, 12 output blocks) at a tiny width."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, layers_per_block=2, block_out_channels=(8, 8, 8, 8), norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=8, attention_head_dim=2,
    )


def sdxl_layout_unet():
    """SDXL's block structure (3 levels, 2 layers each: 9 input, 9 output blocks) at a tiny width."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, layers_per_block=2, block_out_channels=(8, 8, 8), norm_num_groups=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=32,
    )


# --- sd-scripts' rules, restated ---------------------------------------------------------------------


def sd_scripts_preset(name: str, n: int, base: float = 0.0) -> list[float]:
    if name == "cosine":
        return [math.sin(math.pi * (i / (n - 1)) / 2) + base for i in reversed(range(n))]
    if name == "sine":
        return [math.sin(math.pi * (i / (n - 1)) / 2) + base for i in range(n)]
    if name == "linear":
        return [i / (n - 1) + base for i in range(n)]
    if name == "reverse_linear":
        return [i / (n - 1) + base for i in reversed(range(n))]
    assert name == "zeros"
    return [0.0 + base] * n


def sd_scripts_sd1_index(lora_name: str) -> int:
    """Index into down(12) + mid(1) + up(12), as sd-scripts' get_block_index for SD 1.x."""
    m = re.search(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_", lora_name)
    if m:
        side, i, kind, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
        idx = 3 * i + (2 if kind in ("upsamplers", "downsamplers") else j)
        return 1 + idx if side == "down" else 12 + 1 + idx
    assert "mid_block_" in lora_name, lora_name
    return 12


def sd_scripts_sdxl_index(lora_name: str) -> int:
    """Index into [1] + down(9) + mid(3) + up(9) + [1], as sd-scripts' get_block_index for SDXL."""
    name = lora_name[len("lora_unet_"):]
    number = int(name.split("_")[2])
    if name.startswith("input_blocks_"):
        return 1 + number
    if name.startswith("middle_block_"):
        return 10 + number
    assert name.startswith("output_blocks_"), lora_name
    return 13 + number


def lr_of(groups: list[dict]) -> dict[int, float]:
    return {id(p): group["lr"] for group in groups for p in group["params"]}


def csv(values: list[float]) -> str:
    return ",".join(repr(v) for v in values)


# --- presets and parsing -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sine", "cosine", "linear", "reverse_linear", "zeros"])
@pytest.mark.parametrize("n", [12, 9])
def test_presets_equal_sd_scripts_numbers(name, n):
    assert preset_weights(name, n) == sd_scripts_preset(name, n)
    assert preset_weights(name, n, 0.25) == sd_scripts_preset(name, n, 0.25)
    assert parse_lr_weights(f"{name}+0.25", key="down_lr_weight") == Preset(name, 0.25)
    assert parse_lr_weights(name, key="down_lr_weight") == Preset(name, 0.0)


def test_preset_values_on_12_blocks():
    # spot values: the curves run between 0 and 1 (cosine from 1 down to 0)
    assert preset_weights("linear", 12)[0] == 0.0 and preset_weights("linear", 12)[-1] == 1.0
    assert preset_weights("cosine", 12)[0] == 1.0 and preset_weights("cosine", 12)[-1] == 0.0
    assert preset_weights("zeros", 12, 0.5) == [0.5] * 12
    assert preset_weights("reverse_linear", 12, -0.5)[0] == 0.5


# --- block indexing against sd-scripts -----------------------------------------------------------------


def test_sd1_layout_weights_follow_sd_scripts_block_index():
    te, unet = tiny_clip_text_encoder(82), sd1_layout_unet()
    down = [0.1 * (i + 1) for i in range(12)]  # all distinct, all above the default threshold 0
    up = [2.0 + 0.1 * i for i in range(12)]
    network = create_network(1.0, 4, 1.0, None, te, unet, conv_dim=2, down_lr_weight=csv(down),
                             mid_lr_weight="1.5", up_lr_weight=csv(up))
    groups, descriptions = network.prepare_optimizer_params(5e-4, LR, LR)
    lrs = lr_of(groups)
    weights = down + [1.5] + up
    kinds = set()
    for lora in network.unet_loras:
        expected = LR * weights[sd_scripts_sd1_index(lora.lora_name)]
        assert lrs[id(lora.lora_down.weight)] == expected, lora.lora_name
        assert lrs[id(lora.lora_up.weight)] == expected, lora.lora_name
        kinds.update(k for k in ("attentions", "resnets", "downsamplers", "upsamplers", "mid_block")
                     if k in lora.lora_name)
    assert kinds == {"attentions", "resnets", "downsamplers", "upsamplers", "mid_block"}
    assert all(lrs[id(p)] == 5e-4 for lora in network.text_encoder_loras for p in lora.parameters())
    assert descriptions[:2] == ["textencoder", "unet IN01"] and "unet MID" in descriptions
    assert "unet IN00" not in descriptions  # conv_in: no LoRA (as in sd-scripts)


def test_sd1_layout_preset_weights():
    te, unet = tiny_clip_text_encoder(82), sd1_layout_unet()
    network = create_network(1.0, 4, 1.0, None, te, unet, conv_dim=2, down_lr_weight="cosine+0.5",
                             up_lr_weight="sine")
    lrs = lr_of(network.prepare_optimizer_params(None, LR, LR)[0])
    weights = sd_scripts_preset("cosine", 12, 0.5) + [1.0] + sd_scripts_preset("sine", 12)
    for lora in network.unet_loras:
        index = sd_scripts_sd1_index(lora.lora_name)
        assert lrs[id(lora.lora_down.weight)] == LR * weights[index], lora.lora_name
    # sine starts at 0, so OUT00 (up_blocks.0.resnets.0) is dropped by the default zero threshold
    names = [lora.lora_name for lora in network.unet_loras]
    assert not any("up_blocks_0_resnets_0_" in n for n in names) and any("up_blocks_0_resnets_1_" in n for n in names)


@pytest.mark.parametrize("mid", ["0.5", "0.5,0.25,2"])
def test_sdxl_layout_weights_follow_sd_scripts_block_index(mid):
    te, unet = tiny_clip_text_encoder(82), sdxl_layout_unet()
    down = [0.1 * (i + 1) for i in range(9)]
    up = [2.0 + 0.1 * i for i in range(9)]
    network = create_network(1.0, 4, 1.0, None, te, unet, conv_dim=2, down_lr_weight=csv(down),
                             mid_lr_weight=mid, up_lr_weight=csv(up))
    lrs = lr_of(network.prepare_optimizer_params(None, LR, LR)[0])
    mids = [float(v) for v in mid.split(",")] * (3 if "," not in mid else 1)  # one number: the whole block
    weights = [1.0] + down + mids + up + [1.0]
    names = [lora.lora_name for lora in network.unet_loras]
    assert any(n.startswith("lora_unet_input_blocks_8_") for n in names)
    assert any(n.startswith("lora_unet_middle_block_1_") for n in names)
    for lora in network.unet_loras:
        assert lrs[id(lora.lora_up.weight)] == LR * weights[sd_scripts_sdxl_index(lora.lora_name)], lora.lora_name


# --- dropping blocks, LoRA+, files ---------------------------------------------------------------------


def test_all_ones_changes_nothing_but_the_groups(models):
    te, unet = models
    plain = create_network(1.0, 4, 1.0, None, te, unet, use_rslora="true")
    ones = create_network(1.0, 4, 1.0, None, te, unet, use_rslora="true", down_lr_weight="zeros+1",
                          up_lr_weight="1,1,1,1", mid_lr_weight="1")
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in ones.state_dict().items()}
    assert all(float(a.alpha) == float(b.alpha) for a, b in zip(plain.unet_loras, ones.unet_loras, strict=True))
    lrs = lr_of(ones.prepare_optimizer_params(None, LR, LR)[0])
    assert {lrs[id(p)] for p in ones.parameters()} == {LR}


def test_zero_threshold_drops_modules_and_their_keys(models, tmp_path):
    te, unet = models
    # tiny UNet: IN00 conv_in, IN01 down0 (res+attn), IN02 downsampler, IN03 down1 res, MID, OUT00..OUT03
    network = create_network(1.0, 4, 1.0, None, te, unet, conv_dim=2, down_lr_weight="1,0.05,1,1",
                             up_lr_weight="1,1,0.1,-1", block_lr_zero_threshold="0.1")
    names = [lora.lora_name for lora in network.unet_loras]
    assert not any(n.startswith(("lora_unet_down_blocks_0_resnets", "lora_unet_down_blocks_0_attentions"))
                   for n in names), "IN01 is at 0.05 <= 0.1"
    assert any(n.startswith("lora_unet_down_blocks_0_downsamplers_0") for n in names), "IN02 is at 1"
    assert any(n.startswith("lora_unet_down_blocks_1_") for n in names)
    assert not any(n.startswith("lora_unet_up_blocks_1_") for n in names), "OUT02 (= threshold), OUT03 < 0"
    assert any(n.startswith("lora_unet_up_blocks_0_") for n in names) and any("mid_block" in n for n in names)
    network.apply_to(te, unet)
    path = tmp_path / "blocks.safetensors"
    network.save_weights(str(path), None, None)
    keys = load_file(str(path)).keys()
    assert not any(k.startswith(("lora_unet_down_blocks_0_attentions", "lora_unet_up_blocks_1_")) for k in keys)
    assert any(k.startswith("lora_unet_down_blocks_0_downsamplers") for k in keys)
    assert any(k.startswith("lora_te_") for k in keys)  # text encoders are unaffected


def test_loading_a_file_with_dropped_blocks_names_the_threshold(models, tmp_path):
    te, unet = models
    full = create_network(1.0, 4, 1.0, None, te, unet)
    path = tmp_path / "full.safetensors"
    full.save_weights(str(path), None, None)
    dropped = create_network(1.0, 4, 1.0, None, te, unet, down_lr_weight="1,0.05,1,1", block_lr_zero_threshold="0.1")
    with pytest.raises(UserError, match=r"full\.safetensors does not match.*block_lr_zero_threshold"):
        dropped.load_weights(str(path))
    with pytest.raises(UserError) as plain_error:  # no block lr: the hint is not given
        create_network(1.0, 8, 1.0, None, te, unet).load_weights(str(path))
    assert "block_lr_zero_threshold" not in str(plain_error.value)


def test_zero_weight_drops_a_block_at_the_default_threshold(models):
    te, unet = models
    network = create_network(1.0, 4, 1.0, None, te, unet, mid_lr_weight="0")
    assert network.unet_loras and not any("mid_block" in lora.lora_name for lora in network.unet_loras)


def test_loraplus_combines_with_block_weights(models):
    te, unet = models
    network = create_network(1.0, 4, 1.0, None, te, unet, down_lr_weight="1,0.5,1,1", up_lr_weight="1,1,3,0.25",
                             mid_lr_weight="2", loraplus_unet_lr_ratio="4", loraplus_text_encoder_lr_ratio="8")
    groups, descriptions = network.prepare_optimizer_params(1e-4, LR, LR)
    lrs = lr_of(groups)
    weight = {"down_blocks_0_attentions": 0.5, "mid_block": 2.0, "up_blocks_1_attentions_0": 3.0,
              "up_blocks_1_attentions_1": 0.25}
    for lora in network.unet_loras:
        w = next(v for k, v in weight.items() if k in lora.lora_name)
        assert lrs[id(lora.lora_down.weight)] == LR * w, lora.lora_name
        assert lrs[id(lora.lora_up.weight)] == LR * w * 4, lora.lora_name
    for lora in network.text_encoder_loras:
        assert lrs[id(lora.lora_down.weight)] == 1e-4 and lrs[id(lora.lora_up.weight)] == 1e-4 * 8
    assert "unet OUT02 plus" in descriptions


def test_zero_unet_lr_freezes_every_block(models):
    te, unet = models
    network = create_network(1.0, 4, 1.0, None, te, unet, down_lr_weight="linear+0.5")
    groups, descriptions = network.prepare_optimizer_params(1e-4, 0, LR)
    assert descriptions == ["textencoder"]
    assert not any(p.requires_grad for lora in network.unet_loras for p in lora.parameters())


# --- errors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key, value, message", [
    ("down_lr_weight", "cosin", "did you mean 'cosine'"),
    ("up_lr_weight", "1,,1", "entry 2 is empty"),
    ("up_lr_weight", "1,1,", "entry 3 is empty"),
    ("down_lr_weight", "1,x", "'x' is not a number"),
    ("down_lr_weight", "sine+big", "'big' is not a number"),
    ("down_lr_weight", "1,1,nan", "not a number"),
    ("down_lr_weight", "1,1,1,1,1", "5 weights given, this UNet has 4 input blocks"),
    ("up_lr_weight", "linear,1,1,1,1", "not a number"),
    ("mid_lr_weight", "1,0.5", "expected one number"),
    ("block_lr_zero_threshold", "-1", "a number >= 0"),
    ("block_lr_zero_threshold", "x", "a number >= 0"),
])
def test_bad_values_name_the_key(models, key, value, message):
    te, unet = models
    with pytest.raises(UserError, match=re.escape(key)) as error:
        create_network(1.0, 4, 1.0, None, te, unet, **{key: value})
    assert message in str(error.value)


def test_short_lists_are_padded_with_ones_and_logged(models, caplog):
    te, unet = models
    network = create_network(1.0, 4, 1.0, None, te, unet, conv_dim=2, up_lr_weight="0.5,2")
    lrs = lr_of(network.prepare_optimizer_params(None, LR, LR)[0])
    assert "up_lr_weight: 2 weights for 4 blocks; the last 2 blocks get 1.0" in caplog.text
    # tiny UNet: up_blocks.0 = OUT00 (resnets.0), OUT01 (resnets.1 and the upsampler); up_blocks.1 = OUT02, OUT03
    for lora in network.unet_loras:
        name = lora.lora_name
        expected = 0.5 if "up_blocks_0_resnets_0_" in name else 2.0 if "up_blocks_0_" in name else 1.0
        assert lrs[id(lora.lora_down.weight)] == LR * expected, name


def test_one_number_weights_every_block_of_its_side(models):
    te, unet = models
    network = create_network(1.0, 4, 1.0, None, te, unet, conv_dim=2, down_lr_weight="0.5", up_lr_weight="1")
    lrs = lr_of(network.prepare_optimizer_params(None, LR, LR)[0])
    for lora in network.unet_loras:
        expected = LR * (0.5 if "down_blocks_" in lora.lora_name else 1.0)
        assert lrs[id(lora.lora_down.weight)] == expected, lora.lora_name


def test_dim_from_weights_refuses_block_lr(models, tmp_path):
    te, unet = models
    network = create_network(1.0, 4, 1.0, None, te, unet)
    path = tmp_path / "plain.safetensors"
    network.save_weights(str(path), None, None)
    with pytest.raises(UserError, match="down_lr_weight: not supported with --dim_from_weights"):
        create_network_from_weights(1.0, str(path), None, te, unet, down_lr_weight="zeros")


def test_block_settings_need_a_unet(models):
    te, _ = models
    with pytest.raises(UserError, match="mid_lr_weight: block settings apply to a diffusion UNet"):
        create_network(1.0, 4, 1.0, None, te, tiny_clip_text_encoder(82), mid_lr_weight="0.5")


# --- a training run ------------------------------------------------------------------------------------


def test_training_with_zeros_down_weights_saves_no_down_blocks(tmp_path, tiny_sd_dir, tiny_images):
    data = tmp_path / "data.toml"
    data.write_text(f"[[datasets]]\nresolution = 64\nbatch_size = 2\n"
                    f"  [[datasets.subsets]]\n  image_dir = \"{tiny_images}\"\n")
    out = tmp_path / "out"
    argv = ["--pretrained_model_name_or_path", str(tiny_sd_dir), "--dataset_config", str(data),
            "--output_dir", str(out), "--output_name", "lora", "--network_dim", "4", "--learning_rate", "1e-2",
            "--seed", "3", "--cache_latents", "--max_train_steps", "2", "--network_args", "down_lr_weight=zeros",
            "mid_lr_weight=1", "up_lr_weight=1", "block_lr_zero_threshold=0.1", "--network_train_unet_only"]
    assert train_network.main(argv) == 0
    path = out / "lora.safetensors"
    sd = load_file(str(path))
    assert sd and not any(k.startswith("lora_unet_down_blocks_") for k in sd)
    assert any(k.startswith("lora_unet_up_blocks_") for k in sd) and any("mid_block" in k for k in sd)
    assert any(v.abs().sum() > 0 for k, v in sd.items() if k.endswith("lora_up.weight")), "nothing trained"
    with safe_open(str(path), "pt") as f:
        network_args = json.loads(f.metadata()["ss_network_args"])
    assert network_args == {"down_lr_weight": "zeros", "mid_lr_weight": "1", "up_lr_weight": "1",
                            "block_lr_zero_threshold": "0.1"}
