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


def test_scale_v_and_debiased_weights_exact():
    from library.families.diffusion import debiased_weight

    alphas = torch.tensor([0.5, 0.8])  # SNR = 1 and 4
    losses = torch.ones(2)
    none = torch.tensor([False, False])
    t = torch.tensor([0, 1])
    v = weighted_loss(losses, none, t, alphas, NoiseSettings(scale_v_pred_loss_like_noise_pred=True))
    assert v.item() == pytest.approx((1 / 2 + 4 / 5) / 2)
    assert debiased_weight(torch.tensor([1.0, 4.0]), v_prediction=False).tolist() == [1.0, 0.5]
    assert debiased_weight(torch.tensor([1.0, 4.0]), v_prediction=True).tolist() == pytest.approx([0.5, 0.2])
    d = weighted_loss(losses, none, t, alphas, NoiseSettings(debiased_estimation_loss=True))
    assert d.item() == pytest.approx(0.75)


def test_noise_is_keyed_per_sample_and_options_change_it():
    from library.families.diffusion import draw_noise_and_timesteps

    latents = torch.zeros(2, 4, 8, 8)
    base = NoiseSettings()
    n1, t1 = draw_noise_and_timesteps(latents, 1, 0, torch.tensor([3, 7]), base)
    n2, t2 = draw_noise_and_timesteps(latents[:1], 1, 0, torch.tensor([7]), base)
    assert torch.equal(n1[1], n2[0]) and t1[1] == t2[0]  # the same sample draws the same, whatever the batch
    offset, _ = draw_noise_and_timesteps(latents, 1, 0, torch.tensor([3, 7]), NoiseSettings(noise_offset=0.1))
    per_channel_shift = (offset - n1).mean(dim=(2, 3))
    assert torch.allclose(offset - n1, per_channel_shift[..., None, None].expand_as(n1), atol=1e-6)
    assert per_channel_shift.abs().max() > 0
    weak, _ = draw_noise_and_timesteps(latents, 1, 0, torch.tensor([3, 7]),
                                       NoiseSettings(noise_offset=0.1, noise_offset_random_strength=True))
    assert ((weak - n1).abs() <= (offset - n1).abs() + 1e-6).all()
    multi, _ = draw_noise_and_timesteps(latents, 1, 0, torch.tensor([3, 7]),
                                        NoiseSettings(multires_noise_iterations=3, multires_noise_discount=0.3))
    assert not torch.allclose(multi, n1)
    assert torch.allclose(multi.flatten(1).std(dim=1), torch.ones(2), atol=1e-5)


def test_zero_terminal_snr_schedule(tiny_sd_dir):
    from library.families.sd import SDFamily

    family = SDFamily.load(str(tiny_sd_dir), noise=NoiseSettings(zero_terminal_snr=True))
    assert family.scheduler.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-8)
    plain = SDFamily.load(str(tiny_sd_dir))
    assert plain.scheduler.alphas_cumprod[-1].item() > 1e-4


def test_throughput_counts_samples_and_tokens():
    from library.train_setup import Throughput

    meter = Throughput()
    ticks = iter([10.0, 12.0])
    meter._clock = lambda: next(ticks)
    meter._start = 8.0
    meter.add({"indices": torch.arange(4), "input_ids": torch.zeros(4, 16)})
    rates = meter.rates(num_processes=2)
    assert rates == {"throughput/samples_per_s": 4.0, "throughput/tokens_per_s": 64.0}  # 8 samples, 128 tokens / 2 s


def test_max_token_length_encodes_long_prompts_in_chunks(tiny_sd_dir):
    from library.families.sd import SDFamily

    short = SDFamily.load(str(tiny_sd_dir))
    long = SDFamily.load(str(tiny_sd_dir), max_token_length=150)
    caption = "a, b, c, d"
    with torch.no_grad():
        plain = short.encode_text([caption])
        chunked = long.encode_text([caption])
    assert plain.shape[1] == 77 and chunked.shape[1] == 152
    # the first chunk holds the whole caption: its <bos> and 75 tokens equal the plain encoding's
    assert torch.allclose(chunked[:, :76], plain[:, :76], atol=1e-6)
    # a caption of 100 characters (one token each) reaches into the second chunk and changes it
    words = " ".join(["x"] * 100)
    with torch.no_grad():
        a = long.encode_text([words])
        b = long.encode_text([" ".join(["x"] * 90)])
    assert not torch.allclose(a[:, 76:151], b[:, 76:151])


