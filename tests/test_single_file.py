"""Single-file checkpoints (original LDM/SGM layout): detection by keys, exact conversion to the
diffusers modules, training from the file, the pickle policy and damaged files.

The tiny models are written in the original layout by library.single_file.original_state_dict
and described by a config-only copy of their diffusers folder (configs and tokenizer, no
weights), given as --tokenizer_cache_dir exactly as a user describes a non-standard model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import train_network
from library import single_file as sf
from library.errors import UserError
from library.families import detect_model_type, load_family
from library.tiny_models import tiny_sd2_unet, tiny_sd_pipeline, tiny_sdxl_pipeline


def config_copy(folder: Path, target: Path) -> Path:
    """The diffusers folder without its weights: what describes a non-standard architecture."""
    for path in folder.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".txt"):
            (target / path.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target / path.relative_to(folder))
    return target


class Tiny:
    """A tiny pipeline, its diffusers folder, its config-only copy and its single-file checkpoint."""

    def __init__(self, root: Path, pipe, family: str, v2: bool = False, v_prediction: bool = False):
        self.pipe, self.family = pipe, family
        self.folder = root / "diffusers"
        pipe.save_pretrained(self.folder)
        self.configs = config_copy(self.folder, root / "configs")
        self.encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
        for module in (pipe.unet, pipe.vae, *self.encoders):
            module.eval()  # as loaded modules are (the VAE decoder differs in the last bit in train mode)
        self.file = sf.save_original(root / "model.safetensors", pipe.unet, pipe.vae, self.encoders, v2=v2,
                                     v_prediction=v_prediction)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Tiny:
    return Tiny(tmp_path_factory.mktemp("sd1"), tiny_sd_pipeline(seed=0), "sd")


@pytest.fixture(scope="module")
def tiny_xl(tmp_path_factory) -> Tiny:
    return Tiny(tmp_path_factory.mktemp("sdxl"), tiny_sdxl_pipeline(seed=0), "sdxl")


@pytest.fixture(scope="module")
def tiny_sd2(tmp_path_factory) -> Tiny:
    """SD 2.x in miniature: linear projections, an OpenCLIP-layout text encoder, the v_pred marker."""

    pipe = tiny_sd_pipeline(seed=4)
    pipe.unet = tiny_sd2_unet(seed=4)
    return Tiny(tmp_path_factory.mktemp("sd2"), pipe, "sd", v2=True, v_prediction=True)


# --- the shipped architecture configs ----------------------------------------------------------


@pytest.mark.parametrize("kind, counts, known_key", [
    (sf.SD_V1, [859_520_964, 83_653_863, 123_060_480],
     "model.diffusion_model.output_blocks.11.0.skip_connection.weight"),
    (sf.SD_V2, [865_910_724, 83_653_863, 340_387_840],
     "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight"),
    (sf.SDXL_BASE, [2_567_463_684, 83_653_863, 123_060_480, 694_659_840],
     "conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_proj.bias"),
], ids=["sd_v1", "sd_v2", "sdxl_base"])
def test_shipped_configs_are_the_real_architectures(kind, counts, known_key):
    """Parameter counts of the released models; their original key names convert back strictly."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = sf.ARCHITECTURES / kind.name
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(folder / "unet")))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(folder / "vae")))
        encoders = [(CLIPTextModelWithProjection if sub == "text_encoder_2" else CLIPTextModel)(
            CLIPTextConfig.from_pretrained(str(folder / sub))) for _, _, sub in kind.text_encoders]
    assert [sum(p.numel() for p in m.parameters()) for m in (unet, vae, *encoders)] == counts
    state = sf.original_state_dict(unet, vae, encoders, v2=kind is sf.SD_V2)
    assert known_key in state
    assert sf.detect_kind(state, state.__getitem__) is kind
    sf.load_unet(state, folder)  # strict: every parameter found, nothing left over
    for prefix, style, sub in kind.text_encoders:
        sf.load_text_encoder(state, prefix, style, folder, sub)
    assert DDPMScheduler.load_config(str(folder), subfolder="scheduler")["beta_schedule"] == "scaled_linear"


# --- detection and exact conversion ------------------------------------------------------------


def test_detects_the_family_from_the_keys(tiny_sd, tiny_xl, tiny_sd2):
    assert detect_model_type(tiny_sd.file) == "sd"
    assert detect_model_type(tiny_xl.file) == "sdxl"
    assert sf.detect_checkpoint(tiny_sd.file) is sf.SD_V1
    assert sf.detect_checkpoint(tiny_sd2.file) is sf.SD_V2
    assert sf.detect_checkpoint(tiny_xl.file) is sf.SDXL_BASE


