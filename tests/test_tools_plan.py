"""tools/plan.py: the config-only estimate is within 20% of the tensor bytes of a real training step
(SD, SDXL, a causal LM); single-file checkpoints plan like their diffusers folders, from the header alone."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from library import single_file
from library.chunked_ce import causal_lm_loss
from library.tiny_models import save_tiny_sd, save_tiny_sdxl, tiny_sd_pipeline, tiny_sdxl_pipeline
from networks import lora
from networks.lora import LoRAModule
from tools import plan


class Measured:
    """Live tensor bytes of a real step: weights, LoRA params, grads, optimizer state, saved activations."""

    def __init__(self, frozen: list[torch.nn.Module], params: list[torch.nn.Parameter]) -> None:
        self.frozen, self.params = frozen, params
        self.exclude = {p.untyped_storage().data_ptr() for m in frozen for p in m.parameters()}
        self.exclude |= {p.untyped_storage().data_ptr() for p in params}
        self.saved: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in self.exclude:
            self.saved[key] = t.untyped_storage().nbytes()
        return t

    def step(self, forward) -> int:
        optimizer = torch.optim.AdamW(self.params, lr=1e-3)
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
            loss = forward()
        activations = sum(self.saved.values())  # everything kept for backward, at its peak
        loss.backward()
        optimizer.step()
        weights = sum(p.numel() * p.element_size() for m in self.frozen for p in m.parameters())
        params = sum(p.numel() * p.element_size() for p in self.params)
        grads = sum(p.grad.numel() * p.grad.element_size() for p in self.params if p.grad is not None)
        state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                    if torch.is_tensor(v) and v.dim() > 0)  # fmt: skip
        return weights + params + grads + state + activations


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("plan") / "sd")


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    return save_tiny_sdxl(tmp_path_factory.mktemp("plan") / "sdxl")


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("plan") / "llm"
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=101)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def measure_sd(folder, batch, resolution, dim, conv_dim, train_te, mixed) -> int:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    dtype = plan.DTYPES[mixed]
    unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet").to(dtype)
    te = CLIPTextModel.from_pretrained(str(folder), subfolder="text_encoder").to(dtype)
    args = {"conv_dim": str(conv_dim), "conv_alpha": "1"} if conv_dim else {}
    network = lora.create_network(1.0, dim, 1.0, None, te, unet, **args)
    network.apply_to(te, unet, train_te, True)
    unet.requires_grad_(False)
    te.requires_grad_(False)
    w, h = resolution
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, 4, h // 2, w // 2, generator=gen).to(dtype)
    ids = torch.randint(2, 50, (batch, 77), generator=gen)

    def forward():
        with torch.autocast("cpu", dtype=dtype, enabled=mixed != "no"):
            context = te(ids).last_hidden_state
            pred = unet(latents, torch.full((batch,), 10), encoder_hidden_states=context).sample
        return pred.float().pow(2).mean()

    return Measured([unet, te], [p for p in network.parameters() if p.requires_grad]).step(forward)


def measure_sdxl(folder, batch, resolution, dim, train_te, mixed, cached_te) -> int:
    """One step of the SDXL family's own loss (library/families/sdxl.py), latents given as if cached."""
    from library.families.sdxl import SDXLFamily

    dtype = plan.DTYPES[mixed]
    family = SDXLFamily.load(str(folder))
    family.prepare(torch.device("cpu"), dtype, train_te, gradient_checkpointing=False)
    network = lora.create_network(1.0, dim, 1.0, None, family.text_encoders(), family.unet)
    network.apply_to(family.text_encoders(), family.unet, train_te, True)
    captions = ["sks red square", "a blue circle"][:batch]
    if cached_te:  # encoded once, the encoders then go to the CPU (off the accelerator)
        family.cache_text(sorted(set(captions)), batch)
    w, h = resolution
    gen = torch.Generator().manual_seed(0)
    data = {"indices": torch.arange(batch), "latents": torch.randn(batch, 4, h // 2, w // 2, generator=gen),
            "captions": captions, "original_sizes": [(w, h)] * batch, "crop_top_lefts": [(0, 0)] * batch,
            "is_reg": torch.zeros(batch, dtype=torch.bool)}  # fmt: skip

    def forward():
        with torch.autocast("cpu", dtype=dtype, enabled=mixed != "no"):
            return family.loss(data, epoch=0)

    frozen = [family.unet] if cached_te else [family.unet, *family.text_encoders()]
    return Measured(frozen, [p for p in network.parameters() if p.requires_grad]).step(forward)


def measure_llm(folder, batch, seq, dim) -> int:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="sdpa")
    model.requires_grad_(False)
    loras = [LoRAModule(n, m, 1.0, dim, dim) for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]  # fmt: skip
    for module in loras:
        module.apply_to()
    ids = torch.randint(2, 100, (batch, seq), generator=torch.Generator().manual_seed(0))
    params = [p for m in loras for p in m.parameters()]
    # what train_network.py runs: LLMFamily.loss, the chunked cross-entropy (library/chunked_ce.py)
    return Measured([model], params).step(lambda: causal_lm_loss(model, ids, None, ids))


