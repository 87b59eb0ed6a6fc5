"""networks.lora on tiny SD1-style models: key names, identity at creation, merge equivalence,
save/load round trips, optimizer groups, dropouts and user-facing errors."""

from __future__ import annotations

import copy
import os

import pytest
import safetensors.torch
import torch
from torch import nn

from library.errors import UserError
from library.fileio import atomic_write
from library.tiny_models import tiny_clip_text_encoder, tiny_clip_tokenizer, tiny_unet
from networks import lora
from networks.functional import delta_weight, merged_weight

TE = "lora_te_text_model_encoder_layers_"
ATT = [
    f"lora_unet_{block}_attentions_{i}" for block, i in (("down_blocks_0", 0), ("up_blocks_1", 0), ("up_blocks_1", 1))
]
ATT.append("lora_unet_mid_block_attentions_0")

# Written out by hand: these are the names A1111/ComfyUI/diffusers look up.
EXPECTED_TE = [
    f"{TE}0_self_attn_q_proj", f"{TE}0_self_attn_k_proj", f"{TE}0_self_attn_v_proj", f"{TE}0_self_attn_out_proj",
    f"{TE}0_mlp_fc1", f"{TE}0_mlp_fc2",
    f"{TE}1_self_attn_q_proj", f"{TE}1_self_attn_k_proj", f"{TE}1_self_attn_v_proj", f"{TE}1_self_attn_out_proj",
    f"{TE}1_mlp_fc1", f"{TE}1_mlp_fc2",
]  # fmt: skip
EXPECTED_UNET = [
    f"{a}_{leaf}"
    for a in ATT
    for leaf in (
        "proj_in", "proj_out",
        "transformer_blocks_0_attn1_to_q", "transformer_blocks_0_attn1_to_k", "transformer_blocks_0_attn1_to_v",
        "transformer_blocks_0_attn1_to_out_0",
        "transformer_blocks_0_attn2_to_q", "transformer_blocks_0_attn2_to_k", "transformer_blocks_0_attn2_to_v",
        "transformer_blocks_0_attn2_to_out_0",
        "transformer_blocks_0_ff_net_0_proj", "transformer_blocks_0_ff_net_2",
    )
]  # fmt: skip
# With conv_dim: (name, is a kxk conv that gets conv_dim).
EXPECTED_CONV = [
    ("lora_unet_down_blocks_0_resnets_0_conv1", True), ("lora_unet_down_blocks_0_resnets_0_conv2", True),
    ("lora_unet_down_blocks_0_resnets_0_time_emb_proj", False),
    ("lora_unet_down_blocks_0_downsamplers_0_conv", True),
    ("lora_unet_down_blocks_1_resnets_0_conv1", True), ("lora_unet_down_blocks_1_resnets_0_conv2", True),
    ("lora_unet_down_blocks_1_resnets_0_time_emb_proj", False),
    ("lora_unet_down_blocks_1_resnets_0_conv_shortcut", False),
    ("lora_unet_mid_block_resnets_0_conv1", True), ("lora_unet_mid_block_resnets_0_conv2", True),
    ("lora_unet_mid_block_resnets_0_time_emb_proj", False),
    ("lora_unet_mid_block_resnets_1_conv1", True), ("lora_unet_mid_block_resnets_1_conv2", True),
    ("lora_unet_mid_block_resnets_1_time_emb_proj", False),
    ("lora_unet_up_blocks_0_resnets_0_conv1", True), ("lora_unet_up_blocks_0_resnets_0_conv2", True),
    ("lora_unet_up_blocks_0_resnets_0_time_emb_proj", False),
    ("lora_unet_up_blocks_0_resnets_0_conv_shortcut", False),
    ("lora_unet_up_blocks_0_resnets_1_conv1", True), ("lora_unet_up_blocks_0_resnets_1_conv2", True),
    ("lora_unet_up_blocks_0_resnets_1_time_emb_proj", False),
    ("lora_unet_up_blocks_0_resnets_1_conv_shortcut", False),
    ("lora_unet_up_blocks_0_upsamplers_0_conv", True),
    ("lora_unet_up_blocks_1_resnets_0_conv1", True), ("lora_unet_up_blocks_1_resnets_0_conv2", True),
    ("lora_unet_up_blocks_1_resnets_0_time_emb_proj", False),
    ("lora_unet_up_blocks_1_resnets_0_conv_shortcut", False),
    ("lora_unet_up_blocks_1_resnets_1_conv1", True), ("lora_unet_up_blocks_1_resnets_1_conv2", True),
    ("lora_unet_up_blocks_1_resnets_1_time_emb_proj", False),
    ("lora_unet_up_blocks_1_resnets_1_conv_shortcut", False),
]  # fmt: skip


