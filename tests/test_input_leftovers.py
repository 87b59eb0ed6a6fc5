"""Inputs that used to pass unchecked or with a misleading message: SD image sides, --resolution before the
model loads, an LLM dataset TOML given to a diffusion model, tools/plan.py --vram, tools/extract.py's SD 2.x."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import train_network
from library.arg_checks import check_combinations, check_sd_sides
from library.args import build_parser
from library.dataset_config import DatasetConfig, DatasetDefaults, DatasetGroupConfig, SubsetConfig, load_dataset_config
from library.diffusion_models import DiffusionModels
from library.errors import UserError
from library.single_file import ARCHITECTURES

# --- SD 1.x/2.x image sides (the released SD 1.5 UNet config: 8 px per latent, 3 downsamplings, native 512) ---

SD15_UNET = json.loads((ARCHITECTURES / "sd_v1" / "unet" / "config.json").read_text())


def group(resolution: tuple[int, int], **dataset: object) -> DatasetGroupConfig:
    subset = SubsetConfig(image_dir=Path("images"))
    return DatasetGroupConfig((DatasetConfig((subset,), resolution=resolution, name="datasets[0]", **dataset),),
                              source="data.toml")


def test_sd_refuses_a_resolution_the_vae_cannot_encode():
    with pytest.raises(UserError) as e:
        check_sd_sides(group((100, 100)), SD15_UNET, 8)
    message = str(e.value)
    assert message.startswith("data.toml: datasets[0]: resolution 100x100 is not a multiple of 8")
    assert "96x96 or 104x104" in message and "--resolution" in message


def test_sd_refuses_a_side_below_what_the_unet_downsamples():
    with pytest.raises(UserError, match=r"resolution 512x56 is below 64 px"):
        check_sd_sides(group((512, 56)), SD15_UNET, 8)


def test_sd_refuses_bucket_steps_off_the_latent_grid():
    with pytest.raises(UserError, match=r"datasets\[0\]: bucket_reso_steps = 36 is not a multiple of 8"):
        check_sd_sides(group((512, 512), enable_bucket=True, bucket_reso_steps=36), SD15_UNET, 8)
    with pytest.raises(UserError, match=r"min_bucket_reso = 32 allows buckets with sides below 64 px"):
        check_sd_sides(group((512, 512), enable_bucket=True, min_bucket_reso=32), SD15_UNET, 8)


def test_sd_warns_of_a_resolution_far_below_the_native_one(caplog):
    with caplog.at_level(logging.WARNING):
        check_sd_sides(group((192, 192)), SD15_UNET, 8)
        assert "less than half this model's native 512 px" in caplog.text
        caplog.clear()
        check_sd_sides(group((256, 256)), SD15_UNET, 8)  # half the native side: usual enough
        check_sd_sides(group((512, 512), enable_bucket=True), SD15_UNET, 8)
    assert not caplog.records


def train_data_dir(tmp_path: Path, images: Path) -> Path:
    """A --train_data_dir with one ``1_dog`` subfolder of two captioned images."""
    folder = tmp_path / "train" / "1_dog"
    folder.mkdir(parents=True)
    for path in sorted(images.iterdir())[:4]:
        (folder / path.name).write_bytes(path.read_bytes())
    return folder.parent


def test_training_a_tiny_sd_model_refuses_an_odd_side(tmp_path, tiny_sd_dir, tiny_images, capsys):
    """The tiny VAE has 2 px per latent: 33 is refused, the small sides the other tests use are not."""
    out = tmp_path / "out"
    code = train_network.main(["--pretrained_model_name_or_path", str(tiny_sd_dir), "--train_data_dir",
                               str(train_data_dir(tmp_path, tiny_images)), "--resolution", "33",
                               "--max_train_steps", "1", "--output_dir", str(out)])
    assert code == 2 and not out.exists()
    assert "--train_data_dir: resolution 33x33 is not a multiple of 2" in capsys.readouterr().err


# --- --resolution and the TOML's resolution are checked before the model loads ------------------------------


@pytest.mark.parametrize("value", ["abc", "512,x", "0", "512,512,512"])
def test_a_bad_resolution_flag_is_an_argument_error(value):
    args = build_parser().parse_args(["--resolution", value, "--output_dir", "o",
                                      "--pretrained_model_name_or_path", "m"])
    with pytest.raises(UserError, match=f"--resolution '{value}': expected a positive integer or width,height"):
        check_combinations(args, build_parser().parse_args([]))


@pytest.fixture
def no_model_load(monkeypatch):
    import library.families

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad resolution was reported")

    monkeypatch.setattr(library.families, "load_family", refuse)


@pytest.mark.parametrize("toml", [False, True])
def test_a_bad_resolution_stops_the_run_before_the_model_loads(tmp_path, tiny_sd_dir, tiny_images, capsys,
                                                               no_model_load, toml):
    argv = ["--pretrained_model_name_or_path", str(tiny_sd_dir), "--output_dir", str(tmp_path / "out")]
    if toml:
        data = tmp_path / "data.toml"
        data.write_text(f'[[datasets]]\nresolution = "512,x"\n[[datasets.subsets]]\nimage_dir = "{tiny_images}"\n')
        argv += ["--dataset_config", str(data)]
    else:
        argv += ["--train_data_dir", str(train_data_dir(tmp_path, tiny_images)), "--resolution", "abc"]
    assert train_network.main(argv) == 2
    err = capsys.readouterr().err
    if toml:
        assert f'{data}: datasets[0].resolution (line 2): got "512,x", expected a positive integer' in err
    else:
        assert "--resolution 'abc'" in err


# --- an LLM dataset TOML given to a diffusion model ------------------------------------------------------------


@pytest.mark.parametrize("text, key", [
    ('[general]\nmax_seq_length = 512\n[[datasets]]\n[[datasets.subsets]]\njsonl_file = "chat.jsonl"\n',
     "general.max_seq_length (line 2)"),
    ('[[datasets]]\nbatch_size = 2\n[[datasets.subsets]]\njsonl_file = "chat.jsonl"\n',
     "datasets[0].subsets[0].jsonl_file (line 4)"),
])
def test_an_llm_dataset_toml_for_a_diffusion_model_says_so(tmp_path, text, key):
    path = tmp_path / "llm_data.toml"
    path.write_text(text)
    with pytest.raises(UserError) as e:
        load_dataset_config(path, DatasetDefaults())
    message = str(e.value)
    assert message.startswith(f"{path}: {key}: '")
    assert f"{path} is a dataset config for a causal LM" in message and "the model is a diffusion model" in message
    assert "unknown key" not in message


def test_an_image_dataset_toml_for_an_llm_names_the_image_key(tmp_path):
    from library.data.text_config import load_text_dataset_config

    path = tmp_path / "data.toml"
    path.write_text('[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = "images"\n')
    with pytest.raises(UserError, match=r"datasets\[0\].resolution \(line 2\): 'resolution' is an image dataset key"):
        load_text_dataset_config(path)


# --- tools/plan.py --vram ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "abc"])
def test_plan_refuses_a_vram_that_is_not_a_positive_size(value, capsys):
    from tools import plan

    with pytest.raises(SystemExit) as e:
        plan.main(["--pretrained_model_name_or_path", "model", f"--vram={value}"])
    assert e.value.code == 2
    assert f"argument --vram: '{value}' is not a GPU memory size; give a positive number of GiB" in \
        capsys.readouterr().err


# --- tools/extract.py: SD 2.x -----------------------------------------------------------------------------------


def configs(kind: str) -> DiffusionModels:
    """The released model's configs (no weights): what base_model_version reads."""
    root = ARCHITECTURES / kind
    read = lambda sub, name="config.json": json.loads((root / sub / name).read_text())  # noqa: E731
    encoders = [SimpleNamespace(config=SimpleNamespace(**read(sub))) for sub in ("text_encoder", "text_encoder_2")
                if (root / sub).is_dir()]
    return DiffusionModels(SimpleNamespace(config=read("unet")), encoders, read("scheduler", "scheduler_config.json"))