@pytest.mark.parametrize(
    "batch,resolution,dim,conv_dim,train_te,mixed",
    [(1, (64, 64), 4, None, True, "no"), (2, (32, 32), 8, 4, False, "bf16")],
    ids=["fp32-te", "bf16-locon-unet-only"],
)
def test_sd_estimate_within_20_percent(sd_dir, batch, resolution, dim, conv_dim, train_te, mixed):
    measured = measure_sd(sd_dir, batch, resolution, dim, conv_dim, train_te, mixed)
    est = plan.estimate(
        plan.PlanInput(
            str(sd_dir),
            batch,
            resolution,
            network_dim=dim,
            conv_dim=conv_dim,
            mixed_precision=mixed,
            train_text_encoder=train_te,
            cache_latents=True,
        )
    )
    assert abs(est.total / measured - 1) < 0.2, (est, measured)


@pytest.mark.parametrize(
    "batch,resolution,dim,train_te,mixed,cached_te",
    [(1, (64, 64), 4, True, "no", False), (2, (64, 32), 8, False, "bf16", True)],
    ids=["fp32-te", "bf16-unet-only-cached-te"],
)
def test_sdxl_estimate_within_20_percent(sdxl_dir, batch, resolution, dim, train_te, mixed, cached_te):
    measured = measure_sdxl(sdxl_dir, batch, resolution, dim, train_te, mixed, cached_te)
    est = plan.estimate(plan.PlanInput(str(sdxl_dir), batch, resolution, network_dim=dim, mixed_precision=mixed,
                                       train_text_encoder=train_te, cache_latents=True,
                                       cache_text_encoder_outputs=cached_te))  # fmt: skip
    assert abs(est.total / measured - 1) < 0.2, (est, measured)


def test_sdxl_text_encoder_switches(sdxl_dir, capsys):
    """Unet-only drops the encoders' LoRA; cached outputs also drop their weights; SD 1.x refuses the cache."""
    base = plan.PlanInput(str(sdxl_dir), resolution=(64, 64), cache_latents=True)
    full = plan.estimate(base)
    unet_only = plan.estimate(replace(base, train_text_encoder=False))
    cached = plan.estimate(replace(base, train_text_encoder=False, cache_text_encoder_outputs=True))
    assert unet_only.lora_param_count < full.lora_param_count and unet_only.activations < full.activations
    assert cached.lora_param_count == unet_only.lora_param_count and cached.weights < unet_only.weights
    args = ["--pretrained_model_name_or_path", str(sdxl_dir), "--resolution", "64", "--cache_text_encoder_outputs"]
    assert plan.main(args) == 2 and "--network_train_unet_only" in capsys.readouterr().err
    assert plan.main([*args[:4], "--resolution", "48"]) == 2 and "multiples of 32" in capsys.readouterr().err


def test_llm_estimate_within_20_percent(llm_dir):
    measured = measure_llm(llm_dir, batch=2, seq=48, dim=8)
    est = plan.estimate(plan.PlanInput(str(llm_dir), batch_size=2, seq_len=48, network_dim=8))
    assert abs(est.total / measured - 1) < 0.2, (est, measured)


def test_suggestions_reduce_memory_and_json(sd_dir, capsys):
    args = ["--pretrained_model_name_or_path", str(sd_dir), "--resolution", "128", "--train_batch_size", "4"]
    assert plan.main([*args, "--json"]) == 0
    base = json.loads(capsys.readouterr().out)["estimate"]["total"]
    assert plan.main([*args, "--json", "--gradient_checkpointing"]) == 0
    assert json.loads(capsys.readouterr().out)["estimate"]["activations"] < 0.7 * base
    assert plan.main([*args, "--vram", str(base / 2**30 * 0.6)]) == 0
    out = capsys.readouterr().out
    assert "fits in" in out and ": no" in out and "+ --gradient_checkpointing" in out