@pytest.fixture(scope="module")
def pristine():
    """Unhooked tiny models; tests that apply a network work on deep copies."""
    return tiny_clip_text_encoder(len(tiny_clip_tokenizer())), tiny_unet()


@pytest.fixture
def models(pristine):
    return copy.deepcopy(pristine[0]), copy.deepcopy(pristine[1])


def kohya_module_map(text_encoder: nn.Module, unet: nn.Module) -> dict[str, nn.Module]:
    """kohya name → module, derived here independently of networks.targets."""
    table = {}
    for path, module in text_encoder.named_modules():
        table["lora_te_text_model_" + path.replace(".", "_")] = module
    for path, module in unet.named_modules():
        table["lora_unet_" + path.replace(".", "_")] = module
    return table


def randomise(network: lora.LoRANetwork, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.all_loras():
            w = module.lora_up.weight
            w.copy_(torch.randn(w.shape, generator=gen) * 0.1)


def unet_inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 16, 16, generator=gen), torch.tensor([10, 500]), torch.randn(2, 7, 32, generator=gen)


def run_unet(unet: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return unet(*unet_inputs()).sample


def run_te(text_encoder: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return text_encoder(torch.tensor([[0, 5, 9, 13, 1, 1]])).last_hidden_state


def merge_from_state_dict(modules: dict[str, nn.Module], sd: dict[str, torch.Tensor], multiplier: float = 1.0):
    with torch.no_grad():
        for key, down in sd.items():
            if not key.endswith(".lora_down.weight"):
                continue
            name = key.split(".")[0]
            up, alpha = sd[f"{name}.lora_up.weight"], float(sd[f"{name}.alpha"])
            weight = modules[name].weight
            weight.copy_(merged_weight(weight, down, up, alpha / down.shape[0], multiplier))


# --- names ------------------------------------------------------------------------------------


def test_lora_names_without_conv(pristine):
    network = lora.create_network(1.0, 4, 1.0, None, *pristine)
    assert sorted(m.lora_name for m in network.text_encoder_loras) == sorted(EXPECTED_TE)
    assert sorted(m.lora_name for m in network.unet_loras) == sorted(EXPECTED_UNET)
    expected_keys = {
        f"{n}.{k}" for n in EXPECTED_TE + EXPECTED_UNET for k in ("lora_down.weight", "lora_up.weight", "alpha")
    }
    assert set(network.state_dict()) == expected_keys


def test_lora_names_with_conv(pristine):
    network = lora.create_network(1.0, 4, 1.0, None, *pristine, conv_dim="2", conv_alpha="0.5")
    names = {m.lora_name: m for m in network.unet_loras}
    assert sorted(names) == sorted(EXPECTED_UNET + [n for n, _ in EXPECTED_CONV])
    for name, is_kxk in EXPECTED_CONV:
        assert names[name].lora_dim == (2 if is_kxk else 4), name
        assert float(names[name].alpha) == (0.5 if is_kxk else 1.0), name
    assert all(names[n].lora_dim == 4 for n in EXPECTED_UNET)


def test_every_name_maps_to_the_real_module(pristine):
    network = lora.create_network(1.0, 4, 1.0, None, *pristine, conv_dim="2")
    table = kohya_module_map(*pristine)
    for module in network.all_loras():
        assert module.org_module is table[module.lora_name]
        # The original layer stays out of the network's own parameters and state dict.
        assert not any(p is module.org_module.weight for p in network.parameters())


def test_two_text_encoders_get_te1_te2(pristine):
    te = pristine[0]
    network = lora.create_network(1.0, 4, 1.0, None, [te, copy.deepcopy(te)], None)
    groups, descriptions = network.prepare_optimizer_params([1e-4, 2e-4], 1e-3, 1e-3)
    assert descriptions == ["textencoder 1", "textencoder 2"] and [g["lr"] for g in groups] == [1e-4, 2e-4]
    names = [m.lora_name for m in network.text_encoder_loras]
    assert sorted(names) == sorted(
        [n.replace("lora_te_", "lora_te1_") for n in EXPECTED_TE]
        + [n.replace("lora_te_", "lora_te2_") for n in EXPECTED_TE]
    )


# --- forward math -----------------------------------------------------------------------------


def test_new_network_is_identity(models, pristine):
    te, unet = models
    network = lora.create_network(1.0, 4, 1.0, None, te, unet, conv_dim="4")
    network.apply_to(te, unet)
    assert torch.equal(run_unet(unet), run_unet(pristine[1]))
    assert torch.equal(run_te(te), run_te(pristine[0]))
    assert set(unet.state_dict()) == set(pristine[1].state_dict())  # base keys unchanged by the hook


@pytest.mark.parametrize(
    "layer, x_shape",
    [
        (nn.Linear(8, 12), (3, 5, 8)),
        (nn.Conv2d(6, 10, 1), (2, 6, 7, 7)),
        (nn.Conv2d(6, 10, 3, stride=2, padding=1), (2, 6, 9, 9)),
    ],
    ids=["linear", "conv1x1", "conv3x3"],
)
def test_module_forward_equals_merged_weight(layer, x_shape):
    torch.manual_seed(0)
    merged = copy.deepcopy(layer)
    module = lora.LoRAModule("x", layer, multiplier=0.7, lora_dim=3, alpha=2.0)
    nn.init.normal_(module.lora_up.weight, std=0.2)
    module.apply_to()
    module.eval()
    x = torch.randn(x_shape)
    with torch.no_grad():
        merged.weight.copy_(merged_weight(merged.weight, module.lora_down.weight, module.lora_up.weight, 2.0 / 3, 0.7))
        expected, actual, plain = merged(x), layer(x), module.org_forward(x)
    assert not torch.allclose(actual, plain, atol=1e-3)  # the adapter changes the output
    assert torch.allclose(actual, expected, atol=1e-5)
    assert delta_weight(module.lora_down.weight, module.lora_up.weight, 1.0).shape == layer.weight.shape


def test_whole_unet_forward_equals_merged(models, pristine):
    te, unet = models
    network = lora.create_network(0.8, 4, 2.0, None, te, unet, conv_dim="2", conv_alpha="3")
    randomise(network)
    sd = network.state_dict()
    network.apply_to(te, unet)
    network.eval()

    reference = copy.deepcopy(pristine[1])
    merge_from_state_dict(kohya_module_map(pristine[0], reference), sd, multiplier=0.8)
    out, ref = run_unet(unet), run_unet(reference)
    assert not torch.allclose(out, run_unet(pristine[1]), atol=1e-3)  # the LoRA does something
    assert torch.allclose(out, ref, atol=1e-5)


def test_merge_to_equals_applied_network(models, pristine):
    te, unet = models
    applied_te, applied_unet = copy.deepcopy(pristine[0]), copy.deepcopy(pristine[1])
    trained = lora.create_network(1.0, 4, 1.0, None, applied_te, applied_unet, conv_dim="2")
    randomise(trained, seed=3)
    trained.apply_to(applied_te, applied_unet)
    sd = trained.state_dict()

    network, _ = lora.create_network_from_weights(1.0, None, None, te, unet, weights_sd=sd)
    network.merge_to(te, unet, sd)
    assert torch.allclose(run_unet(unet), run_unet(applied_unet), atol=1e-5)
    assert torch.allclose(run_te(te), run_te(applied_te), atol=1e-5)


def test_gradients_reach_only_the_adapters(models):
    te, unet = models
    unet.requires_grad_(False)
    network = lora.create_network(1.0, 4, 1.0, None, None, unet, conv_dim="2")
    network.apply_to(None, unet)
    network.prepare_grad_etc(None, unet)
    network.on_epoch_start(None, unet)
    unet(*unet_inputs()).sample.square().mean().backward()
    # lora_up starts at zero, so only lora_up receives gradient on the first step.
    assert all(m.lora_up.weight.grad is not None and m.lora_up.weight.grad.abs().sum() > 0 for m in network.unet_loras)
    assert all(p.grad is None for p in unet.parameters())


def test_multiplier_zero_is_identity(models, pristine):
    te, unet = models
    network = lora.create_network(1.0, 4, 1.0, None, te, unet)
    randomise(network)
    network.apply_to(te, unet)
    network.set_multiplier(0.0)
    assert torch.equal(run_unet(unet), run_unet(pristine[1]))
    network.set_multiplier(1.0)
    assert not torch.equal(run_unet(unet), run_unet(pristine[1]))


# --- dropouts ---------------------------------------------------------------------------------


def _dropout_module(**dropouts) -> tuple[lora.LoRAModule, nn.Linear]:
    torch.manual_seed(0)
    layer = nn.Linear(8, 8)
    reference = copy.deepcopy(layer)
    module = lora.LoRAModule("x", layer, lora_dim=4, alpha=4.0, **dropouts)
    nn.init.normal_(module.lora_up.weight)
    module.apply_to()
    return module, reference


def test_dropouts_inactive_in_eval_active_in_train():
    x = torch.randn(16, 8)
    for kwargs in ({"dropout": 0.5}, {"rank_dropout": 0.5}, {"module_dropout": 0.5}):
        module, _ = _dropout_module(**kwargs)
        layer = module.org_module
        module.eval()
        expected = layer(x)
        assert torch.equal(layer(x), expected), kwargs
        module.train()
        assert any(not torch.allclose(layer(x), expected) for _ in range(10)), kwargs


def test_rank_dropout_drops_whole_ranks_and_rescales():
    module, reference = _dropout_module(rank_dropout=0.5)
    # Rank 1: each sample's delta is either dropped or doubled (1 / (1 - 0.5)).
    module.lora_down = nn.Linear(8, 1, bias=False)
    module.lora_up = nn.Linear(1, 8, bias=False)
    nn.init.normal_(module.lora_up.weight)
    module.lora_dim, module.scale = 1, 1.0
    x = torch.randn(64, 8)
    with torch.no_grad():
        base, full = reference(x), module.lora_up(module.lora_down(x))
        module.train()
        delta = module.org_module(x) - base
    dropped = torch.isclose(delta, torch.zeros_like(delta), atol=1e-6).all(dim=1)
    doubled = torch.isclose(delta, 2 * full, atol=1e-5).all(dim=1)
    assert bool((dropped | doubled).all())
    assert 0 < int(dropped.sum()) < 64


def test_module_dropout_skips_adapter():
    module, reference = _dropout_module(module_dropout=0.999999)
    module.train()
    x = torch.randn(4, 8)
    assert torch.allclose(module.org_module(x), reference(x))


# --- save / load ------------------------------------------------------------------------------


def test_save_and_create_from_weights_round_trip_mixed_ranks(pristine, tmp_path):
    te, unet = pristine
    all_names = [m.lora_name for m in lora.create_network(1.0, 1, 1.0, None, te, unet, conv_dim="1").all_loras()]
    dims = {name: 1 + i % 3 for i, name in enumerate(all_names)}
    alphas = {name: 0.5 * (1 + i % 4) for i, name in enumerate(all_names)}
    network = lora.LoRANetwork([te], unet, modules_dim=dims, modules_alpha=alphas)
    randomise(network)
    path = tmp_path / "mixed.safetensors"
    network.save_weights(path, None, None)

    loaded, weights_sd = lora.create_network_from_weights(1.0, path, None, te, unet)
    loaded.load_weights(path)
    assert {m.lora_name: m.lora_dim for m in loaded.all_loras()} == dims
    assert {m.lora_name: m.scale for m in loaded.all_loras()} == {n: alphas[n] / dims[n] for n in dims}
    original, reloaded = network.state_dict(), loaded.state_dict()
    assert set(original) == set(reloaded) == set(weights_sd)
    assert all(torch.equal(original[k], reloaded[k]) for k in original)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, None])
