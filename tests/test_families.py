"""Model-family detection and the diffusion loss math (exact values)."""

from __future__ import annotations

import json

import pytest
import torch

from library.errors import UserError
from library.families import detect_model_type
from library.families.diffusion import NoiseSettings, min_snr_weight, per_sample_loss, weighted_loss


def test_detects_sd_folder(tiny_sd_dir):
    assert detect_model_type(tiny_sd_dir) == "sd"


def test_detects_sdxl_and_llm_folders(tmp_path):
    xl = tmp_path / "xl"
    (xl / "unet").mkdir(parents=True)
    (xl / "unet" / "config.json").write_text(json.dumps({"addition_embed_type": "text_time"}))
    assert detect_model_type(xl) == "sdxl"
    xl2 = tmp_path / "xl2"
    (xl2 / "text_encoder_2").mkdir(parents=True)
    assert detect_model_type(xl2) == "sdxl"
    llm = tmp_path / "llm"
    llm.mkdir()
    (llm / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert detect_model_type(llm) == "llm"


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "not a model folder"),
    (lambda p: (p / "x.ckpt").write_bytes(b"0") and p / "x.ckpt", "single-file"),
])
def test_not_a_model_is_a_clear_error(tmp_path, make, message):
    with pytest.raises(UserError, match=message):
        detect_model_type(make(tmp_path))


def test_per_sample_losses_exact():
    pred = torch.tensor([[1.0, 3.0], [0.0, 0.0]])
    target = torch.tensor([[0.0, 1.0], [0.0, 2.0]])
    assert per_sample_loss(pred, target, "l2", 0.1).tolist() == [2.5, 2.0]
    assert per_sample_loss(pred, target, "l1", 0.1).tolist() == [1.5, 1.0]
    huber = per_sample_loss(pred, target, "huber", 1.0)
    # 2c(sqrt(d^2 + c^2) - c) with c = 1: d=1 -> 2(sqrt2 - 1), d=2 -> 2(sqrt5 - 1)
    expected = torch.tensor([(2 * (2**0.5 - 1) + 2 * (5**0.5 - 1)) / 2, (0 + 2 * (5**0.5 - 1)) / 2])
    assert torch.allclose(huber, expected)


def test_min_snr_weights_exact():
    snr = torch.tensor([1.0, 10.0])
    assert min_snr_weight(snr, 5.0, v_prediction=False).tolist() == [1.0, 0.5]
    assert torch.allclose(min_snr_weight(snr, 5.0, v_prediction=True), torch.tensor([0.5, 5.0 / 11.0]))


def test_prior_loss_weight_applies_to_regularisation_samples():
    losses = torch.tensor([1.0, 1.0])
    s = NoiseSettings(prior_loss_weight=0.5)
    out = weighted_loss(losses, torch.tensor([False, True]), torch.tensor([0, 0]), torch.ones(10) * 0.5, s)
    assert out.item() == pytest.approx(0.75)