def test_extract_tells_the_released_families_apart():
    assert configs("sd_v1").base_model_version() == "sd_v1"
    assert configs("sd_v2").base_model_version() == "sd_v2"
    assert configs("sd_v2").base_model_version(v_prediction=True) == "sd_v2_v"
    assert configs("sdxl_base").base_model_version(v2=True) == "sdxl_base_v1-0"


def tiny_sd2_pair(folder: Path) -> tuple[Path, Path]:
    """SD 2.x in miniature (linear attention projections, a 32-wide text encoder), and a copy with one
    attention weight moved."""
    from library.tiny_models import tiny_sd2_unet, tiny_sd_pipeline

    pipe = tiny_sd_pipeline(seed=4)
    pipe.unet = tiny_sd2_unet(seed=4)
    pipe.save_pretrained(folder / "base")
    with torch.no_grad():
        pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.add_(0.01)
    pipe.save_pretrained(folder / "tuned")
    return folder / "base", folder / "tuned"


def test_extract_writes_a_tiny_sd2_models_lora_as_sd2(tmp_path, tiny_sd_dir):
    from library.lora_files import read_metadata
    from tools import extract

    base, tuned = tiny_sd2_pair(tmp_path)
    out = tmp_path / "sd2.safetensors"
    assert extract.main(["--model_org", str(base), "--model_tuned", str(tuned), "--save_to", str(out)]) == 0
    meta = read_metadata(str(out))
    assert meta["ss_base_model_version"] == "sd_v2" and meta["ss_v2"] == "True"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-512/lora"

    forced = tmp_path / "forced.safetensors"  # --v2 --v_parameterization, as sd-scripts users write it
    assert extract.main(["--model_org", str(base), "--model_tuned", str(tuned), "--save_to", str(forced), "--v2",
                         "--v_parameterization"]) == 0
    meta = read_metadata(str(forced))
    assert meta["ss_base_model_version"] == "sd_v2_v" and meta["modelspec.prediction_type"] == "v"


def test_extract_checks_sdxl_and_v2_against_the_folder(tmp_path, tiny_sd_dir, capsys):
    from tools import extract

    out = tmp_path / "x.safetensors"
    argv = ["--model_org", str(tiny_sd_dir), "--model_tuned", str(tiny_sd_dir), "--save_to", str(out)]
    assert extract.main([*argv, "--sdxl"]) == 2
    assert f"--sdxl: {tiny_sd_dir} is an SD 1.x model; leave --sdxl out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        extract.main([*argv, "--sdxl", "--v2"])
    assert "not allowed with argument" in capsys.readouterr().err and not out.exists()