def test_prediction_type_rule():
    """v_pred marker → v; SD 2.x: the spread of one norm bias (768-v checkpoints have std > 0.09)."""
    wide, narrow = {sf.SD2_V_PROBE: torch.linspace(-0.5, 0.5, 320)}, {sf.SD2_V_PROBE: torch.full((320,), 0.01)}
    assert sf.detect_v_prediction(sf.SD_V2, wide, wide.__getitem__)[0] is True
    assert sf.detect_v_prediction(sf.SD_V2, narrow, narrow.__getitem__)[0] is False
    assert sf.detect_v_prediction(sf.SD_V1, wide, wide.__getitem__)[0] is False  # the rule is SD 2.x only
    marked = {sf.V_PRED_MARKER: torch.tensor([])}
    assert sf.detect_v_prediction(sf.SDXL_BASE, marked, marked.__getitem__)[0] is True


def _outputs(unet, vae, encoders, sdxl: bool) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 60, (2, 77), generator=gen)
    texts = [e(ids, output_hidden_states=True) for e in encoders]
    outs = [t.hidden_states[-2] for t in texts] + [texts[0].last_hidden_state]
    context = torch.cat([t.hidden_states[-2] for t in texts], -1) if sdxl else texts[0].last_hidden_state
    extra = {"added_cond_kwargs": {"text_embeds": texts[1].text_embeds,
                                   "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}} if sdxl else {}
    latents = torch.randn(2, 4, 16, 16, generator=gen)
    outs.append(unet(latents, torch.tensor([10, 500]), context, **extra).sample)
    images = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    outs += [vae.encode(images).latent_dist.mean, vae.decode(latents).sample]
    return outs


@pytest.mark.parametrize("name", ["tiny_sd", "tiny_xl", "tiny_sd2"])
@torch.no_grad()
def test_loaded_modules_equal_the_originals(name, request):
    tiny: Tiny = request.getfixturevalue(name)
    family = load_family(tiny.family, str(tiny.file), tokenizer_path=str(tiny.configs))
    sdxl = tiny.family == "sdxl"
    loaded = family.text_encoders() if sdxl else [family.text_encoder]
    got = _outputs(family.unet, family.vae, loaded, sdxl)
    want = _outputs(tiny.pipe.unet, tiny.pipe.vae, tiny.encoders, sdxl)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w), (g - w).abs().max()
    assert family.tokenizer("a red square").input_ids == tiny.pipe.tokenizer("a red square").input_ids
    assert family.prediction_type == ("v" if name == "tiny_sd2" else "epsilon")  # the v_pred marker
    assert family.v2 == (name == "tiny_sd2")


def test_v_parameterization_flag_wins_and_pickle_loads_with_weights_only(tiny_sd, tmp_path, monkeypatch):
    family = load_family("sd", str(tiny_sd.file), tokenizer_path=str(tiny_sd.configs), v_parameterization=True)
    assert family.prediction_type == "v"
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(str(tiny_sd.file)), "global_step": 7}, ckpt)
    for call in (lambda: detect_model_type(ckpt), lambda: load_family("sd", str(ckpt), tokenizer_path=str(
            tiny_sd.configs))):
        with pytest.raises(UserError, match="--allow_pickle"):
            call()
    seen = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: seen.append(k.get("weights_only")) or real_load(*a, **k))
    assert detect_model_type(ckpt, allow_pickle=True) == "sd"
    family = load_family("sd", str(ckpt), tokenizer_path=str(tiny_sd.configs), allow_pickle=True)
    assert seen == [True, True]
    for name, p in tiny_sd.pipe.unet.state_dict().items():
        assert torch.equal(family.unet.state_dict()[name], p), name


