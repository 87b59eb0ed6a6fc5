"""Sample images: prompt files, samplers, the network seen by the pipeline, and the training hook.

The generation tests use the tiny SD model at 64 px with one or two sampling steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import train_network
from library.errors import UserError
from library.sample_prompts import SAMPLER_NAMES, SamplePrompt, check_sampler, load_prompts, parse_prompt_line
from library.sampling import SampleSchedule, make_scheduler, snap_side

# --- prompt files ---------------------------------------------------------------------------------


def test_txt_prompt_file_with_every_option(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# a comment\n\n"
                    "a red square, sks --n blurry, low quality --w 768 --h 512 --s 20 --d 42 --l 5.5 --ss K_EULER_A\n"
                    "  # an indented comment\n"
                    "plain prompt\n", encoding="utf-8")
    first, second = load_prompts(path, default_sampler="dpmsolver++")
    assert first == SamplePrompt(prompt="a red square, sks", negative_prompt="blurry, low quality", width=768,
                                 height=512, sample_steps=20, seed=42, scale=5.5, sample_sampler="euler_a",
                                 index=0, where=f"{path}, line 3")
    # defaults: kohya's size and scale; steps None (the family's default: 30 for images); no seed; the sampler
    assert (second.prompt, second.width, second.height, second.sample_steps, second.scale, second.seed,
            second.sample_sampler, second.index) == ("plain prompt", 512, 512, None, 7.5, None, "dpmsolver++", 1)


def test_a_line_may_hold_only_options():
    prompt = parse_prompt_line("--n ugly --w 64")
    assert (prompt.prompt, prompt.negative_prompt, prompt.width) == ("", "ugly", 64)


def test_toml_prompt_tables_and_kohya_subsets(tmp_path):
    tables = tmp_path / "tables.toml"
    tables.write_text('[[prompt]]\nprompt = "a cat"\nwidth = 640\nseed = 1\n\n'
                      '[[prompt]]\nprompt = "a dog"\nnegative_prompt = "cat"\nscale = 4\nsample_steps = 12\n'
                      'sample_sampler = "heun"\n')
    cat, dog = load_prompts(tables)
    assert (cat.prompt, cat.width, cat.seed, cat.sample_sampler) == ("a cat", 640, 1, "ddim")
    assert (dog.negative_prompt, dog.scale, dog.sample_steps, dog.sample_sampler) == ("cat", 4.0, 12, "heun")

    subsets = tmp_path / "subsets.toml"  # sd-scripts' layout: [prompt] holds defaults for its subsets
    subsets.write_text('[prompt]\nwidth = 320\nsample_steps = 9\n\n[[prompt.subset]]\nprompt = "one"\n\n'
                       '[[prompt.subset]]\nprompt = "two"\nwidth = 256\n')
    one, two = load_prompts(subsets)
    assert (one.prompt, one.width, one.sample_steps) == ("one", 320, 9)
    assert (two.prompt, two.width, two.sample_steps, two.index) == ("two", 256, 9, 1)


def test_json_prompt_list_of_objects_and_lines(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps([{"prompt": "a", "height": 256, "seed": 5}, "b --d 6 --ss pndm"]))
    a, b = load_prompts(path)
    assert (a.prompt, a.height, a.seed) == ("a", 256, 5)
    assert (b.prompt, b.seed, b.sample_sampler, b.index) == ("b", 6, "pndm", 1)


@pytest.mark.parametrize("name, text, message", [
    ("p.txt", "ok\nbad --w wide\n", "p.txt, line 2: --w expects a whole number, got 'wide'"),
    ("p.txt", "ok\n\n# c\nbad --x 3\n", "line 4: unknown option '--x'"),
    ("p.txt", "bad --ss eulr_a\n", "line 1: unknown sampler 'eulr_a' (did you mean 'euler_a'?)"),
    ("p.txt", "bad --s 0\n", "line 1: sample_steps = 0 is out of range"),
    ("p.txt", "bad --n\n", "line 1: --n needs a value"),
    ("p.toml", '[[prompt]]\nprompt = "a"\n\n[[prompt]]\nprompt = "b"\nwidht = 5\n',
     "p.toml, line 4: unknown key 'widht' (did you mean 'width'?)"),
    ("p.toml", '[[prompt]]\nprompt = "a"\nseed = "x"\n', "line 1: seed = 'x' must be a whole number"),
    ("p.toml", '[[prompt]\n', "TOML syntax error at line 1"),
    ("p.toml", '[[prompts]]\nprompt = "a"\n', "found 'prompts' (did you mean 'prompt'?)"),
    ("p.json", '[{"prompt": "a"}, {"promt": "b"}]', "p.json, entry 2: unknown key 'promt' (did you mean 'prompt'?)"),
    ("p.json", '{"prompt": "a"}', "expected a JSON list"),
    ("p.json", '[{"negative_prompt": "a"}]', "entry 1: the entry has no 'prompt'"),
    ("p.yaml", "prompt: a\n", "must be a .txt, .toml or .json file"),
])
def test_bad_prompt_files_name_the_file_and_line(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UserError) as e:
        load_prompts(path)
    assert message in str(e.value)


def test_missing_prompt_file_is_an_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_prompts(tmp_path / "nope.txt")


# --- samplers and sizes ---------------------------------------------------------------------------

KOHYA_SAMPLERS = {
    "ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler", "heun": "HeunDiscreteScheduler",
    "dpm_2": "KDPM2DiscreteScheduler", "dpm_2_a": "KDPM2AncestralDiscreteScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler", "dpmsolver++": "DPMSolverMultistepScheduler",
    "dpmsingle": "DPMSolverSinglestepScheduler", "k_lms": "LMSDiscreteScheduler",
    "k_euler": "EulerDiscreteScheduler", "k_euler_a": "EulerAncestralDiscreteScheduler",
    "k_dpm_2": "KDPM2DiscreteScheduler", "k_dpm_2_a": "KDPM2AncestralDiscreteScheduler",
}


def _has_scipy() -> bool:
    import importlib.util

    return importlib.util.find_spec("scipy") is not None


@pytest.mark.parametrize("name", list(KOHYA_SAMPLERS))
def test_every_kohya_sampler_maps_to_its_scheduler_with_the_models_config(name):
    from diffusers import DDPMScheduler

    config = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                           prediction_type="v_prediction").config
    if "lms" in name and not _has_scipy():
        with pytest.raises(UserError, match="needs scipy"):
            make_scheduler(name, config)
        return
    scheduler = make_scheduler(name, config)
    assert type(scheduler).__name__ == KOHYA_SAMPLERS[name]
    # the model's betas and prediction type carry over (v-prediction models sample correctly)
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.beta_end == 0.012
    if name.startswith("dpmsolver"):
        assert scheduler.config.algorithm_type == name


def test_sampler_names_are_kohyas_and_typos_are_explained():
    assert set(SAMPLER_NAMES) == set(KOHYA_SAMPLERS)
    with pytest.raises(UserError, match="did you mean 'dpmsolver\\+\\+'"):
        check_sampler("dpmsolver+")


def test_sides_round_down_to_the_multiple_with_kohyas_minimum():
    assert [snap_side(s, 8) for s in (512, 515, 100, 30)] == [512, 512, 96, 64]
    assert snap_side(1000, 64) == 960


def test_schedule():
    s = SampleSchedule(every_n_steps=2, every_n_epochs=3, at_first=True)
    assert [step for step in range(1, 7) if s.due(step)] == [2, 4, 6]
    assert [epoch for epoch in range(1, 7) if s.due(0, epoch=epoch)] == [3, 6]
    assert s.due(0, first=True) and not SampleSchedule().due(0, first=True)


# --- generation with the network ------------------------------------------------------------------


def test_the_pipeline_samples_with_the_trained_network(tiny_sd_dir):
    """The family's pipeline runs through the LoRA-patched modules: multiplier 0 is the base model."""
    from library.families.sd import SDFamily
    from library.sampling import generate_image
    from networks.lora import create_network

    family = SDFamily.load(str(tiny_sd_dir))
    family.prepare(torch.device("cpu"), torch.float32, True, False)
    prompt = SamplePrompt("sks red square", width=64, height=64, sample_steps=2, sample_sampler="euler")

    def sample() -> torch.Tensor:
        pipe = family.sample_pipeline()
        with torch.no_grad():
            return torch.tensor(list(generate_image(pipe, prompt, 1, pipe.scheduler.config).getdata()))

    base = sample()
    network = create_network(1.0, 4, 4.0, family.vae, family.text_encoder, family.unet)
    network.apply_to(family.text_encoder, family.unet, True, True)
    with torch.no_grad():
        for lora in network.unet_loras + network.text_encoder_loras:
            lora.lora_up.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    trained = sample()
    network.set_multiplier(0.0)
    switched_off = sample()
    # Sampling is deterministic (multiplier 0 gives the base image exactly), so any change is the LoRA's.
    assert torch.equal(base, switched_off), "the same seed must give the same image"
    assert (trained - base).abs().sum() > 0, "the pipeline did not see the LoRA"