def test_save_dtype(pristine, tmp_path, dtype):
    network = lora.create_network(1.0, 4, 1.0, None, *pristine)
    path = tmp_path / "x.safetensors"
    network.save_weights(path, dtype, None)
    saved = safetensors.torch.load_file(path)
    assert {t.dtype for t in saved.values()} == {dtype or torch.float32}
    assert all(p.dtype == torch.float32 for p in network.parameters())  # the network itself is not cast


def test_load_weights_mismatch_names_file_and_keys(pristine, tmp_path):
    te, unet = pristine
    path = tmp_path / "unet_only.safetensors"
    lora.create_network(1.0, 4, 1.0, None, None, unet).save_weights(path, None, None)
    network = lora.create_network(1.0, 4, 1.0, None, te, unet)
    with pytest.raises(UserError) as err:
        network.load_weights(path)
    assert str(path) in str(err.value) and "missing" in str(err.value) and "lora_te_" in str(err.value)



def test_load_weights_of_another_rank_is_one_line_with_the_fix(pristine, tmp_path):
    te, unet = pristine
    path = tmp_path / "rank8.safetensors"
    lora.create_network(1.0, 8, 1.0, None, te, unet).save_weights(path, None, None)
    with pytest.raises(UserError) as err:
        lora.create_network(1.0, 4, 1.0, None, te, unet).load_weights(path)
    message = str(err.value)
    assert "The file has rank 8 where this network has 4: pass --dim_from_weights" in message
    assert "size mismatch" not in message and message.count("\n") == 0

