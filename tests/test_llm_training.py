"""The LLM family and the LoRA network on a tiny Llama: training, packing, PEFT export, rsLoRA, DoRA, QLoRA.

PEFT is the consumer: every adapter folder written here is loaded with
``peft.PeftModel.from_pretrained`` and must give the logits our network gives (1e-5; 1e-4 for 4-bit).
"""

from __future__ import annotations

import json

import pytest
import torch

import networks.lora as lora
from library.dataset_config import DatasetDefaults
from library.errors import UserError
from library.families import DataRequest, load_family
from library.families.llm import LLMFamily
from networks.peft_export import peft_to_kohya, read_peft_adapter

PROJ = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    from library.tiny_llm import save_tiny_llm

    return save_tiny_llm(tmp_path_factory.mktemp("models") / "tiny-llm", seed=0)


@pytest.fixture(scope="module")
def llm_data(tmp_path_factory):
    from library.tiny_llm import write_tiny_llm_data

    return write_tiny_llm_data(tmp_path_factory.mktemp("llm-data"))


@pytest.fixture(scope="module")
def tok(llm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llm_dir)


def _base(llm_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llm_dir)
    model.requires_grad_(False)
    return model.eval()


def _family(llm_dir, **options) -> LLMFamily:
    family = load_family("llm", str(llm_dir), seed=0, weight_dtype=torch.float32, device="cpu", **options)
    family.prepare(torch.device("cpu"), torch.float32, True, False)
    return family


def _data(family, tmp_path, llm_data, packing: bool, batch_size: int, **subset_keys):
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in subset_keys.items())
    (tmp_path / "data.toml").write_text(f"""
[[datasets]]
max_seq_length = 64
packing = {str(packing).lower()}
batch_size = {batch_size}
  [[datasets.subsets]]
  jsonl_file = "{llm_data['chat']}"
  messages_column = "messages"
  {extra}
  [[datasets.subsets]]
  jsonl_file = "{llm_data['instruct']}"
  prompt_column = "prompt"
  response_column = "response"
""")
    return family.build_data(DataRequest(str(tmp_path / "data.toml"), DatasetDefaults(), 0, "error", 1, 0, 0, False))