# --- the training hook ----------------------------------------------------------------------------


def _data_toml(tmp_path: Path, images: Path, batch_size: int = 2) -> Path:
    path = tmp_path / "data.toml"  # 8 images: 8 / batch_size steps per epoch
    path.write_text(f"[[datasets]]\nresolution = 64\nbatch_size = {batch_size}\n"
                    f"[[datasets.subsets]]\nimage_dir = \"{images}\"\n")
    return path


def _run(model: Path, data: Path, out: Path, *extra: str) -> int:
    return train_network.main([
        "--pretrained_model_name_or_path", str(model), "--dataset_config", str(data), "--output_dir", str(out),
        "--output_name", "lora", "--network_dim", "4", "--learning_rate", "1e-2", "--seed", "3", "--cache_latents",
        "--network_train_unet_only", *extra])


def test_training_writes_sample_images_at_first_and_every_n_steps(tmp_path, tiny_sd_dir, tiny_images):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("sks red square --w 64 --h 64 --s 2 --d 7 --ss euler\n"
                       "# the second prompt has no seed: run seed 3 + index 1\n"
                       "sks blue circle --n green --w 100 --h 64 --s 2 --l 5\n")
    out = tmp_path / "out"
    assert _run(tiny_sd_dir, _data_toml(tmp_path, tiny_images), out, "--max_train_steps", "4",
                "--sample_prompts", str(prompts), "--sample_at_first", "--sample_every_n_steps", "2",
                "--sample_sampler", "ddim", "--logging_dir", str(tmp_path / "logs")) == 0
    names = sorted(p.name for p in (out / "sample").iterdir())
    assert names == [f"lora_{step:06d}_{i:02d}_{seed}.png" for step in (0, 2, 4) for i, seed in ((0, 7), (1, 4))]
    first = Image.open(out / "sample" / "lora_000000_00_7.png")
    assert first.size == (64, 64)
    assert Image.open(out / "sample" / "lora_000002_01_4.png").size == (96, 64)  # 100 rounded down to 8s
    assert "Sampler: euler, CFG scale: 7.5, Seed: 7, Size: 64x64, Training step: 0" in first.text["parameters"]
    # The network is zero at step 0 and trained at step 4: the same seed must give another image.
    after = Image.open(out / "sample" / "lora_000004_00_7.png")
    difference = torch.tensor(list(first.getdata())) - torch.tensor(list(after.getdata()))
    assert difference.abs().sum() > 0, "sampling did not use the trained LoRA"

    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "logs").rglob("events.out.tfevents.*")).parent),
                              size_guidance={IMAGES: 0}).Reload()
    assert {"sample/00", "sample/01"} <= set(events.Tags()["images"])
    assert [e.step for e in events.Images("sample/00")] == [0, 2, 4]