class Tiny:
    """A tiny pipeline as a diffusers folder, a config-only copy of it and a single-file checkpoint."""

    def __init__(self, root, pipe, encoders) -> None:
        self.folder = root / "diffusers"
        pipe.save_pretrained(self.folder)
        self.configs = root / "configs"  # what describes a non-standard architecture (tests/test_single_file.py)
        shutil.copytree(self.folder, self.configs, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
        self.file = single_file.save_original(root / "model.safetensors", pipe.unet, pipe.vae, encoders)


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def tiny_file(request, tmp_path_factory) -> Tiny:
    root = tmp_path_factory.mktemp(f"plan_{request.param}_file")
    if request.param == "sd":
        pipe = tiny_sd_pipeline()
        return Tiny(root, pipe, [pipe.text_encoder])
    pipe = tiny_sdxl_pipeline()
    return Tiny(root, pipe, [pipe.text_encoder, pipe.text_encoder_2])


class HeaderOnly:
    """safetensors.safe_open that hands out keys and shapes but never a tensor."""

    real = None

    def __init__(self, *args, **kwargs) -> None:
        self.handle = HeaderOnly.real(*args, **kwargs)

    def __enter__(self):
        self.file = self.handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)

    def keys(self):
        return self.file.keys()

    def get_slice(self, key):
        shape = self.file.get_slice(key).get_shape()
        return SimpleNamespace(get_shape=lambda: shape)

    def get_tensor(self, key):
        raise AssertionError(f"plan read the tensor {key}")


def test_single_file_plans_like_its_folder(tiny_file, monkeypatch, capsys):
    import safetensors

    settings = {"batch_size": 2, "resolution": (64, 64), "network_dim": 8, "gradient_checkpointing": True}
    from_folder = plan.estimate(plan.PlanInput(str(tiny_file.folder), **settings))
    monkeypatch.setattr(HeaderOnly, "real", safetensors.safe_open)
    monkeypatch.setattr(safetensors, "safe_open", HeaderOnly)
    monkeypatch.setattr(single_file, "read_checkpoint", lambda *a, **k: pytest.fail("plan loaded the checkpoint"))
    from_file = plan.estimate(plan.PlanInput(str(tiny_file.file), model_config_dir=str(tiny_file.configs),
                                             **settings))  # fmt: skip
    assert abs(from_file.total / from_folder.total - 1) < 0.02 and from_file == from_folder
    # the shipped full-size configs do not describe the tiny file: a clear error naming both ways out
    assert plan.main(["--pretrained_model_name_or_path", str(tiny_file.file), "--resolution", "64"]) == 2
    err = capsys.readouterr().err
    assert str(tiny_file.file) in err and "--model_config_dir" in err and "configs/architectures" in err
    args = ["--pretrained_model_name_or_path", str(tiny_file.file), "--resolution", "64", "--json"]
    assert plan.main([*args, "--tokenizer_cache_dir", str(tiny_file.configs)]) == 0  # as train_network.py reads it
    out = json.loads(capsys.readouterr().out)
    assert out["model"]["single_file"] == str(tiny_file.file) and out["model"]["configs"] == str(tiny_file.configs)