def test_input_perturbation_exact_values_and_the_target_stays_the_noise():
    from diffusers import DDPMScheduler

    from library.families.diffusion import (
        DRAW_IP_NOISE,
        DRAW_IP_STRENGTH,
        denoising_loss,
        draw_noise_and_timesteps,
        perturbed_noise,
    )
    from library.rng import sample_generator

    latents, indices = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 7])
    noise, timesteps = draw_noise_and_timesteps(latents, 1, 0, indices, NoiseSettings())
    extra = torch.stack([torch.randn(4, 8, 8, generator=sample_generator(1, 0, i, DRAW_IP_NOISE)) for i in (3, 7)])
    fixed = perturbed_noise(noise, 1, 0, indices, NoiseSettings(ip_noise_gamma=0.1))
    assert torch.equal(fixed, noise + 0.1 * extra)
    u = [torch.rand(1, generator=sample_generator(1, 0, i, DRAW_IP_STRENGTH)).item() for i in (3, 7)]
    random_strength = NoiseSettings(ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True)
    random = perturbed_noise(noise, 1, 0, indices, random_strength)
    for row, strength in enumerate(u):
        assert torch.allclose(random[row], noise[row] + 0.1 * strength * extra[row], atol=1e-7)
    assert u[0] != u[1]  # a strength per sample
    # keyed per sample: sample 7 alone perturbs as in the batch
    alone = perturbed_noise(noise[1:], 1, 0, indices[1:], NoiseSettings(ip_noise_gamma=0.1))
    assert torch.equal(alone[0], fixed[1])
    assert torch.equal(perturbed_noise(noise, 1, 0, indices, NoiseSettings()), noise)  # off by default

    # in the loss: the model sees latents noised with the perturbed noise, the target is the plain noise
    scheduler, seen = DDPMScheduler(num_train_timesteps=1000), {}

    def predict(noisy, t):
        seen["noisy"] = noisy
        return torch.zeros_like(noisy)

    s = NoiseSettings(ip_noise_gamma=0.1)
    loss = denoising_loss(predict, latents, indices, torch.tensor([False, False]), 1, 0, scheduler, s)
    assert torch.allclose(seen["noisy"], scheduler.add_noise(latents, noise + 0.1 * extra, timesteps))
    assert loss.item() == pytest.approx(noise.pow(2).mean().item(), rel=1e-6)  # zero prediction: mean(target^2)


def test_huber_schedules_exact_values():
    from library.families.diffusion import huber_c_at

    alphas = torch.tensor([0.5, 0.8, 0.2, 0.1])  # sigma = sqrt((1 - a) / a): 1, 0.5, 2, 3
    t = torch.tensor([0, 1, 2])
    assert huber_c_at(t, alphas, 0.1, "constant").tolist() == pytest.approx([0.1, 0.1, 0.1])
    # exponential: huber_c ** (t / T), T = 4 training timesteps
    assert huber_c_at(t, alphas, 0.1, "exponential").tolist() == pytest.approx([1.0, 0.1**0.25, 0.1**0.5])
    # snr: (1 - c) / (1 + sigma)^2 + c
    assert huber_c_at(t, alphas, 0.1, "snr").tolist() == pytest.approx([0.9 / 4 + 0.1, 0.9 / 2.25 + 0.1, 0.2])
    # per-sample parameters in the loss: 2c(sqrt(d^2 + c^2) - c) with each sample's own c
    pred, target = torch.tensor([[1.0], [1.0]]), torch.zeros(2, 1)
    c = torch.tensor([1.0, 0.5])
    expected = [2 * (2**0.5 - 1), 2 * 0.5 * ((1 + 0.25) ** 0.5 - 0.5)]
    assert per_sample_loss(pred, target, "huber", c).tolist() == pytest.approx(expected)
    assert per_sample_loss(pred, target, "smooth_l1", c).tolist() == pytest.approx(
        [2 * (2**0.5 - 1), 2 * ((1 + 0.25) ** 0.5 - 0.5)])


def test_huber_schedule_reaches_the_loss():
    from diffusers import DDPMScheduler

    from library.families.diffusion import denoising_loss, draw_noise_and_timesteps, huber_c_at

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    latents, indices, no_reg = torch.zeros(2, 4, 8, 8), torch.tensor([0, 1]), torch.tensor([False, False])
    noise, t = draw_noise_and_timesteps(latents, 2, 0, indices, NoiseSettings())
    pred, losses = torch.ones_like(latents), set()
    for schedule in ("constant", "exponential", "snr"):
        s = NoiseSettings(loss_type="huber", huber_c=0.1, huber_schedule=schedule)
        got = denoising_loss(lambda noisy, ts: pred, latents, indices, no_reg, 2, 0, scheduler, s)
        c = huber_c_at(t, scheduler.alphas_cumprod, 0.1, schedule)
        assert got.item() == pytest.approx(per_sample_loss(pred, noise, "huber", c).mean().item(), rel=1e-6)
        losses.add(round(got.item(), 6))
    assert len(losses) == 3  # each schedule gives its own loss


