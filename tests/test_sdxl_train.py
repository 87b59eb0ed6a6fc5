"""SDXL training: `accelerate launch sdxl_train_network.py` end to end, --model_type auto,
--cache_text_encoder_outputs, the size conditioning and the errors a user can hit."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_sdxl_lora import merge_into, module_table, tiny_sdxl, unet_and_text_outputs

import sdxl_train_network
import train_network
from library.dataset_config import DatasetDefaults
from library.errors import UserError
from library.families import DataRequest, detect_model_type, load_family
from library.families.diffusion import NoiseSettings
from library.families.sdxl import size_conditioning

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_sdxl(tmp_path_factory)


def data_toml(path: Path, images: Path, extra: str = "", steps: int = 32) -> Path:
    """64-px images in 32-px bucket steps, batch 2."""
    path.write_text(f"[general]\nenable_bucket = true\nmin_bucket_reso = 32\nmax_bucket_reso = 128\n"
                    f"bucket_reso_steps = {steps}\n{extra}\n[[datasets]]\nresolution = 64\nbatch_size = 2\n"
                    f"  [[datasets.subsets]]\n  image_dir = \"{images}\"\n")
    return path


# --- end to end through accelerate launch ----------------------------------------------------


@pytest.fixture(scope="module")
def launched(tmp_path_factory, model_dir, tiny_images):
    work = tmp_path_factory.mktemp("sdxl-e2e")
    (work / "train.toml").write_text(f"""
