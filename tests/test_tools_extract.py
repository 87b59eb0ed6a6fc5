"""tools/extract.py: a LoRA from a fine-tuned minus a base model reproduces the difference and loads in diffusers."""

from __future__ import annotations

import copy

import pytest
import safetensors.torch
import torch
from test_tools_common import module_table, pristine_pipe, state_deltas

from library.lora_files import read_metadata
from library.tiny_models import save_tiny_sd
from tools import extract


def unet_output(unet) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    latents, context = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 7, 32, generator=gen)
    with torch.no_grad():
        return unet(latents, torch.tensor([10, 700]), encoder_hidden_states=context).sample


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A base folder and a 'fine-tuned' folder whose target weights moved by known rank-2 deltas."""
    folder = tmp_path_factory.mktemp("extract")
    base = save_tiny_sd(folder / "base", seed=0)
    tuned_pipe = copy.deepcopy(pristine_pipe())
    gen = torch.Generator().manual_seed(5)
    deltas = {}
    with torch.no_grad():
        for i, (name, module) in enumerate(sorted(module_table(tuned_pipe).items())):
            if i % 7 == 3:
                continue  # some modules stay unchanged
            w = module.weight
            delta = torch.randn(w.shape[0], 2, generator=gen) @ torch.randn(2, w[0].numel(), generator=gen)
            delta = delta.reshape(w.shape) * 0.01
            w += delta
            deltas[name] = delta
    tuned_pipe.save_pretrained(folder / "tuned")
    return folder, base, folder / "tuned", deltas, tuned_pipe


def test_extract_reproduces_low_rank_difference(models, capsys):
    folder, base, tuned, deltas, tuned_pipe = models
    out = folder / "diff.safetensors"
    args = ["--model_org", str(base), "--model_tuned", str(tuned), "--save_to", str(out), "--dim", "4",
            "--conv_dim", "3"]  # fmt: skip
    assert extract.main(args) == 0
    report = capsys.readouterr().out
    assert f"{len(deltas)} modules extracted" in report
    sd = safetensors.torch.load_file(out)
    got = state_deltas(sd)
    assert set(got) == set(deltas)  # unchanged modules are left out, nothing else
    for name, want in deltas.items():
        # float32 weights: (W + Δ) - W carries ~1e-7 rounding, far below any rank error
        assert float((got[name] - want.double()).norm() / want.norm()) < 1e-4, name
    # ranks: linear 4, 3x3 conv 3 (capped by the matrix size where smaller)
    assert {v.shape[0] for k, v in sd.items() if k.endswith("down.weight") and v.dim() == 2} == {4}
    assert {v.shape[0] for k, v in sd.items() if k.endswith("down.weight") and v.dim() == 4 and v.shape[-1] == 3} == {3}
    meta = read_metadata(str(out))
    assert meta["ss_network_dim"] == "4" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora" and "sshs_model_hash" in meta

    # diffusers loads the file into the base pipeline and gives the tuned UNet's output
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(base), safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(folder), weight_name=out.name)
    assert not torch.allclose(unet_output(pristine_pipe().unet), unet_output(tuned_pipe.unet), atol=1e-3)
    assert torch.allclose(unet_output(pipe.unet), unet_output(tuned_pipe.unet), atol=1e-4)


def test_low_dim_reports_error_and_linear_only_without_conv_dim(models, capsys):
    folder, base, tuned, deltas, _ = models
    out = folder / "dim1.safetensors"
    assert extract.main(["--model_org", str(base), "--model_tuned", str(tuned), "--save_to", str(out),
                         "--dim", "1", "--save_precision", "fp16"]) == 0  # fmt: skip
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("lora_")]
    errors = [float(ln.rsplit("error", 1)[1]) for ln in lines]
    assert errors and min(errors) > 1e-3  # rank 2 deltas cannot fit rank 1
    sd = safetensors.torch.load_file(out)
    assert all(v.dim() == 2 or v.shape[-1] == 1 for v in sd.values() if v.dim() > 0)  # no 3x3 modules
    assert {v.dtype for v in sd.values()} == {torch.float16}


def test_same_model_twice_is_an_error(models, capsys):
    folder, base, *_ = models
    code = extract.main(["--model_org", str(base), "--model_tuned", str(base), "--save_to",
                         str(folder / "none.safetensors")])  # fmt: skip
    assert code == 2 and "do not differ" in capsys.readouterr().err


def test_v2_on_an_sd1_base_is_refused(models, capsys):
    folder, base, tuned, *_ = models
    out = folder / "v2.safetensors"
    code = extract.main(["--model_org", str(base), "--model_tuned", str(tuned), "--save_to", str(out), "--v2"])
    err = capsys.readouterr().err
    assert code == 2 and f"--v2: {base} is an SD 1.x model" in err, err
    assert not out.exists()


def test_sd_scripts_load_options_are_ignored_with_a_reason(models, tmp_path, capsys):
    folder, base, tuned, deltas, _ = models
    out = tmp_path / "diff.safetensors"
    args = ["--model_org", str(base), "--model_tuned", str(tuned), "--save_to", str(out), "--dim", "2",
            "--load_precision", "fp16", "--load_original_model_to", "cpu", "--load_tuned_model_to", "cpu"]
    assert extract.main(args) == 0
    printed = capsys.readouterr().out
    for name in ("load_precision", "load_original_model_to", "load_tuned_model_to"):
        assert f"--{name} (sd-scripts) is ignored" in printed
    assert out.exists()


def test_single_file_checkpoints_extract_as_their_folders(models, tmp_path, capsys):
    """sd-scripts' extract reads single-file checkpoints (A1111 / Civitai models); so does this one, and the result is
    the folders' result. A mismatch of the two models is named before either loads."""
    from diffusers import StableDiffusionPipeline
    from test_single_file import config_copy

    from library.single_file import save_original

    folder, base, tuned, deltas, tuned_pipe = models
    base_pipe = StableDiffusionPipeline.from_pretrained(str(base), safety_checker=None, requires_safety_checker=False)
    base_file = save_original(tmp_path / "base.safetensors", base_pipe.unet, base_pipe.vae, [base_pipe.text_encoder])
    tuned_file = save_original(tmp_path / "tuned.safetensors", tuned_pipe.unet, tuned_pipe.vae,
                               [tuned_pipe.text_encoder])  # fmt: skip
    configs = config_copy(base, tmp_path / "configs")  # the tiny architecture (a real SD 1.5 needs none)
    from_folders, from_files = tmp_path / "folders.safetensors", tmp_path / "files.safetensors"
    common = ["--dim", "4", "--conv_dim", "3", "--model_config_dir", str(configs)]
    assert extract.main(["--model_org", str(base), "--model_tuned", str(tuned), "--save_to", str(from_folders),
                         *common]) == 0  # fmt: skip
    assert extract.main(["--model_org", str(base_file), "--model_tuned", str(tuned_file), "--save_to",
                         str(from_files), *common]) == 0, capsys.readouterr().err  # fmt: skip
    want, got = state_deltas(safetensors.torch.load_file(from_folders)), state_deltas(safetensors.torch.load_file(
        from_files))
    assert set(got) == set(want) == set(deltas)
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-6), name

    from library.tiny_models import save_tiny_sdxl

    sdxl = save_tiny_sdxl(tmp_path / "sdxl")
    out = tmp_path / "mixed.safetensors"
    assert extract.main(["--model_org", str(base_file), "--model_tuned", str(sdxl), "--save_to", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--model_org {base_file} is SD 1.x but --model_tuned {sdxl} is SDXL" in err and not out.exists()
