"""--weighted_captions: training captions take A1111 weighting, encoded as sample prompts are."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.test_prompt_weighting import sd_family, sdxl_family  # noqa: F401  (fixtures)


def test_off_by_default_the_syntax_is_plain_text(sd_family):  # noqa: F811
    with torch.no_grad():
        literal = sd_family.encode_text(["(b:1.5) c"])
        weighted = dataclasses.replace(sd_family, weighted_captions=True).encode_text(["(b:1.5) c"])
    assert literal.shape == weighted.shape and not torch.allclose(literal, weighted)


@pytest.mark.parametrize("max_token_length", [None, 225])
def test_sd_captions_are_weighted_and_plain_ones_unchanged(sd_family, max_token_length):  # noqa: F811
    plain = dataclasses.replace(sd_family, max_token_length=max_token_length)
    weighted = dataclasses.replace(plain, weighted_captions=True)
    with torch.no_grad():
        reference = plain.encode_text(["b c", "a long caption, " * 20])
        out = weighted.encode_text(["(b:1.5) c", "a long caption, " * 20])
    assert torch.equal(out[1], reference[1])  # a caption without the syntax: exactly the plain encoding
    check_training_weighted(out[:1], reference[:1], 1, 1.5)


def check_training_weighted(weighted: torch.Tensor, plain: torch.Tensor, position: int, weight: float) -> None:
    """As sd-scripts' training: the weighted token's hidden state times its weight, nothing rescaled."""
    assert weighted.shape == plain.shape
    assert torch.allclose(weighted[:, position], plain[:, position] * weight, atol=1e-6)
    others = [i for i in range(plain.shape[1]) if i != position]
    assert torch.equal(weighted[:, others], plain[:, others])


def test_break_in_a_training_caption_keeps_the_training_length(sd_family, sdxl_family):  # noqa: F811
    # Every caption of a batch (and of a text-encoder cache) needs one length: BREAK only moves the text on to
    # the next chunk within the --max_token_length budget, and a plain batch-mate stays as it was.
    for family, width in ((sd_family, 32), (sdxl_family, 64)):
        weighted = dataclasses.replace(family, weighted_captions=True)
        with torch.no_grad():
            plain = family.encode_text(["b c"])
            both = weighted.encode_text(["a BREAK b", "b c"])
            both = both[0] if isinstance(both, tuple) else both
            plain = plain[0] if isinstance(plain, tuple) else plain
        assert both.shape == (2, 77, width)
        assert torch.equal(both[1:], plain)
        long = dataclasses.replace(weighted, max_token_length=150)
        with torch.no_grad():
            out = long.encode_text(["a BREAK b", "b c"])
        assert (out[0] if isinstance(out, tuple) else out).shape == (2, 152, width)


def test_sd_gradients_flow_through_weighting_when_the_text_encoder_trains(sd_family):  # noqa: F811
    family = dataclasses.replace(sd_family, weighted_captions=True, train_text_encoder=True)
    weight = family.text_encoder.get_input_embeddings().weight
    weight.requires_grad_(True)
    try:
        family.encode_text(["(b:1.5) c"]).sum().backward()
        assert weight.grad is not None and weight.grad.abs().sum() > 0
    finally:
        weight.requires_grad_(False)
        weight.grad = None


def test_sdxl_captions_are_weighted_on_both_encoders_not_the_pooled(sdxl_family):  # noqa: F811
    weighted = dataclasses.replace(sdxl_family, weighted_captions=True)
    with torch.no_grad():
        context, pooled = sdxl_family.encode_text(["b c"])
        w_context, w_pooled = weighted.encode_text(["(b:1.5) c"])
    for half in (slice(0, 32), slice(32, 64)):
        check_training_weighted(w_context[..., half], context[..., half], 1, 1.5)
    assert torch.equal(w_pooled, pooled)


def test_the_option_reaches_the_family_and_is_refused_for_an_llm():
    from library.args import build_parser
    from library.families.llm import IMAGE_ONLY_ARGUMENTS

    assert build_parser().parse_args(["--weighted_captions"]).weighted_captions
    assert "weighted_captions" in IMAGE_ONLY_ARGUMENTS


def test_a_training_run_encodes_its_captions_weighted(tmp_path, tiny_sd_dir, tiny_images, monkeypatch):
    import train_network
    from library.families.sd import SDFamily

    seen: list[bool] = []
    original = SDFamily.encode_text

    def spy(self, captions):
        with torch.no_grad():  # the weighting is applied: these captions encode differently from plain text
            plain = original(dataclasses.replace(self, weighted_captions=False), captions)
        out = original(self, captions)
        seen.append(self.weighted_captions and not torch.equal(out.detach(), plain))
        return out

    monkeypatch.setattr(SDFamily, "encode_text", spy)
    data = tmp_path / "data.toml"
    data.write_text(f'[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n  image_dir = "{tiny_images}"\n'
                    '  caption_prefix = "(big:1.5)"\n')
    argv = ["--pretrained_model_name_or_path", str(tiny_sd_dir), "--dataset_config", str(data), "--output_dir",
            str(tmp_path / "out"), "--max_train_steps", "1", "--network_dim", "4", "--weighted_captions"]
    assert train_network.main(argv) == 0
    assert seen and all(seen)


def test_tag_shuffling_with_weighted_captions_is_warned_about(caplog):
    from pathlib import Path
    from types import SimpleNamespace

    from library.dataset_config import DatasetConfig, SubsetConfig
    from library.model_setup import warn_weighted_tag_splits

    shuffled = DatasetConfig(subsets=(SubsetConfig(image_dir=Path("a"), shuffle_caption=True, name="s0"),))
    warn_weighted_tag_splits([SimpleNamespace(config=shuffled)])
    assert "(red hair:1.2), (blue eyes:1.2)" in caplog.text and "s0" in caplog.text
    caplog.clear()
    plain = DatasetConfig(subsets=(SubsetConfig(image_dir=Path("a")),))
    warn_weighted_tag_splits([SimpleNamespace(config=plain)])
    assert caplog.text == ""