def test_load_weights_refreshes_scale(pristine, tmp_path):
    te, unet = pristine
    source = lora.create_network(1.0, 4, 2.0, None, te, unet)
    path = tmp_path / "a2.safetensors"
    source.save_weights(path, None, None)
    target = lora.create_network(1.0, 4, 1.0, None, te, unet)
    target.load_weights(path)
    assert all(m.scale == 0.5 for m in target.all_loras())


def test_load_weights_skips_parts_not_trained(models, tmp_path, caplog):
    te, unet = models
    full = lora.create_network(1.0, 4, 1.0, None, te, unet)
    randomise(full)
    path = tmp_path / "full.safetensors"
    full.save_weights(path, None, None)
    network = lora.create_network(1.0, 4, 1.0, None, te, unet)
    network.apply_to(te, unet, apply_text_encoder=False)
    with caplog.at_level("WARNING"):
        network.load_weights(path)  # --network_train_unet_only with a file that also has text encoder weights
    expected = full.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in network.state_dict().items())
    # the output will lack the text encoder half: said as a warning (shown at the default level), with the way
    # to keep it, which does keep it (frozen at a learning rate of 0, and saved)
    assert "left out of the files this run writes" in caplog.text and "--text_encoder_lr 0" in caplog.text
    kept = lora.create_network(1.0, 4, 1.0, None, te, unet)
    kept.apply_to(te, unet)
    kept.load_weights(path)
    groups, descriptions = kept.prepare_optimizer_params(0.0, 1e-3, 1e-3)
    assert descriptions == ["unet"] and not any(p.requires_grad for m in kept.text_encoder_loras
                                                 for p in m.parameters())
    assert kept.state_dict().keys() == expected.keys()