def _randomise(network, seed: int = 0) -> None:
    """Give every adapter a visible effect (a new LoRA is the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in network.all_loras():
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * 0.05)
            if hasattr(m, "magnitude"):
                m.magnitude.mul_(1 + 0.1 * torch.randn(m.magnitude.shape, generator=g))


IDS = torch.tensor([[0, 5, 9, 40, 77, 120, 3, 200, 11, 60], [0, 250, 17, 33, 99, 4, 150, 7, 8, 300]])


def test_loss_goes_down_and_only_the_adapter_changes(llm_dir, llm_data, tmp_path):
    family = _family(llm_dir)
    data = _data(family, tmp_path, llm_data, packing=True, batch_size=2)
    before = {k: v.clone() for k, v in family.model.state_dict().items()}
    network = lora.create_network(1.0, 8, 8.0, None, None, family.model)
    network.apply_to(None, family.model)
    params, _ = network.prepare_optimizer_params(None, None, 2e-2)
    optimizer = torch.optim.AdamW(params, lr=2e-2)
    epoch_losses = []
    for epoch in range(6):
        data.sampler.set_epoch(epoch)
        losses = []
        for batch in data.loader:
            loss = family.loss(batch, epoch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        epoch_losses.append(sum(losses) / len(losses))
    assert epoch_losses[-1] < epoch_losses[0] - 0.4, epoch_losses
    after = family.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the base model must stay frozen"


def test_packed_loss_equals_unpacked_loss(llm_dir, llm_data, tmp_path):
    family = _family(llm_dir)
    packed = _data(family, tmp_path, llm_data, packing=True, batch_size=1)
    unpacked = _data(family, tmp_path, llm_data, packing=False, batch_size=1)
    assert len(packed.datasets[0].sequences) < len(unpacked.datasets[0].sequences)  # something was packed
    # every sequence in one batch (through the loader's own dataset and collate), so both losses average
    # over exactly the same label tokens
    p, u = (data.loader.collate_fn([data.loader.dataset[(0, i)] for i in range(len(data.loader.dataset))])
            for data in (packed, unpacked))
    assert int((p["labels"] != -100).sum()) == int((u["labels"] != -100).sum())
    with torch.no_grad():
        loss_packed, loss_unpacked = family.loss(p, 0), family.loss(u, 0)
        # Control: the same packed rows with positions running on attend across samples and change the loss.
        leaky = dict(p, position_ids=torch.arange(p["input_ids"].shape[1]).expand_as(p["input_ids"]))
        loss_leaky = family.loss(leaky, 0)
    assert abs(loss_packed.item() - loss_unpacked.item()) < 1e-5
    assert abs(loss_leaky.item() - loss_unpacked.item()) > 1e-3
    assert family.packing_is_isolated()


def test_llm_defaults_target_every_linear_of_attention_and_mlp(llm_dir):
    family = LLMFamily(_base(llm_dir), None, str(llm_dir))
    assert family.network_defaults == {"network_dim": 16, "network_alpha": 16.0}
    network = lora.create_network(1.0, 16, 16.0, *family.network_inputs())
    names = {m.lora_name for m in network.unet_loras}
    assert names == {f"lora_unet_model_layers_{i}_{part}_{p}" for i in range(2) for p in PROJ
                     for part in (["self_attn"] if p in ("q_proj", "k_proj", "v_proj", "o_proj") else ["mlp"])}
    with_head = lora.create_network(1.0, 4, 4.0, None, None, _base(llm_dir), target_modules="lm_head,q_proj")
    assert {m.lora_name for m in with_head.unet_loras} == {
        "lora_unet_lm_head", "lora_unet_model_layers_0_self_attn_q_proj", "lora_unet_model_layers_1_self_attn_q_proj"}
    # the message lists this model's own Linear names (a Phi-3 user sees qkv_proj, not q_proj)
    with pytest.raises(UserError, match="target_modules=qproj matched no Linear .* named down_proj,gate_proj,"
                                        "k_proj,o_proj,q_proj,up_proj,v_proj"):
        lora.create_network(1.0, 4, 4.0, None, None, _base(llm_dir), target_modules="qproj")
    # one misspelt name among good ones is an error too, not a LoRA silently without that layer
    with pytest.raises(UserError, match=r"target_modules=q_proj,v_prj: v_prj matched no Linear .* named down_proj"):
        lora.create_network(1.0, 4, 4.0, None, None, _base(llm_dir), target_modules="q_proj,v_prj")
    # a name that matches a module which is not a Linear layer (the attention block) adapts nothing either
    with pytest.raises(UserError, match="self_attn matched no Linear"):
        lora.create_network(1.0, 4, 4.0, None, None, _base(llm_dir), target_modules="q_proj,self_attn")
    # the file decides the modules with --dim_from_weights: a name the weights lack says so
    weights = {k: v for k, v in lora.create_network(1.0, 4, 4.0, None, None, _base(llm_dir),
                                                    target_modules="q_proj").state_dict().items()}
    with pytest.raises(UserError, match="the weights have no module for k_proj"):
        lora.create_network_from_weights(1.0, None, None, None, _base(llm_dir), weights, target_modules="q_proj,k_proj")



def test_lm_head_lora_on_tied_embeddings_is_warned_about(llm_dir, caplog):
    model = _base(llm_dir)
    with caplog.at_level("WARNING", logger="networks.lora"):
        lora.create_network(1.0, 4, 4.0, None, None, model, target_modules="lm_head")
    assert not caplog.records  # this tiny model has its own lm_head weight
    model.lm_head.weight = model.get_input_embeddings().weight  # what tie_word_embeddings does
    with caplog.at_level("WARNING", logger="networks.lora"):
        lora.create_network(1.0, 4, 4.0, None, None, model, target_modules="lm_head,q_proj")
    assert [r.getMessage().split(" ")[0] for r in caplog.records] == ["lm_head"]
    assert "input embeddings" in caplog.records[0].getMessage()

VARIANTS = {
    "lora": {},
    "rslora": {"use_rslora": "true"},
    "dora": {"use_dora": "true"},
    "dora+rslora+targets": {"use_dora": "true", "use_rslora": "true", "target_modules": "q_proj,v_proj,down_proj"},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_adapter_folder_loads_in_peft_with_identical_logits(llm_dir, tmp_path, variant):
    from peft import PeftModel
    from safetensors import safe_open

    args = VARIANTS[variant]
    model = _base(llm_dir)
    network = lora.create_network(1.0, 4, 8.0, None, None, model, **args)
    network.apply_to(None, model)
    _randomise(network)
    network.eval()
    with torch.no_grad():
        ours = model(IDS).logits
    family = LLMFamily(model, None, str(llm_dir))
    folder = family.save_network(network, tmp_path / "adapter.safetensors", None, {"ss_network_dim": "4"})
    assert folder == tmp_path / "adapter" and (tmp_path / "adapter.safetensors").is_file()

    config = json.loads((folder / "adapter_config.json").read_text())
    expected_targets = sorted(args["target_modules"].split(",")) if "target_modules" in args else PROJ
    assert (config["r"], config["lora_alpha"], config["task_type"]) == (4, 8, "CAUSAL_LM")
    assert config["target_modules"] == expected_targets
    assert config["use_rslora"] == ("use_rslora" in args) and config["use_dora"] == ("use_dora" in args)
    assert config["base_model_name_or_path"] == str(llm_dir)

    peft_model = PeftModel.from_pretrained(_base(llm_dir), str(folder)).eval()
    with torch.no_grad():
        theirs = peft_model(IDS).logits
        plain = _base(llm_dir)(IDS).logits
    assert (ours - plain).abs().max() > 1e-3, "the adapter must change the output for the test to mean anything"
    assert torch.allclose(theirs, ours, atol=1e-5), (theirs - ours).abs().max()

    # The kohya-style file holds the same adapter, and the PEFT folder converts back to it.
    with safe_open(str(tmp_path / "adapter.safetensors"), "pt") as f:
        assert f.metadata()["ss_network_dim"] == "4"
    reloaded, weights = lora.create_network_from_weights(1.0, str(tmp_path / "adapter.safetensors"), None, None,
                                                         _base(llm_dir))
    converted = peft_to_kohya(*read_peft_adapter(folder))
    assert converted.keys() == weights.keys() == reloaded.state_dict().keys()
    for key, value in weights.items():
        assert torch.allclose(converted[key].float(), value.float(), rtol=1e-6), key


@pytest.mark.parametrize("variant", ["rslora", "dora"])
def test_kohya_file_reloads_with_the_same_logits(llm_dir, tmp_path, variant):
    model = _base(llm_dir)
    network = lora.create_network(1.0, 4, 8.0, None, None, model, **VARIANTS[variant])
    network.apply_to(None, model)
    _randomise(network, seed=1)
    network.save_weights(str(tmp_path / "k.safetensors"), None, None)
    with torch.no_grad():
        ours = model(IDS).logits
    fresh = _base(llm_dir)
    reloaded, weights = lora.create_network_from_weights(1.0, str(tmp_path / "k.safetensors"), None, None, fresh)
    reloaded.apply_to(None, fresh)
    reloaded.load_state_dict(weights)
    reloaded.eval()
    with torch.no_grad():
        assert torch.allclose(fresh(IDS).logits, ours, atol=1e-5)


def test_qlora_4bit_trains_and_saves_an_adapter_peft_loads(llm_dir, llm_data, tmp_path):
    import bitsandbytes as bnb
    from peft import PeftModel

    family = _family(llm_dir, load_in_4bit=True)
    data = _data(family, tmp_path, llm_data, packing=True, batch_size=2)
    network = lora.create_network(1.0, 4, 4.0, *family.network_inputs())
    network.apply_to(None, family.model)
    assert network.unet_loras and all(isinstance(m.org_module, bnb.nn.Linear4bit) for m in network.unet_loras)
    # (bitsandbytes' CPU kernel re-stores absmax on the first no-grad forward, so the 4-bit codes are compared)
    quantized = {k: v.clone() for k, v in family.model.state_dict().items() if k.endswith("proj.weight")}
    assert quantized and all(v.dtype == torch.uint8 for v in quantized.values()), "expected packed 4-bit weights"
    assert not any(p.requires_grad for p in family.model.parameters())
    params, _ = network.prepare_optimizer_params(None, None, 1e-2)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    data.sampler.set_epoch(0)
    for batch in list(data.loader)[:3]:
        loss = family.loss(batch, 0)
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(m.lora_up.weight.abs().sum() > 0 for m in network.unet_loras)
    state = family.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in quantized.items()), "the 4-bit base must stay frozen"

    folder = family.save_network(network, tmp_path / "qlora.safetensors", None, {})
    # bitsandbytes' CPU kernel re-stores a layer's absmax in bf16 on its first no-grad forward, which training
    # did for some layers only; so both sides start from freshly loaded 4-bit bases.
    ours_model = _family(llm_dir, load_in_4bit=True).model
    ours, weights = lora.create_network_from_weights(1.0, str(tmp_path / "qlora.safetensors"), None, None,
                                                     ours_model)
    ours.apply_to(None, ours_model)
    ours.load_state_dict(weights)
    ours.eval()
    peft_model = PeftModel.from_pretrained(_family(llm_dir, load_in_4bit=True).model, str(folder)).eval()
    with torch.no_grad():
        theirs, mine = peft_model(IDS).logits, ours_model(IDS).logits
        plain = _family(llm_dir, load_in_4bit=True).model(IDS).logits
    assert (mine - plain).abs().max() > 1e-3
    assert torch.allclose(theirs, mine, atol=1e-4), (theirs - mine).abs().max()


def test_qlora_gradients_do_not_change_after_a_no_grad_forward(llm_dir):
    # bitsandbytes would switch a CPU 4-bit layer to an inference kernel without backward on its first eval
    # no-grad forward (the packing check, a sample, validation); training must keep exact gradients.
    def grads(warm: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        family = _family(llm_dir, load_in_4bit=True)
        if warm:
            family.model.eval()
            with torch.no_grad():
                family.model(IDS)
        network = lora.create_network(1.0, 4, 4.0, *family.network_inputs())
        network.apply_to(None, family.model)
        _randomise(network)
        family.model(IDS, labels=IDS).loss.backward()
        return {m.lora_name: m.lora_down.weight.grad for m in network.unet_loras}

    cold, warm = grads(False), grads(True)
    assert cold.keys() == warm.keys()
    for name in cold:
        assert torch.allclose(cold[name], warm[name], rtol=1e-4, atol=1e-6), name


def test_8bit_base_and_dequantised_weights(llm_dir):
    from networks.lora_variants import dense_weight

    family = _family(llm_dir, load_in_8bit=True)
    reference = _base(llm_dir).model.layers[0].self_attn.q_proj.weight
    layer = family.model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "Linear8bitLt"
    assert (dense_weight(layer) - reference).abs().max() < 0.02 * reference.abs().max()
    network = lora.create_network(1.0, 4, 4.0, None, None, family.model, use_dora="true")
    network.apply_to(None, family.model)
    loss = family.model(IDS, labels=IDS).loss
    loss.backward()
    assert all(m.lora_down.weight.grad is not None for m in network.unet_loras)


def test_options_are_checked_per_family(llm_dir):
    with pytest.raises(UserError, match="--load_in_4bit is an option of causal LMs; it does not apply to "
                                        "--model_type sd"):
        load_family("sd", str(llm_dir), load_in_4bit=True)
    with pytest.raises(UserError, match="--attn_implementation is an option of causal LMs"):
        load_family("sdxl", str(llm_dir), attn_implementation="sdpa")
    with pytest.raises(UserError, match="--vae applies to diffusion models"):
        load_family("llm", str(llm_dir), vae_path="some/vae", device="cpu")
    with pytest.raises(UserError, match="exclude each other"):
        load_family("llm", str(llm_dir), load_in_4bit=True, load_in_8bit=True, device="cpu")


def test_attn_implementation_reaches_the_model(llm_dir):
    family = load_family("llm", str(llm_dir), attn_implementation="eager", device="cpu")
    assert family.model.config._attn_implementation == "eager"
    assert load_family("llm", str(llm_dir), device="cpu").model.config._attn_implementation == "sdpa"
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:  # the CPU machines: a named error, not a traceback
        with pytest.raises(UserError, match="--attn_implementation flash_attention_2"):
            load_family("llm", str(llm_dir), attn_implementation="flash_attention_2", device="cpu")