def test_pickle_checkpoint_needs_allow_pickle(tiny_file, tmp_path, capsys):
    from safetensors.torch import load_file

    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(str(tiny_file.file))}, ckpt)
    args = ["--pretrained_model_name_or_path", str(ckpt), "--model_config_dir", str(tiny_file.configs), "--json"]
    assert plan.main(args) == 2
    err = capsys.readouterr().err
    assert str(ckpt) in err and "--allow_pickle" in err
    assert plan.main([*args, "--allow_pickle"]) == 0
    from_ckpt = json.loads(capsys.readouterr().out)["estimate"]
    assert plan.main([*args[:1], str(tiny_file.folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["estimate"] == from_ckpt


@pytest.mark.parametrize("name,content,expected", [
    ("missing.safetensors", None, "does not exist"),
    ("notes.txt", b"hello", "is not a model"),
    ("broken.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ", "not a valid safetensors"),
    ("lora.safetensors", "lora", "LoRA/network file"),
    ("empty_folder", "folder", "is not a model folder"),
])  # fmt: skip
def test_bad_model_path_is_a_clear_error(tmp_path, capsys, name, content, expected):
    from safetensors.torch import save_file

    path = tmp_path / name
    if content == "lora":
        save_file({"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(4, 8)}, str(path))
    elif content == "folder":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    assert plan.main(["--pretrained_model_name_or_path", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and expected in err, err


def test_llm_suggestions_list_only_switches_that_save_memory(llm_dir):
    est = plan.estimate(plan.PlanInput(str(llm_dir), batch_size=4, seq_len=64, network_dim=8))
    tips = plan.suggestions(plan.PlanInput(str(llm_dir), batch_size=4, seq_len=64, network_dim=8),
                            est.total / 2**30 * 0.1, family="llm")
    labels = [label for label, _ in tips]
    assert labels and "--cache_latents" not in labels and "--network_train_unet_only" not in labels
    totals = [e.total for _, e in tips]
    assert totals == sorted(totals, reverse=True) and totals[0] < est.total


def test_llm_default_rank_is_the_trainers(llm_dir, capsys):
    from library.families.llm import NETWORK_DEFAULTS

    args = ["--pretrained_model_name_or_path", str(llm_dir), "--max_seq_length", "32", "--json"]
    assert plan.main(args) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["input"]["network_dim"] == NETWORK_DEFAULTS["network_dim"] == 16
    expected = plan.estimate(plan.PlanInput(str(llm_dir), seq_len=32, network_dim=16)).lora_param_count
    assert info["estimate"]["lora_param_count"] == expected
    assert plan.main([*args, "--network_dim", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["input"]["network_dim"] == 4


def _plan_json(capsys, argv: list[str]) -> dict:
    assert plan.main([*argv, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_a_training_config_plans_as_it_trains(sd_dir, tmp_path, capsys):
    """plan.py takes train_network.py's own command line: --config_file, --network_args conv_dim, the dataset TOML's
    batch size and resolution (of its largest dataset), and keys that do not change memory."""
    images = tmp_path / "img"
    images.mkdir()
    data = tmp_path / "data.toml"
    data.write_text(f'[general]\nresolution = 64\n\n[[datasets]]\nbatch_size = 1\n[[datasets.subsets]]\n'
                    f'image_dir = "{images}"\n\n[[datasets]]\nbatch_size = 3\nresolution = 128\n'
                    f'[[datasets.subsets]]\nimage_dir = "{images}"\n', encoding="utf-8")  # fmt: skip
    train = tmp_path / "train.toml"
    train.write_text(f'pretrained_model_name_or_path = "{sd_dir}"\noutput_dir = "{tmp_path / "out"}"\n'
                     f'learning_rate = 1e-4\nnetwork_dim = 8\nnetwork_args = ["conv_dim=4"]\n'
                     f'dataset_config = "{data}"\nuse_8bit_adam = true\n', encoding="utf-8")  # fmt: skip
    info = _plan_json(capsys, ["--config_file", str(train)])
    expected = plan.PlanInput(str(sd_dir), batch_size=3, resolution=(128, 128), network_dim=8, conv_dim=4,
                              optimizer="AdamW8bit")  # fmt: skip
    assert plan.estimate(expected) == plan.Estimate(**{k: v for k, v in info["estimate"].items() if k != "total"})
    assert info["input"]["batch_size"] == 3 and info["input"]["resolution"] == [128, 128]
    assert info["input"]["conv_dim"] == 4 and info["input"]["optimizer"] == "AdamW8bit"
    assert plan.main(["--config_file", str(train)]) == 0
    assert f"batch and size from {data} datasets[1]: batch 3 at 128x128" in capsys.readouterr().out
    # the command line beats the config file, as in training
    assert _plan_json(capsys, ["--config_file", str(train), "--network_dim", "2"])["input"]["network_dim"] == 2
    assert plan.main(["--config_file", str(train), "--conv_dim", "2"]) == 2
    assert "--network_args conv_dim=4 disagree" in capsys.readouterr().err
    assert plan.main(["--resolution", "64"]) == 2
    assert "--pretrained_model_name_or_path is required" in capsys.readouterr().err


def test_llm_plan_reads_max_seq_length_from_its_dataset_toml(llm_dir, tmp_path, capsys):
    (tmp_path / "rows.jsonl").write_text('{"text": "hello"}\n', encoding="utf-8")
    data = tmp_path / "llm.toml"
    data.write_text('[general]\nmax_seq_length = 40\n\n[[datasets]]\nbatch_size = 2\n[[datasets.subsets]]\n'
                    f'jsonl_file = "{tmp_path / "rows.jsonl"}"\n', encoding="utf-8")  # fmt: skip
    info = _plan_json(capsys, ["--pretrained_model_name_or_path", str(llm_dir), "--dataset_config", str(data)])
    assert info["input"]["seq_len"] == 40 and info["input"]["batch_size"] == 2
    # without one, the trainer's default length: min(2048, the model's positions)
    info = _plan_json(capsys, ["--pretrained_model_name_or_path", str(llm_dir)])
    assert info["input"]["seq_len"] == 2048  # LlamaConfig's 2048 positions