def test_weights_for_another_model_are_refused(pristine):
    te, unet = pristine
    sd = {"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 320, 1, 1),
          "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(320, 4, 1, 1)}  # fmt: skip
    with pytest.raises(UserError, match="another model architecture"):
        lora.create_network_from_weights(1.0, None, None, te, unet, weights_sd=sd)
    with pytest.raises(UserError, match="not a kohya LoRA"):
        lora.create_network_from_weights(1.0, None, None, te, unet, weights_sd={"x.hada_w1_a": torch.zeros(1)})


def test_apply_text_encoder_false(models):
    te, unet = models
    network = lora.create_network(1.0, 4, 1.0, None, te, unet)
    network.apply_to(te, unet, apply_text_encoder=False, apply_unet=True)
    assert network.text_encoder_loras == []
    assert not any(k.startswith("lora_te") for k in network.state_dict())
    assert any(k.startswith("lora_unet") for k in network.state_dict())
    assert all("forward" not in m.__dict__ for m in te.modules())  # nothing hooked in the text encoder
    groups, descriptions = network.prepare_optimizer_params(1e-4, 1e-3, 1e-3)
    assert descriptions == ["unet"]


# --- optimizer groups -------------------------------------------------------------------------


def test_prepare_optimizer_params(pristine):
    network = lora.create_network(1.0, 4, 1.0, None, *pristine)
    te_params = {id(p) for m in network.text_encoder_loras for p in m.parameters()}
    unet_params = {id(p) for m in network.unet_loras for p in m.parameters()}

    groups, descriptions = network.prepare_optimizer_params(1e-4, 1e-3, 5e-4)
    assert descriptions == ["textencoder", "unet"]
    assert [g["lr"] for g in groups] == [1e-4, 1e-3]
    assert {id(p) for p in groups[0]["params"]} == te_params
    assert {id(p) for p in groups[1]["params"]} == unet_params

    groups, descriptions = network.prepare_optimizer_params(None, None, 5e-4)
    assert [g["lr"] for g in groups] == [5e-4, 5e-4]

    groups, descriptions = network.prepare_optimizer_params(0, 1e-3, 5e-4)
    assert descriptions == ["unet"]
    network.prepare_grad_etc(None, None)  # must not unfreeze the lr=0 part
    assert {id(p) for p in network.get_trainable_params()} == unet_params


# --- network_args -----------------------------------------------------------------------------


def test_unknown_network_arg_suggests_the_right_key(pristine):
    with pytest.raises(UserError) as err:
        lora.create_network(1.0, 4, 1.0, None, *pristine, conv_dimm="4")
    message = str(err.value)
    assert "conv_dimm" in message and "did you mean 'conv_dim'" in message and "module_dropout" in message


@pytest.mark.parametrize("key, value", [("conv_dim", "four"), ("rank_dropout", "1.5")])
def test_bad_network_arg_value_names_key_and_value(pristine, key, value):
    with pytest.raises(UserError) as err:
        lora.create_network(1.0, 4, 1.0, None, *pristine, **{key: value})
    assert key in str(err.value) and value in str(err.value)


def test_network_args_are_parsed_from_strings(pristine):
    network = lora.create_network(1.0, None, None, None, *pristine, rank_dropout="0.1", module_dropout="0.2")
    module = network.unet_loras[0]
    assert (module.lora_dim, float(module.alpha), module.rank_dropout, module.module_dropout) == (4, 1.0, 0.1, 0.2)


# --- atomic saves -----------------------------------------------------------------------------


def test_save_leaves_no_temporary_file(pristine, tmp_path):
    lora.create_network(1.0, 4, 1.0, None, *pristine).save_weights(tmp_path / "x.safetensors", None, {"ss_a": "1"})
    assert os.listdir(tmp_path) == ["x.safetensors"]


def test_atomic_write_text_and_failure(tmp_path):
    with atomic_write(tmp_path / "ok.txt", "w") as f:
        f.write("héllo")
    assert (tmp_path / "ok.txt").read_text(encoding="utf-8") == "héllo"
    with pytest.raises(RuntimeError), atomic_write(tmp_path / "bad.txt") as f:
        f.write(b"partial")
        raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == ["ok.txt"]


def test_failing_save_leaves_no_partial_file(pristine, tmp_path, monkeypatch):
    network = lora.create_network(1.0, 4, 1.0, None, *pristine)
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"previous good file")

    def broken_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        network.save_weights(path, None, None)
    assert os.listdir(tmp_path) == ["x.safetensors"]
    assert path.read_bytes() == b"previous good file"