[model]
pretrained_model_name_or_path = "{model_dir}"
[network]
network_dim = 4
network_alpha = 2.0
[optimisation]
learning_rate = 1e-2
max_train_steps = 4
seed = 5
[saving]
output_dir = "{work / 'out'}"
output_name = "xl"
""")
    data = data_toml(work / "data.toml", tiny_images)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="2", PYTHONPATH=str(ROOT))
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--quiet", str(ROOT / "sdxl_train_network.py"),
           "--config_file", str(work / "train.toml"), "--dataset_config", str(data)]
    result = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return work / "out" / "xl.safetensors"


def test_launched_run_writes_an_sdxl_file(launched):
    with safe_open(str(launched), "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"  # as sd-scripts
    assert meta["modelspec.prediction_type"] == "epsilon" and meta["ss_steps"] == "4"
    names = {k.split(".")[0] for k in load_file(str(launched))}
    assert {n.split("_")[1] for n in names} == {"unet", "te1", "te2"}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_middle_block_1_transformer_blocks_1_attn2_to_v" in names
    assert "lora_unet_output_blocks_2_1_proj_out" in names


def test_launched_output_loads_in_diffusers_as_merged(launched, model_dir):
    from diffusers import StableDiffusionXLPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer

    sd = load_file(str(launched))
    names = {k.split(".")[0] for k in sd}
    # Training moved every module that reaches the output. SDXL reads text encoder 1's penultimate
    # layer, so the LoRAs of its last layer (layer 1 of 2 here) get no gradient, as in sd-scripts.
    still_zero = {n for n in names if sd[f"{n}.lora_up.weight"].abs().sum() == 0}
    assert still_zero and all(n.startswith("lora_te1_text_model_encoder_layers_1_") for n in still_zero)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(model_dir))
    assert names <= set(module_table(pipe))
    reference = copy.deepcopy(pipe)
    merge_into(reference, sd)
    pipe.load_lora_weights(str(launched.parent), weight_name=launched.name)
    wrapped = sum(isinstance(m, BaseTunerLayer) for model in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
                  for m in model.modules())
    assert wrapped == len(names)
    for got, want in zip(unet_and_text_outputs(pipe), unet_and_text_outputs(reference), strict=True):
        assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


# --- in process: auto detection and the text encoder cache -----------------------------------


def _train(model: Path, data: Path, out: Path, *extra: str) -> int:
    return train_network.main(["--pretrained_model_name_or_path", str(model), "--dataset_config", str(data),
                               "--output_dir", str(out), "--output_name", "xl", "--max_train_steps", "2",
                               "--learning_rate", "1e-2", "--seed", "9", "--network_train_unet_only", *extra])


def _losses(out: Path) -> list[float]:
    rows = (out / "xl_loss.csv").read_text().strip().splitlines()[1:]
    return [float(r.split(",")[1]) for r in rows]


def _validation_loss(output: str) -> float:
    match = re.search(r"validation loss at step 2: ([0-9.]+)", output)
    assert match, output[-2000:]
    return float(match.group(1))


def test_auto_detects_sdxl_and_cached_text_gives_the_same_loss(tmp_path, model_dir, tiny_images, monkeypatch,
                                                                capsys):
    import library.families.sdxl as sdxl

    lookups = []
    original = sdxl.cached_text_outputs
    monkeypatch.setattr(sdxl, "cached_text_outputs", lambda *a: lookups.append(a[1]) or original(*a))
    assert detect_model_type(model_dir) == "sdxl"
    # 2 of the 8 images held out; every caption is different, so theirs must be cached for validation
    images = tmp_path / "images"
    shutil.copytree(tiny_images, images)
    for i, caption in enumerate(sorted(images.glob("*.caption"))):
        caption.write_text(f"sks picture {i}")
    data = data_toml(tmp_path / "data.toml", images, "validation_split = 0.25")
    assert _train(model_dir, data, tmp_path / "plain", "--validate_every_n_steps", "2") == 0
    plain_validation = _validation_loss(capsys.readouterr().out)
    assert lookups == []
    assert _train(model_dir, data, tmp_path / "cached", "--validate_every_n_steps", "2",
                  "--cache_text_encoder_outputs") == 0
    assert len(lookups) == 3  # both steps and the validation batch took their text from the cache
    assert _validation_loss(capsys.readouterr().out) == pytest.approx(plain_validation, rel=1e-5)
    plain, cached = _losses(tmp_path / "plain"), _losses(tmp_path / "cached")
    assert len(plain) == 2
    assert cached == pytest.approx(plain, rel=1e-5, abs=1e-6)
    with safe_open(str(tmp_path / "cached" / "xl.safetensors"), "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"  # auto picked the SDXL family
        assert all(k.startswith("lora_unet_") for k in f.keys())


def test_alias_refuses_another_model_type(capsys):
    assert sdxl_train_network.main(["--model_type", "sd"]) == 2
    assert "sdxl_train_network.py trains SDXL" in capsys.readouterr().err


# --- the family directly: conditioning and refusals --------------------------------------------


@pytest.fixture(scope="module")
def family(model_dir):
    fam = load_family("sdxl", str(model_dir), noise=NoiseSettings(), seed=0)
    fam.prepare(torch.device("cpu"), torch.float32, False, False)
    return fam


def _request(data: Path, **kw) -> DataRequest:
    return DataRequest(dataset_config=str(data), defaults=DatasetDefaults(), seed=0, on_bad_image="error",
                       num_processes=1, rank=0, num_workers=0, persistent_workers=False, **kw)


def test_size_conditioning_rows_are_h_w_top_left_target():
    ids = size_conditioning([(96, 64), (64, 64)], [(0, 16), (0, 0)], (64, 64))
    assert ids.tolist() == [[64, 96, 0, 16, 64, 64], [64, 64, 0, 0, 64, 64]]


def test_loss_depends_on_the_size_conditioning(family):
    batch = {"images": torch.zeros(1, 3, 64, 64), "captions": ["sks red square"], "indices": torch.tensor([0]),
             "is_reg": torch.tensor([False]), "original_sizes": [(64, 64)], "crop_top_lefts": [(0, 0)]}
    with torch.no_grad():
        same = family.loss(batch, 0)
        other = family.loss({**batch, "original_sizes": [(1024, 512)], "crop_top_lefts": [(128, 0)]}, 0)
    assert torch.isfinite(same) and not torch.isclose(same, other)


@pytest.mark.parametrize("extra, steps, message", [
    ("", 48, "multiples of 32"),
    ("shuffle_caption = true", 32, "shuffle_caption changes the captions"),
    ("caption_dropout_rate = 0.1", 32, "caption_dropout_rate changes the captions"),
    ("enable_wildcard = true", 32, "enable_wildcard changes the captions"),
])
def test_bad_dataset_settings_are_refused(family, tmp_path, tiny_images, extra, steps, message):
    data = data_toml(tmp_path / "data.toml", tiny_images, extra, steps)
    with pytest.raises(UserError, match=message):
        family.build_data(_request(data, cache_text_encoder_outputs=True))


@pytest.mark.parametrize("steps, extra, message", [
    (32, ["--cache_text_encoder_outputs"], "--network_train_unet_only"),
    (48, [], "multiples of 32"),
])
def test_sdxl_only_problems_stop_the_run_before_the_model_loads(tmp_path, model_dir, tiny_images, capsys,
                                                                 monkeypatch, steps, extra, message):
    import library.families

    monkeypatch.setattr(library.families, "load_family", lambda *a, **k: pytest.fail("the model was loaded"))
    data = data_toml(tmp_path / "data.toml", tiny_images, "", steps)
    argv = ["--pretrained_model_name_or_path", str(model_dir), "--dataset_config", str(data),
            "--output_dir", str(tmp_path / "out"), *extra]
    assert train_network.main(argv) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_sample_pipeline_sees_the_network(family):
    from library.sample_prompts import SamplePrompt
    from library.sampling import generate_image
    from networks.lora import create_network

    prompt = SamplePrompt("sks red square", width=64, height=64, sample_steps=1, sample_sampler="euler")

    def sample() -> torch.Tensor:
        pipe = family.sample_pipeline()
        with torch.no_grad():
            return torch.tensor(list(generate_image(pipe, prompt, 1, pipe.scheduler.config).getdata()))

    network = create_network(1.0, 4, 4.0, family.vae, family.text_encoders(), family.unet)
    network.apply_to(family.text_encoders(), family.unet, True, True)
    try:
        with torch.no_grad():
            for lora in network.all_loras():
                lora.lora_up.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
        trained = sample()
        network.set_multiplier(0.0)
        base = sample()
    finally:
        network.set_multiplier(0.0)  # the module-scoped family stays the base model for any later test
    assert (trained - base).abs().float().mean() > 1.0, "the pipeline did not see the LoRA"



@pytest.mark.parametrize("negative", ["", "blurry"])
def test_sample_embeds_match_the_pipelines_own_encoding_of_a_short_prompt(family, negative):
    """The embeddings training computes (penultimate layers, encoder 2's pooled output, zeros for an empty
    negative prompt) are the ones the SDXL pipeline would compute itself: the images are the same."""
    from library.sample_prompts import SamplePrompt
    from library.sampling import generate_image

    prompt = SamplePrompt("sks red square", negative, width=64, height=64, sample_steps=1, sample_sampler="euler")
    with torch.no_grad():
        embeds = family.sample_embeds(prompt.prompt, prompt.negative_prompt)
        images = [torch.tensor(list(generate_image(pipe, prompt, 1, pipe.scheduler.config, e).getdata())).float()
                  for pipe, e in ((family.sample_pipeline(), embeds), (family.sample_pipeline(), None))]
    assert embeds["prompt_embeds"].shape == (1, 77, 64) and embeds["pooled_prompt_embeds"].shape == (1, 32)
    assert bool(embeds["negative_pooled_prompt_embeds"].any()) == bool(negative)
    assert (images[0] - images[1]).abs().max() <= 1  # equal up to rounding to 8-bit pixels

def test_cached_latents_and_text_park_the_vae_and_encoders_until_sampling(tmp_path, model_dir, tiny_images,
                                                                          monkeypatch):
    from library.sampling import on_device

    fam = load_family("sdxl", str(model_dir), noise=NoiseSettings(), seed=0)
    fam.prepare(torch.device("cpu"), torch.float32, False, False)
    moves: list[tuple[str, str]] = []

    def spy(name: str, real):
        def to(*args, **kwargs):
            moves.append((name, str(args[0])))
            return real(*args, **kwargs)
        return to

    for name, module in (("vae", fam.vae), ("te1", fam.text_encoder), ("te2", fam.text_encoder_2)):
        monkeypatch.setattr(module, "to", spy(name, module.to))
    data = data_toml(tmp_path / "data.toml", tiny_images)
    fam.build_data(_request(data, cache_latents=True, cache_text_encoder_outputs=True))
    assert {("vae", "cpu"), ("te1", "cpu"), ("te2", "cpu")} <= set(moves)  # nothing left on the accelerator
    # without a parameter on another device (here everything is on the CPU), sampling moves nothing
    moves.clear()
    with on_device([fam.vae, fam.unet], torch.device("cpu")):
        pass
    assert moves == []


def test_on_device_brings_parked_modules_for_sampling_and_back():
    from library.sampling import on_device

    parked = torch.nn.Linear(2, 2, device="meta")
    here = torch.nn.Linear(2, 2)
    calls: list[str] = []
    parked.to = lambda device: calls.append(str(device))  # meta tensors cannot really move
    here.to = lambda device: calls.append("here moved")
    with on_device([parked, here], torch.device("cpu")):
        assert calls == ["cpu"]
    assert calls == ["cpu", "meta"]


def test_one_text_encoder_learning_rate_per_encoder(tmp_path, model_dir, tiny_images):
    from safetensors import safe_open
    from safetensors.torch import load_file

    data = data_toml(tmp_path / "data.toml", tiny_images)
    out = tmp_path / "out"
    argv = ["--pretrained_model_name_or_path", str(model_dir), "--dataset_config", str(data), "--output_dir",
            str(out), "--output_name", "xl", "--max_train_steps", "1", "--learning_rate", "1e-2", "--seed", "9",
            "--text_encoder_lr", "0", "1e-2", "--optimizer_type", "SGD"]
    assert train_network.main(argv) == 0
    weights = load_file(str(out / "xl.safetensors"))
    moved = {prefix: any(v.abs().sum() > 0 for k, v in weights.items() if k.startswith(prefix) and "lora_up" in k)
             for prefix in ("lora_te1_", "lora_te2_")}
    assert moved == {"lora_te1_": False, "lora_te2_": True}  # encoder 1 frozen at 0, encoder 2 trained
    assert safe_open(str(out / "xl.safetensors"), "pt").metadata()["ss_text_encoder_lr"] == "[0.0, 0.01]"


def test_clip_skip_1_is_ignored_with_a_warning_and_others_refused(model_dir, caplog):
    # The kohya_ss GUI writes clip_skip = 1 (its slider's default) for SDXL runs too; sd-scripts ignores it there.
    family = load_family("sdxl", str(model_dir), noise=NoiseSettings(), seed=0, clip_skip=1)
    assert family is not None and "--clip_skip 1 is ignored for SDXL" in caplog.text
    with pytest.raises(UserError, match="--clip_skip 3: SDXL always uses the penultimate"):
        load_family("sdxl", str(model_dir), noise=NoiseSettings(), seed=0, clip_skip=3)
