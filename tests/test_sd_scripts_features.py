"""sd-scripts arguments that were refused before and now work as in sd-scripts: --validation_split /
--validation_seed on the command line, --resize_interpolation, --log_tracker_config and --base_weights."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from library.arg_checks import check_combinations
from library.args import build_parser
from library.config_file import parse_args_with_sources
from library.data.images import ImageCaptionDataset
from library.data.text_config import parse_text_dataset_config
from library.dataset_config import config_from_train_data_dir, load_dataset_config
from library.errors import UserError
from library.tiny_models import write_synthetic_images
from library.train_setup import dataset_defaults

BASE = ["--output_dir", "o", "--pretrained_model_name_or_path", "m"]


def _args(*argv: str):
    args, sources = parse_args_with_sources(build_parser(), [*BASE, *argv])
    check_combinations(args, build_parser().parse_args([]))
    return args, sources


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- --validation_split / --validation_seed ------------------------------------------------------

IMAGE_TOML = '[[datasets]]\n{dataset}\n  [[datasets.subsets]]\n  image_dir = "a"\n'


@pytest.mark.parametrize(("general", "dataset", "expected"), [
    ("", "", (0.25, 9)),  # the command line is the lowest level, used when the TOML is silent
    ("[general]\nvalidation_split = 0.5\n", "", (0.5, 9)),  # [general] beats the command line
    ("[general]\nvalidation_split = 0.5\n", "validation_split = 0.1\nvalidation_seed = 3", (0.1, 3)),
    ("", "validation_split = 0.0", (0.0, 9)),  # an explicit 0 in the TOML turns the command line's split off
])
def test_command_line_validation_split_is_the_dataset_default(tmp_path, general, dataset, expected):
    args, sources = _args("--validation_split", "0.25", "--validation_seed", "9")
    path = _write(tmp_path / "d.toml", general + IMAGE_TOML.format(dataset=dataset))
    (d,) = load_dataset_config(path, dataset_defaults(args, sources)).datasets
    assert (d.validation_split, d.validation_seed) == expected


def test_without_the_flags_nothing_is_held_out(tmp_path):
    args, sources = _args()
    (d,) = load_dataset_config(_write(tmp_path / "d.toml", IMAGE_TOML.format(dataset="")),
                               dataset_defaults(args, sources)).datasets
    assert (d.validation_split, d.validation_seed) == (0.0, None)


def test_train_data_dir_runs_hold_out_images_from_the_command_line(tmp_path):
    write_synthetic_images(tmp_path / "img" / "2_sks dog", count=10, size=32)
    args, sources = _args("--train_data_dir", str(tmp_path / "img"), "--resolution", "32",
                          "--validation_split", "0.2", "--validation_seed", "4")
    (d,) = config_from_train_data_dir(dataset_defaults(args, sources)).datasets
    assert (d.validation_split, d.validation_seed) == (0.2, 4)
    held = {r.path.name for r in ImageCaptionDataset(d, seed=0, split="validation").records}
    train = {r.path.name for r in ImageCaptionDataset(d, seed=0).records}
    assert len(held) == 2 and len(train) == 8 and not held & train
    # the split follows --validation_seed, not the run's seed
    assert {r.path.name for r in ImageCaptionDataset(d, seed=123, split="validation").records} == held


def test_llm_dataset_takes_the_command_line_validation_as_its_default(tmp_path):
    _write(tmp_path / "rows.jsonl", '{"text": "a"}\n')
    subset = {"jsonl_file": str(tmp_path / "rows.jsonl")}
    group = parse_text_dataset_config({"datasets": [{"subsets": [subset]}]}, validation_split=0.3,
                                      validation_seed=8)
    assert (group.datasets[0].validation_split, group.datasets[0].validation_seed) == (0.3, 8)
    data = {"general": {"validation_split": 0.1}, "datasets": [{"subsets": [subset]}, {"validation_seed": 2,
                                                                                        "subsets": [subset]}]}
    group = parse_text_dataset_config(data, validation_split=0.3, validation_seed=8)
    assert [(d.validation_split, d.validation_seed) for d in group.datasets] == [(0.1, 8), (0.1, 2)]


@pytest.mark.parametrize("value", ["1", "-0.1", "1.5"])
def test_a_validation_split_out_of_range_is_refused_before_anything_loads(value):
    with pytest.raises(UserError, match=f"--validation_split {float(value)}: expected a fraction"):
        _args("--validation_split", value)


def test_validation_flags_are_real_arguments_also_in_a_config_file(tmp_path):
    config = _write(tmp_path / "c.toml", "validation_split = 0.2\nvalidation_seed = 11\n")
    args, sources = _args("--config_file", str(config))
    defaults = dataset_defaults(args, sources)
    assert (defaults.validation_split, defaults.validation_seed) == (0.2, 11)
    assert json.dumps(sources["validation_split"]).startswith('"config file')


# --- --resize_interpolation ----------------------------------------------------------------------


def test_every_sd_scripts_filter_name_has_a_pil_filter():
    from library.data.pixels import RESIZE_FILTERS
    from library.dataset_config import RESIZE_INTERPOLATIONS

    assert set(RESIZE_FILTERS) == set(RESIZE_INTERPOLATIONS)
    choices = next(a.choices for a in build_parser()._actions if a.dest == "resize_interpolation")
    assert [c for c in choices if c] == list(RESIZE_INTERPOLATIONS)


def test_unset_resize_is_lanczos_bit_for_bit_and_a_filter_changes_the_pixels():
    import numpy as np
    from PIL import Image

    from library.data.pixels import resize_and_crop

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8), "RGB")
    unset, _ = resize_and_crop(image, (32, 32), False, (0.0, 0.0))
    lanczos = image.resize((38, 32), Image.Resampling.LANCZOS).crop((3, 0, 35, 32))  # today's code, by hand
    assert np.array_equal(np.asarray(unset), np.asarray(lanczos))
    assert np.array_equal(np.asarray(resize_and_crop(image, (32, 32), False, (0.0, 0.0), "lanczos")[0]),
                          np.asarray(unset))
    nearest, _ = resize_and_crop(image, (32, 32), False, (0.0, 0.0), "nearest")
    expected = image.resize((38, 32), Image.Resampling.NEAREST).crop((3, 0, 35, 32))
    assert np.array_equal(np.asarray(nearest), np.asarray(expected))
    assert not np.array_equal(np.asarray(nearest), np.asarray(unset))
    area, _ = resize_and_crop(image, (32, 32), False, (0.0, 0.0), "area")  # sd-scripts' PIL "area": HAMMING
    expected = image.resize((38, 32), Image.Resampling.HAMMING).crop((3, 0, 35, 32))
    assert np.array_equal(np.asarray(area), np.asarray(expected))


@pytest.mark.parametrize(("general", "subset", "expected"), [
    ("", "", ["bicubic", "bicubic"]),  # the command line's filter when the TOML is silent
    ('[general]\nresize_interpolation = "box"\n', "", ["box", "box"]),
    ('[general]\nresize_interpolation = "box"\n', 'resize_interpolation = "nearest"', ["nearest", "box"]),
])
def test_resize_interpolation_follows_the_dataset_precedence(tmp_path, general, subset, expected):
    args, sources = _args("--resize_interpolation", "bicubic")
    text = (general + '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\n' + subset
            + '\n[[datasets.subsets]]\nimage_dir = "b"\n')
    (d,) = load_dataset_config(_write(tmp_path / "d.toml", text), dataset_defaults(args, sources)).datasets
    assert [s.resize_interpolation for s in d.subsets] == expected


def test_a_wrong_filter_name_is_an_error_naming_the_key(tmp_path):
    text = '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\nresize_interpolation = "lanczos3"\n'
    where = r"datasets\[0\].subsets\[0\].resize_interpolation"
    with pytest.raises(UserError, match=f'(?s){where}.*"lanczos3".*"nearest"'):
        load_dataset_config(_write(tmp_path / "d.toml", text), dataset_defaults(*_args()))
    with pytest.raises(SystemExit):  # argparse's choices on the command line
        _args("--resize_interpolation", "lanczos3")


def _cached_latents(tmp_path: Path, images: Path, interpolation: str | None) -> tuple[list[int], dict]:
    """Cache the latents of ``images`` (resized 48x40 -> 32x32) to disk with a fake VAE; (images encoded, latents)."""
    import torch

    from library.data.image_data import build_image_data
    from library.dataset_config import DatasetConfig, DatasetGroupConfig, SubsetConfig

    subset = SubsetConfig(image_dir=images, resize_interpolation=interpolation)
    config = DatasetGroupConfig((DatasetConfig(subsets=(subset,), resolution=(32, 32)),))
    data = build_image_data(config, seed=0, on_bad_image="error", num_processes=1, rank=0, num_workers=0,
                            persistent_workers=False)
    encoded: list[int] = []

    def encode(pixels: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        encoded.extend(keys.tolist())
        return torch.nn.functional.avg_pool2d(pixels, 8)  # the pixels decide the "latent"

    data.cache_latents(encode, 4, torch.device("cpu"), to_disk=True, vae_fingerprint="fake")
    return encoded, data.concat.latents


def test_cached_latents_are_recomputed_when_the_resize_filter_changes(tmp_path):
    import torch
    from PIL import Image

    images = write_synthetic_images(tmp_path / "img", count=3, size=48)
    for path in images.glob("*.png"):  # not square: every image is scaled, so the filter matters
        Image.open(path).resize((48, 40)).save(path)
    first, lanczos = _cached_latents(tmp_path, images, None)
    assert len(first) == 3
    assert _cached_latents(tmp_path, images, "lanczos")[0] == []  # the same pixels as unset: files reused
    again, nearest = _cached_latents(tmp_path, images, "nearest")
    assert len(again) == 3 and not all(torch.equal(lanczos[k], nearest[k]) for k in lanczos)
    assert _cached_latents(tmp_path, images, "nearest")[0] == []  # now cached for nearest
    assert len(_cached_latents(tmp_path, images, None)[0]) == 3  # and back to lanczos: encoded again


def test_resume_compares_the_resize_filter():
    from library.dataset_config import DatasetConfig, SubsetConfig
    from library.resume_check import check_resume_compatible, dataset_settings

    def fingerprint(interpolation: str | None) -> dict:
        subset = SubsetConfig(image_dir=Path("a"), resize_interpolation=interpolation)
        return {"dataset settings": dataset_settings([DatasetConfig(subsets=(subset,))])}

    with pytest.raises(UserError, match="resize_interpolation"):
        check_resume_compatible(fingerprint(None), fingerprint("nearest"), False, "state")
    assert check_resume_compatible(fingerprint("box"), fingerprint("box"), False, "state") == []
    # a state saved before the option existed has no such field: unset resumes, a filter is a change
    older = fingerprint(None)
    del older["dataset settings"][0]["subsets"][0]["resize_interpolation"]
    assert check_resume_compatible(older, fingerprint(None), False, "state") == []
    with pytest.raises(UserError, match="resize_interpolation"):
        check_resume_compatible(older, fingerprint("area"), False, "state")


# --- --log_tracker_config ------------------------------------------------------------------------


def test_tracker_config_tables_become_init_kwargs(tmp_path):
    from library.accelerator import read_tracker_config

    path = _write(tmp_path / "t.toml", '[wandb]\nname = "x"\ntags = ["a", "b"]\n[tensorboard]\nflush_secs = 5\n')
    assert read_tracker_config(str(path), None, "all") == {"wandb": {"name": "x", "tags": ["a", "b"]},
                                                          "tensorboard": {"flush_secs": 5}}
    assert read_tracker_config(None, "run", "wandb") == {"wandb": {"name": "run"}}  # as before: the run name
    assert read_tracker_config(None, None, None) == {}
    assert read_tracker_config(str(path), "x", "all")["wandb"]["name"] == "x"  # the same name twice is fine
    with pytest.raises(UserError, match=r"--wandb_run_name 'y' and name = 'x'.*disagree"):
        read_tracker_config(str(path), "y", "all")


@pytest.mark.parametrize(("text", "message"), [
    (None, "file not found"),
    ("[wandb\nname = 1\n", "TOML syntax error"),
    ('[wnadb]\nname = "x"\n', "'wnadb' is not a tracker (did you mean 'wandb'?)"),
    ('wandb = "x"\n', "'wandb' must be a table"),
    # keys accelerate passes itself: a second value would be a TypeError only once training has begun
    ('[wandb]\nproject = "p"\n', "[wandb] project is what --log_tracker_name sets"),
    ('[tensorboard]\nlog_dir = "d"\n', "[tensorboard] log_dir is what --logging_dir sets"),
])
def test_a_bad_tracker_config_is_an_error_naming_the_file(tmp_path, text, message):
    from library.accelerator import read_tracker_config

    path = tmp_path / "trackers.toml"
    if text is not None:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match=f"--log_tracker_config {re.escape(str(path))}: .*{re.escape(message)}"):
        read_tracker_config(str(path), None, "wandb")


def _train_argv(model: Path, images: Path, out: Path, *extra: str) -> list[str]:
    data = _write(out.parent / f"{out.name}-data.toml", f'[[datasets]]\nresolution = 64\nbatch_size = 4\n'
                  f'[[datasets.subsets]]\nimage_dir = "{images}"\n')
    return ["--pretrained_model_name_or_path", str(model), "--dataset_config", str(data), "--output_dir", str(out),
            "--output_name", "lora", "--network_dim", "4", "--seed", "3", "--cache_latents", *extra]


def test_a_missing_tracker_config_stops_the_run_before_the_model_loads(tmp_path, tiny_sd_dir, tiny_images,
                                                                       monkeypatch, capsys):
    import train_network
    from library import model_setup

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(model_setup, "build_family", no_model)
    out = tmp_path / "out"
    argv = _train_argv(tiny_sd_dir, tiny_images, out, "--log_with", "tensorboard", "--logging_dir",
                       str(tmp_path / "logs"), "--log_tracker_config", str(tmp_path / "nope.toml"))
    assert train_network.main(argv) == 2
    assert f"--log_tracker_config {tmp_path / 'nope.toml'}: file not found" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "logs").exists()


def test_tensorboard_runs_with_the_tracker_config(tmp_path, tiny_sd_dir, tiny_images):
    import train_network

    # filename_suffix is a SummaryWriter keyword: the event file's name shows the table reached the tracker
    config = _write(tmp_path / "trackers.toml", '[tensorboard]\nfilename_suffix = ".from-config"\n')
    argv = _train_argv(tiny_sd_dir, tiny_images, tmp_path / "out", "--max_train_steps", "1", "--log_with",
                       "tensorboard", "--logging_dir", str(tmp_path / "logs"), "--log_tracker_config", str(config),
                       "--network_train_unet_only")
    assert train_network.main(argv) == 0
    # the run's own writer (the hparams writer that accelerate adds in a subfolder takes no keywords)
    events = list((tmp_path / "logs").glob("*/network_train/events.out.tfevents.*"))
    assert len(events) == 1 and events[0].name.endswith(".from-config")


# --- --base_weights / --base_weights_multiplier --------------------------------------------------


def test_base_weight_multipliers_one_per_file_or_one_for_all():
    from library.base_weights import base_weight_multipliers

    assert base_weight_multipliers(["a", "b"], None) == [1.0, 1.0]
    assert base_weight_multipliers(["a", "b"], [0.5]) == [0.5, 0.5]
    assert base_weight_multipliers(["a", "b"], [0.5, -1.0]) == [0.5, -1.0]
    assert base_weight_multipliers(None, None) == []
    with pytest.raises(UserError, match="3 --base_weights files but 2 --base_weights_multiplier values"):
        base_weight_multipliers(["a", "b", "c"], [0.5, 1.0])
    with pytest.raises(UserError, match="without --base_weights"):
        base_weight_multipliers(None, [0.5])


@pytest.fixture(scope="module")
def base_lora(tmp_path_factory, tiny_sd_dir) -> Path:
    """A networks.lora file for the tiny SD model with random up weights (every ΔW non-zero)."""
    from test_tools_common import KOHYA_META, random_network

    from library.diffusion_models import load_pipeline

    path = tmp_path_factory.mktemp("base") / "style.safetensors"
    random_network(load_pipeline(str(tiny_sd_dir)), dim=4, alpha=2.0, seed=5).save_weights(path, None, KOHYA_META)
    return path


def _family(tiny_sd_dir: Path, *extra: str):
    from library.model_setup import build_family

    args, sources = _args("--pretrained_model_name_or_path", str(tiny_sd_dir), *extra)
    return build_family(args, sources, "no", seed=0)


def test_training_starts_from_the_merged_weights(tmp_path, tiny_sd_dir, base_lora):
    import safetensors.torch
    import torch
    from test_tools_common import state_deltas

    from library.diffusion_models import load_models
    from tools import merge

    family = _family(tiny_sd_dir, "--base_weights", str(base_lora), "--base_weights_multiplier", "0.5")
    plain = _family(tiny_sd_dir)
    # what tools/merge.py --sd_model writes for the same file and ratio
    assert merge.main(["--sd_model", str(tiny_sd_dir), "--models", str(base_lora), "--ratios", "0.5",
                       "--save_to", str(tmp_path / "merged")]) == 0
    merged = load_models(str(tmp_path / "merged"), "sd_model")
    for ours, theirs in ((family.unet, merged.unet), (family.text_encoder, merged.text_encoders[0])):
        mine, expected = ours.state_dict(), theirs.state_dict()
        assert mine.keys() == expected.keys()
        assert all(torch.equal(mine[k], expected[k].to(mine[k].dtype)) for k in mine)
    # and the change is 0.5 ΔW of the file, by an independent computation
    delta = state_deltas(safetensors.torch.load_file(base_lora))
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    change = family.unet.state_dict()[path].double() - plain.unet.state_dict()[path].double()
    assert name in delta and torch.allclose(change, 0.5 * delta[name], atol=1e-6)


def test_a_base_weights_file_for_another_model_is_refused(tmp_path, tiny_sd_dir, monkeypatch):
    import safetensors.torch
    import torch

    from library import families

    bad = tmp_path / "other.safetensors"  # an LLM's LoRA, by its keys
    safetensors.torch.save_file({"lora_unet_model_layers_0_mlp_up_proj.lora_down.weight": torch.zeros(2, 4),
                                 "lora_unet_model_layers_0_mlp_up_proj.lora_up.weight": torch.zeros(4, 2)}, str(bad))
    with monkeypatch.context() as m:  # told from the file's header, before the model loads
        m.setattr(families, "load_family", lambda *a, **k: pytest.fail("the model was loaded"))
        with pytest.raises(UserError, match=r"other.safetensors is a LoRA for llm .*--model_type sd; give LoRAs"):
            _family(tiny_sd_dir, "--base_weights", str(bad))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError, match=r"notes.txt"):  # not a LoRA file: load_lora says what it is
        _family(tiny_sd_dir, "--base_weights", str(tmp_path / "notes.txt"))


def test_a_missing_base_weights_file_stops_the_run_before_the_model_loads(tmp_path, tiny_sd_dir, tiny_images,
                                                                          monkeypatch, capsys):
    import train_network
    from library import families

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(families, "load_family", no_model)
    out = tmp_path / "out"
    argv = _train_argv(tiny_sd_dir, tiny_images, out, "--base_weights", str(tmp_path / "nope.safetensors"))
    assert train_network.main(argv) == 2
    assert f"--base_weights {tmp_path / 'nope.safetensors'}: file not found" in capsys.readouterr().err
    argv = _train_argv(tiny_sd_dir, tiny_images, out, "--base_weights", str(tmp_path), str(tmp_path),
                       "--base_weights_multiplier", "1", "2", "3")
    assert train_network.main(argv) == 2
    assert "2 --base_weights files but 3 --base_weights_multiplier values" in capsys.readouterr().err
    assert not out.exists()


def test_a_run_with_base_weights_records_them_and_resume_compares_them(tmp_path, tiny_sd_dir, tiny_images,
                                                                       base_lora, capsys):
    import train_network
    from library.lora_files import read_metadata

    out = tmp_path / "out"
    base = ("--base_weights", str(base_lora), "--base_weights_multiplier", "0.5", "--network_train_unet_only")
    assert train_network.main(_train_argv(tiny_sd_dir, tiny_images, out, "--max_train_steps", "1", "--save_state",
                                          *base)) == 0
    assert f"--base_weights: merged {base_lora}" in capsys.readouterr().out
    meta = read_metadata(str(out / "lora.safetensors"))
    assert json.loads(meta["ss_base_weights"]) == [{"name": "style.safetensors", "multiplier": 0.5}]
    other = (*base[:3], "0.8", base[4])
    assert train_network.main(_train_argv(tiny_sd_dir, tiny_images, out, "--max_train_steps", "2", "--resume",
                                          "latest", *other)) == 2
    err = capsys.readouterr().err
    assert "base_weights[0].multiplier: saved 0.5, now 0.8" in err  # the field that changed, not two structures


def test_llm_training_starts_from_the_merged_weights(tmp_path):
    import torch
    from test_tools_merge_llm import _random_adapter
    from transformers import AutoModelForCausalLM

    from library.tiny_llm import save_tiny_llm
    from tools import merge

    base_dir = save_tiny_llm(tmp_path / "base")
    adapter = _random_adapter(base_dir, tmp_path / "adapter")
    family = _family(base_dir, "--base_weights", str(adapter), "--base_weights_multiplier", "0.7")
    assert merge.main(["--llm_model", str(base_dir), "--models", str(adapter), "--ratios", "0.7",
                       "--save_to", str(tmp_path / "merged")]) == 0
    expected = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).state_dict()
    mine = family.model.state_dict()
    assert all(torch.allclose(mine[k].float(), expected[k].float(), atol=1e-6) for k in expected if k in mine)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir)).state_dict()
    assert any(not torch.equal(mine[k].float(), base[k].float()) for k in base)
    # independent of the merge tool: W + 0.7 · (alpha / r) · B A from the adapter's own tensors and config
    import json

    from safetensors.torch import load_file

    tensors, config = load_file(str(adapter / "adapter_model.safetensors")), json.loads(
        (adapter / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    modules = [k[len("base_model.model."):-len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight")]
    assert len(modules) >= 7  # every linear layer of the tiny model's attention and MLP
    for module in modules:
        a, b = (tensors[f"base_model.model.{module}.lora_{x}.weight"].float() for x in "AB")
        want = base[f"{module}.weight"].float() + 0.7 * scale * (b @ a)
        assert torch.allclose(mine[f"{module}.weight"].float(), want, atol=1e-6), module


def test_network_weights_for_another_model_family_are_refused_before_the_model_loads(tmp_path, tiny_sd_dir,
                                                                                      monkeypatch):
    import safetensors.torch
    import torch

    from library import families

    sdxl = tmp_path / "xl.safetensors"  # an SDXL LoRA by its key names (two text encoders)
    safetensors.torch.save_file({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 4),
                                 "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(4, 2),
                                 "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 4),
                                 "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(4, 2)},
                                str(sdxl))
    monkeypatch.setattr(families, "load_family", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(UserError, match=r"--network_weights .*xl.safetensors is a LoRA for sdxl .*--model_type sd"):
        _family(tiny_sd_dir, "--network_weights", str(sdxl))


def test_same_rank_other_shapes_name_the_model_not_dim_from_weights():
    import torch

    from networks.targets import shape_mismatch

    loaded = {"m.lora_down.weight": torch.zeros(4, 32)}  # SD 2.x: a linear proj_in
    own = {"m.lora_down.weight": torch.zeros(4, 32, 1, 1)}  # SD 1.x: a 1x1 conv
    message = shape_mismatch(loaded, own)
    assert "ranks agree" in message and "give the model it was trained on" in message
    assert "--dim_from_weights" not in message