class _RunsCode:
    """Unpickling this would call _touch: what a malicious .ckpt does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (_touch, (str(self.marker),))


def _touch(path: str) -> None:
    Path(path).write_text("code ran")


def test_pickle_with_objects_is_refused_even_with_allow_pickle(tmp_path):
    marker = tmp_path / "ran.txt"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "callback": _RunsCode(marker)}, ckpt)
    with pytest.raises(UserError, match="objects other than tensors"):
        detect_model_type(ckpt, allow_pickle=True)
    assert not marker.exists()


def test_damaged_files_are_named(tiny_sd, tmp_path):
    pointer = tmp_path / "lfs.safetensors"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123456\n")
    with pytest.raises(UserError, match="git-lfs pointer"):
        detect_model_type(pointer)
    data = tiny_sd.file.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated"):
        detect_model_type(cut)
    with pytest.raises(UserError, match="truncated"):
        load_family("sd", str(cut), tokenizer_path=str(tiny_sd.configs))
    ckpt = tmp_path / "cut.ckpt"
    torch.save({"state_dict": load_file(str(tiny_sd.file))}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:-4096])
    with pytest.raises(UserError, match="truncated"):
        detect_model_type(ckpt, allow_pickle=True)


def test_wrong_file_or_config_is_a_clear_error(tiny_sd, tiny_xl, tmp_path):
    with pytest.raises(UserError, match="--model_type sd "):
        load_family("sdxl", str(tiny_sd.file), tokenizer_path=str(tiny_sd.configs))
    # the shipped SD 1.x architecture does not fit the tiny model: the mismatch is named, not half-loaded
    with pytest.raises(UserError, match="does not fit the architecture in .*sd_v1.*missing"):
        load_family("sd", str(tiny_sd.file), tokenizer_path=str(tiny_sd.configs / "tokenizer"))
    with pytest.raises(UserError, match="does not fit the architecture"):
        load_family("sd", str(tiny_sd.file), tokenizer_path=str(tiny_sd.configs),
                    model_config_dir=str(config_copy(tiny_xl.folder, tmp_path / "xl")))
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, str(lora))
    with pytest.raises(UserError, match="LoRA/network file"):
        detect_model_type(lora)


def test_tokenizer_from_an_sd_scripts_cache_and_vae_from_a_file(tiny_sd, tmp_path, monkeypatch):
    monkeypatch.setattr(sf, "_cached_tokenizer", lambda hub_id: None)  # whatever this machine's HF cache holds
    bare = tmp_path / "bare"
    shutil.copytree(tiny_sd.configs, bare, ignore=shutil.ignore_patterns("tokenizer"))
    with pytest.raises(UserError, match="No tokenizer for the SD 1.x checkpoint.*--tokenizer_cache_dir"):
        load_family("sd", str(tiny_sd.file), model_config_dir=str(bare))
    cache = tmp_path / "cache"
    shutil.copytree(tiny_sd.configs / "tokenizer", cache / "openai_clip-vit-large-patch14")
    family = load_family("sd", str(tiny_sd.file), tokenizer_path=str(cache), model_config_dir=str(tiny_sd.configs))
    assert family.tokenizer("sks").input_ids == tiny_sd.pipe.tokenizer("sks").input_ids
    # --vae as a bare LDM-layout VAE file, next to a diffusers model folder
    state = load_file(str(tiny_sd.file))
    vae_file = tmp_path / "vae.safetensors"
    save_file({k.removeprefix(sf.VAE): v for k, v in state.items() if k.startswith(sf.VAE)}, str(vae_file))
    family = load_family("sd", str(tiny_sd.folder), vae_path=str(vae_file))
    for name, p in tiny_sd.pipe.vae.state_dict().items():
        assert torch.equal(family.vae.state_dict()[name], p), name


# --- training from the file --------------------------------------------------------------------


def _train(model: Path, out: Path, data: Path, *extra: str) -> dict[str, torch.Tensor]:
    argv = ["--pretrained_model_name_or_path", str(model), "--dataset_config", str(data), "--output_dir", str(out),
            "--output_name", "lora", "--network_dim", "4", "--learning_rate", "1e-2", "--max_train_steps", "1",
            "--seed", "3", *extra]
    assert train_network.main(argv) == 0
    return load_file(str(out / "lora.safetensors"))


@pytest.mark.parametrize("name", ["tiny_sd", "tiny_xl"])
def test_training_from_the_file_equals_training_from_the_folder(name, request, tmp_path, tiny_images):
    tiny: Tiny = request.getfixturevalue(name)
    data = tmp_path / "data.toml"
    data.write_text(f"[[datasets]]\nresolution = 32\nbatch_size = 2\n  [[datasets.subsets]]\n"
                    f"  image_dir = \"{tiny_images}\"\n  caption_extension = \".caption\"\n")
    from_folder = _train(tiny.folder, tmp_path / "a", data)
    from_file = _train(tiny.file, tmp_path / "b", data, "--tokenizer_cache_dir", str(tiny.configs))
    assert sorted(from_file) == sorted(from_folder)
    assert any(k.startswith("lora_te") for k in from_file) and any(k.startswith("lora_unet_") for k in from_file)
    for key, value in from_folder.items():
        assert torch.allclose(from_file[key], value, atol=1e-6), key
    # as sd-scripts: a model given as a file is recorded by its hashes too (A1111's legacy hash and SHA-256)
    import hashlib

    from safetensors import safe_open

    with safe_open(str(tmp_path / "b" / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    content = tiny.file.read_bytes()
    assert meta["ss_new_sd_model_hash"] == hashlib.sha256(content).hexdigest()
    assert meta["ss_sd_model_hash"] == hashlib.sha256(content[0x100000:0x110000]).hexdigest()[:8]
    with safe_open(str(tmp_path / "a" / "lora.safetensors"), "pt") as f:
        assert "ss_sd_model_hash" not in f.metadata()  # a diffusers folder has no file hash