def test_a_failing_sample_is_logged_and_training_goes_on(tmp_path, tiny_sd_dir, tiny_images, capsys, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("boom in the sampler")

    monkeypatch.setattr("library.sampling.generate_image", boom)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("sks red square --w 64 --h 64 --s 1\n")
    out = tmp_path / "out"
    # 2 steps are one epoch; the loop leaves it at max_train_steps, and its end still samples.
    assert _run(tiny_sd_dir, _data_toml(tmp_path, tiny_images, batch_size=4), out, "--max_train_steps", "2",
                "--sample_prompts", str(prompts), "--sample_every_n_epochs", "1") == 0
    log = capsys.readouterr().out
    assert "sample 0 failed at step 2" in log and "boom in the sampler" in log and "'sks red square'" in log
    assert log.count("failed at step") == 1, "the step and the epoch end are one sampling point"
    assert (out / "lora.safetensors").is_file()
    assert not (out / "sample").exists() or not list((out / "sample").iterdir())


def test_a_bad_prompt_file_stops_the_run_before_training(tmp_path, tiny_sd_dir, tiny_images, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("fine\nsks --w 64 --hh 64\n")
    out = tmp_path / "out"
    assert _run(tiny_sd_dir, _data_toml(tmp_path, tiny_images), out, "--max_train_steps", "1",
                "--sample_prompts", str(prompts), "--sample_every_n_steps", "1") == 2
    assert "prompts.txt, line 2: unknown option '--hh' (did you mean '--h'?)" in capsys.readouterr().err
    assert not (out / "lora.safetensors").exists()


def test_sample_images_with_fp8_base(tmp_path, tiny_sd_dir, tiny_images, capsys):
    # diffusers reports the UNet's dtype as float8 under --fp8_base; sampling must compute in bf16 anyway.
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("sks red square --w 64 --h 64 --s 2 --d 7\n")
    out = tmp_path / "out"
    assert _run(tiny_sd_dir, _data_toml(tmp_path, tiny_images), out, "--max_train_steps", "2", "--fp8_base",
                "--mixed_precision", "bf16", "--sample_prompts", str(prompts), "--sample_at_first",
                "--sample_every_n_steps", "2") == 0
    assert "failed at step" not in capsys.readouterr().out
    names = sorted(p.name for p in (out / "sample").iterdir())
    assert names == ["lora_000000_00_7.png", "lora_000002_00_7.png"]
    assert Image.open(out / "sample" / names[1]).size == (64, 64)


# --- prompts encoded as in training; the prompt file read again; zero terminal SNR ---------------------


def test_long_prompts_are_encoded_like_training_captions_not_cut_at_77_tokens(tiny_sd_dir):
    """80 one-letter words of shared text push the difference past
    the 77-token window that the pipeline's own encoding keeps."""
    from library.families.sd import SDFamily
    from library.sampling import generate_image

    family = SDFamily.load(str(tiny_sd_dir), max_token_length=225)
    family.prepare(torch.device("cpu"), torch.float32, False, False)
    shared = "a " * 80
    first, second = (SamplePrompt(shared + tail, width=64, height=64, sample_steps=1, sample_sampler="euler")
                     for tail in ("red square", "blue circle"))
    embeds = family.sample_embeds(first.prompt, "")
    assert embeds["prompt_embeds"].shape == embeds["negative_prompt_embeds"].shape == (1, 227, 32)
    expected = family.encode_text([first.prompt])  # exactly what training computes for this caption
    assert torch.allclose(embeds["prompt_embeds"], expected, atol=1e-5)

    def image(prompt: SamplePrompt, embeds: dict | None) -> torch.Tensor:
        pipe = family.sample_pipeline()
        with torch.no_grad():
            return torch.tensor(list(generate_image(pipe, prompt, 1, pipe.scheduler.config, embeds).getdata()))

    with torch.no_grad():
        ours = [image(p, family.sample_embeds(p.prompt, "")) for p in (first, second)]
    assert (ours[0] - ours[1]).abs().sum() > 0, "the words after token 77 were lost"
    assert torch.equal(image(first, None), image(second, None))  # control: the pipeline's encoding cuts them


def test_samplers_that_ignore_zero_terminal_snr_are_refused_and_the_others_start_from_pure_noise(tmp_path):
    from diffusers import DDPMScheduler

    path = tmp_path / "p.txt"
    path.write_text("a --ss euler\nb --ss heun\n")
    with pytest.raises(UserError, match=r"p.txt, line 2: sampler 'heun' ignores the --zero_terminal_snr .* choose "
                                        r"one of ddim, euler, euler_a, dpmsolver, dpmsolver\+\+"):
        load_prompts(path, zero_terminal_snr=True)
    assert len(load_prompts(path)) == 2  # without zero terminal SNR heun is fine
    path.write_text("a --ss euler\nb\n")
    with pytest.raises(UserError, match="--sample_sampler: sampler 'pndm' ignores"):
        load_prompts(path, "pndm", zero_terminal_snr=True)
    config = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                           rescale_betas_zero_snr=True).config
    for name in ("ddim", "euler", "dpmsolver++"):
        scheduler = make_scheduler(name, config)
        scheduler.set_timesteps(4)
        assert float(scheduler.alphas_cumprod[-1]) < 1e-4 and int(scheduler.timesteps[0]) == 999, name


@pytest.mark.parametrize(("line", "message"), [
    ("a cat --w 64 --w 128", "--w is given twice"),
    ("a cat --w 5_12", "--w expects a whole number, got '5_12'"),
    ("a cat --l 7_5", "--l expects a number"),
])
def test_ambiguous_prompt_lines_are_refused(line, message):
    with pytest.raises(UserError, match=message):
        parse_prompt_line(line)


def test_a_tab_starts_an_option_and_json_null_means_unset(tmp_path):
    assert parse_prompt_line("a cat\t--w 64\t--h\t72") == SamplePrompt("a cat", width=64, height=72, where="prompt")
    path = tmp_path / "p.json"
    path.write_text('[{"prompt": "a", "negative_prompt": null, "seed": null, "width": 64}]')
    (prompt,) = load_prompts(path)
    assert (prompt.negative_prompt, prompt.seed, prompt.width) == ("", None, 64)


def test_unreadable_prompt_files_are_named(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 --w 64\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1.txt is not UTF-8 text \(byte 3\)"):
        load_prompts(path)
    with pytest.raises(UserError, match="is a folder"):
        load_prompts(tmp_path)


class _OneProcess:
    is_main_process, device, trackers = True, torch.device("cpu"), []

    def wait_for_everyone(self) -> None:
        pass


def test_the_prompt_file_is_read_again_when_it_changes_and_a_broken_edit_keeps_the_prompts(tmp_path):
    import os

    from library.sampling import PromptSource, TrainingSamples

    path = tmp_path / "p.txt"
    path.write_text("first --d 1\n")
    logged: list[str] = []
    family = type("Family", (), {"sample_pipeline": None, "name": "sd"})()
    samples = TrainingSamples(PromptSource(path), SampleSchedule(every_n_steps=1), accelerator=_OneProcess(),
                              family=family, network=torch.nn.Linear(1, 1), folder=tmp_path / "s",
                              output_name="x", seed=0, log=logged.append)
    sampled: list[list[str]] = []
    samples.sample = lambda step: sampled.append([p.prompt for p in samples.prompts])

    samples.maybe_sample(1)
    path.write_text("second --d 2\nthird\n")
    os.utime(path, ns=(1, 1))  # a different stamp even on a file system with coarse times
    samples.maybe_sample(2)
    path.write_text("broken --q 1\n")
    samples.maybe_sample(3)
    assert sampled == [["first"], ["second", "third"], ["second", "third"]]
    assert any("2 prompts read again" in line for line in logged)
    assert any("has an error, so the previous 2 prompts are used" in line and "'--q'" in line for line in logged)


def test_prompts_without_a_cadence_are_noted(tmp_path):
    from library.sampling import PromptSource, TrainingSamples

    path = tmp_path / "p.txt"
    path.write_text("a\n")
    logged: list[str] = []
    family = type("Family", (), {"sample_pipeline": None, "name": "sd"})()
    TrainingSamples(PromptSource(path), SampleSchedule(), accelerator=_OneProcess(), family=family,
                    network=torch.nn.Linear(1, 1), folder=tmp_path, output_name="x", seed=0, log=logged.append)
    assert any("--sample_prompts samples nothing without --sample_every_n_steps" in line for line in logged)


def test_an_edit_while_the_model_loads_is_picked_up_at_the_first_sampling(tmp_path):
    from library.sampling import PromptSource, TrainingSamples

    path = tmp_path / "p.txt"
    path.write_text("early\n")
    source = PromptSource(path)
    prompts = source.load()  # train_network.py reads the file before the model loads
    path.write_text("edited\n")  # ... and the user edits it meanwhile
    logged: list[str] = []
    family = type("Family", (), {"sample_pipeline": None, "name": "sd"})()
    samples = TrainingSamples(source, SampleSchedule(every_n_steps=1), accelerator=_OneProcess(), family=family,
                              network=torch.nn.Linear(1, 1), folder=tmp_path / "s", output_name="x", seed=0,
                              log=logged.append, prompts=prompts)
    sampled: list[list[str]] = []
    samples.sample = lambda step: sampled.append([p.prompt for p in samples.prompts])
    samples.maybe_sample(1)
    samples.maybe_sample(2)
    assert sampled == [["edited"], ["edited"]]
    assert sum("read again" in line for line in logged) == 1


def test_an_empty_prompt_file_samples_nothing_until_prompts_are_added(tmp_path):
    from library.sampling import PromptSource, TrainingSamples

    path = tmp_path / "prompt.txt"
    path.write_text("# the kohya_ss GUI writes this file even with no prompts\n")
    assert load_prompts(path) == []
    logged: list[str] = []
    family = type("Family", (), {"sample_pipeline": None, "name": "sd"})()
    samples = TrainingSamples(PromptSource(path), SampleSchedule(every_n_steps=1), accelerator=_OneProcess(),
                              family=family, network=torch.nn.Linear(1, 1), folder=tmp_path, output_name="x",
                              seed=0, log=logged.append)
    assert samples.prompts == [] and any("holds no prompts: nothing is sampled" in line for line in logged)
    path.write_text("now a prompt\n")
    samples.refresh_prompts()
    assert [p.prompt for p in samples.prompts] == ["now a prompt"]


def test_without_a_cadence_the_prompt_file_is_not_read(tmp_path, tiny_sd_dir, tiny_images, capsys):
    out = tmp_path / "out"
    # sd-scripts reads the file only when a sample is due; the GUI names a file in every config
    assert _run(tiny_sd_dir, _data_toml(tmp_path, tiny_images), out, "--max_train_steps", "1",
                "--sample_prompts", str(tmp_path / "never-written.txt")) == 0
    assert "the prompt file is not read" in capsys.readouterr().out


def test_a1111_random_seed_minus_one_means_the_default_seed(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a --d -1\nb --d 5\n")
    a, b = load_prompts(path)
    assert (a.seed, b.seed) == (None, 5)  # None: run seed + the prompt's index, as without --d
    path.write_text("c --d -2\n")
    with pytest.raises(UserError, match="seed = -2 is out of range"):
        load_prompts(path)