def test_huber_scale_as_sd_scripts():
    """--huber_scale multiplies the constant and exponential schedules; snr ignores it (as sd-scripts)."""
    from diffusers import DDPMScheduler

    from library.families.diffusion import denoising_loss, draw_noise_and_timesteps, huber_c_at

    alphas, t = torch.tensor([0.5, 0.8, 0.2, 0.1]), torch.tensor([0, 1, 2])
    assert huber_c_at(t, alphas, 0.1, "constant", 3.0).tolist() == pytest.approx([0.3, 0.3, 0.3])
    assert huber_c_at(t, alphas, 0.1, "exponential", 3.0).tolist() == pytest.approx(
        [3.0, 3 * 0.1**0.25, 3 * 0.1**0.5])
    assert huber_c_at(t, alphas, 0.1, "snr", 3.0).tolist() == huber_c_at(t, alphas, 0.1, "snr").tolist()
    # and the value reaches the loss the trainer computes
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    latents, indices, no_reg = torch.zeros(2, 4, 8, 8), torch.tensor([0, 1]), torch.tensor([False, False])
    noise, t = draw_noise_and_timesteps(latents, 2, 0, indices, NoiseSettings())
    pred = torch.ones_like(latents)
    s = NoiseSettings(loss_type="huber", huber_c=0.1, huber_schedule="constant", huber_scale=2.0)
    got = denoising_loss(lambda noisy, ts: pred, latents, indices, no_reg, 2, 0, scheduler, s)
    assert got.item() == pytest.approx(per_sample_loss(pred, noise, "huber", 0.2).mean().item(), rel=1e-6)


def test_long_prompt_chunks_follow_sd_scripts_when_pad_is_not_eos():
    """SDXL's second tokenizer pads with "!": a chunk keeps the sequence's <pad> end unless its text runs up to
    it, and a chunk without text starts <bos> <eos> (sd-scripts' layout, what its LoRAs were trained on)."""
    from library.families.diffusion_parts import token_chunks
    from library.tiny_models import tiny_clip_tokenizer

    tokenizer = tiny_clip_tokenizer()
    tokenizer.pad_token = "!"
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    assert pad != eos
    encoder = type("Encoder", (), {"device": torch.device("cpu")})()  # only its device is read
    short = tokenizer(["a b"]).input_ids[0][1:-1]  # the caption's own tokens
    first, second = token_chunks(tokenizer, encoder, ["a b"], 150)
    assert first[0].tolist() == [bos, *short, eos] + [pad] * (75 - len(short) - 1) + [pad]
    assert second[0].tolist() == [bos, eos] + [pad] * 74 + [pad]
    # text that fills the first chunk to its end gets an <eos> there
    long = " ".join(["a"] * 80)
    first, second = token_chunks(tokenizer, encoder, [long], 150)
    assert first[0, -1].item() == eos and second[0, 1].item() != eos


def test_v_pred_like_loss_adds_the_v_scaled_loss_exactly():
    alphas = torch.tensor([0.5, 0.8])  # SNR = 1 and 4
    none, t = torch.tensor([False, False]), torch.tensor([0, 1])
    out = weighted_loss(torch.ones(2), none, t, alphas, NoiseSettings(v_pred_like_loss=0.1))
    # sd-scripts: loss + 0.1 · loss / (SNR / (SNR + 1)) per sample, then the mean
    assert out.item() == pytest.approx(((1 + 0.1 * 2 / 1) + (1 + 0.1 * 5 / 4)) / 2)


def test_adaptive_noise_scale_follows_each_channels_mean():
    from library.families.diffusion import draw_noise_and_timesteps

    latents = torch.zeros(2, 4, 8, 8)
    latents[0, 1] = 3.0  # one channel of one sample far from zero
    idx = torch.tensor([3, 7])
    plain, _ = draw_noise_and_timesteps(latents, 1, 0, idx, NoiseSettings())
    fixed, _ = draw_noise_and_timesteps(latents, 1, 0, idx, NoiseSettings(noise_offset=0.1))
    adaptive, _ = draw_noise_and_timesteps(latents, 1, 0, idx, NoiseSettings(noise_offset=0.1,
                                                                             adaptive_noise_scale=0.05))
    shift_fixed = (fixed - plain)[..., 0, 0]  # per (sample, channel): 0.1 · offset
    shift_adaptive = (adaptive - plain)[..., 0, 0]
    expected = shift_fixed.clone()
    expected[0, 1] *= (0.1 + 0.05 * 3.0) / 0.1  # only the channel with a mean gets a stronger offset
    assert torch.allclose(shift_adaptive, expected, atol=1e-6)
    # a negative scale never makes the strength negative
    negative, _ = draw_noise_and_timesteps(latents, 1, 0, idx, NoiseSettings(noise_offset=0.1,
                                                                             adaptive_noise_scale=-1.0))
    assert torch.allclose((negative - plain)[0, 1], torch.zeros(8, 8), atol=1e-6)


@pytest.mark.parametrize("extra, message", [
    (["--adaptive_noise_scale", "0.01"], "needs --noise_offset"),
    (["--v_pred_like_loss", "0.1", "--zero_terminal_snr"], "drop one of them"),
])
def test_noise_option_combinations_are_refused(extra, message):
    from library.args import build_parser
    from library.train_setup import noise_settings

    with pytest.raises(UserError, match=message):
        noise_settings(build_parser().parse_args(extra))
