"""A1111 attention syntax in sample prompts (library/prompt_weighting.py): parsing, chunks, and the embeddings
the SD and SDXL families hand the sampling pipeline."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from library.prompt_weighting import apply_weights, parse_attention, weighted_chunks

# --- parsing ------------------------------------------------------------------------------------------------

W = 1.1  # the factor of one pair of round brackets


def assert_sections(sections, expected) -> None:
    """The same sections and runs of text, with weights equal up to float rounding (1.1 * 1.1 != 1.21)."""
    assert [[run for run, _ in runs] for runs in sections] == [[run for run, _ in runs] for runs in expected]
    flat = [weight for runs in sections for _, weight in runs]
    assert flat == pytest.approx([weight for runs in expected for _, weight in runs])


@pytest.mark.parametrize(("text", "expected"), [
    ("plain text, no syntax", [[("plain text, no syntax", 1.0)]]),
    ("", [[]]),
    ("(a:1.5)", [[("a", 1.5)]]),
    ("x (a : 0.5 ) y", [[("x ", 1.0), ("a ", 0.5), (" y", 1.0)]]),  # A1111 allows spaces around the number
    ("(a)", [[("a", W)]]),
    ("((a))", [[("a", W * W)]]),
    ("[a]", [[("a", 1 / W)]]),
    ("[[a]]", [[("a", 1 / W / W)]]),
    ("((a:1.5) b)", [[("a", 1.5 * W), (" b", W)]]),
    ("(a)(b)", [[("ab", W)]]),  # neighbouring runs of one weight are joined
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",  # A1111's own docstring example
     [[("a ", 1.0), ("house", 1.3 * W * W), (" ", W), ("on", 1.0), (" a ", W), ("hill", 0.55), (", sun, ", W),
       ("sky", W ** 4), (".", W)]]),
    (r"\(a\) \[b\] c\\d", [[("(a) [b] c\\d", 1.0)]]),  # escapes are the literal characters
    (r"(\(a\):1.2)", [[("(a)", 1.2)]]),
    ("a:b, c\\d", [[("a:b, c\\d", 1.0)]]),  # a lone ':' or '\' is text
    ("(a:1.2.3)", [[("a:1.2.3", W)]]),  # not a number: text inside ordinary brackets (A1111 raises here)
])
def test_parsing(text, expected):
    assert_sections(parse_attention(text), expected)


@pytest.mark.parametrize(("text", "expected"), [
    ("(a", [[("a", W)]]),  # a bracket left open weighs the rest of the prompt
    ("x [a", [[("x ", 1.0), ("a", 1 / W)]]),
    ("a) b] c", [[("a) b] c", 1.0)]]),  # a closing bracket with nothing to close is text
    ("a:1.5) b", [[("a:1.5) b", 1.0)]]),
    ("(a]", [[("a]", W)]]),
    ("((a) b", [[("a", W * W), (" b", W)]]),
])
def test_unbalanced_brackets_do_not_crash_and_behave_like_a1111(text, expected):
    assert_sections(parse_attention(text), expected)


def test_break_separates_sections_only_as_an_upper_case_word():
    assert parse_attention("a, b BREAK c") == [[("a, b", 1.0)], [("c", 1.0)]]
    assert parse_attention("BREAK a") == [[], [("a", 1.0)]]
    assert parse_attention("(a BREAK b:2)") == [[("a", 2.0)], [("b", 2.0)]]
    for text in ("BREAKfast", "a break b", "xBREAK"):
        assert parse_attention(text) == [[(text, 1.0)]]


# --- chunks -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from library.tiny_models import tiny_clip_tokenizer

    return tiny_clip_tokenizer()  # one token per character


def test_break_starts_a_chunk_and_long_prompts_are_cut_where_training_cuts_them(tokenizer):
    a, b = tokenizer("a b", add_special_tokens=False).input_ids
    chunks = weighted_chunks(tokenizer, "a BREAK (b:2)", None)
    assert [(c.ids, c.weights) for c in chunks] == [([a], [1.0]), ([b], [2.0])]
    assert [len(c.ids) for c in weighted_chunks(tokenizer, "a " * 100, None)] == [75]
    assert [len(c.ids) for c in weighted_chunks(tokenizer, "a " * 100, 225)] == [75, 25]
    # With BREAK, up to three chunks at any --max_token_length (else the text after it would be lost).
    assert [len(c.ids) for c in weighted_chunks(tokenizer, "a " * 100 + "BREAK b", None)] == [75, 25, 1]
    assert len(weighted_chunks(tokenizer, "a BREAK b BREAK c BREAK d", None)) == 3


@pytest.mark.parametrize("max_token_length", [None, 150, 225])
def test_token_ids_of_plain_prompts_are_trainings_even_where_padding_is_not_eos(tokenizer, max_token_length):
    """SDXL's second tokenizer pads with "!", not <eos>: the layout after the text must still be training's
    (library/families/diffusion_parts.py token_chunks), for every way a prompt can end within a chunk."""
    from library.families.diffusion_parts import token_chunks
    from library.prompt_weighting import chunk_budget, encoder_inputs
    from library.tiny_models import tiny_clip_text_encoder

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.pad_token = "!"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    encoder = tiny_clip_text_encoder(len(tokenizer))
    texts = ["", "sks", "x" * 74, "x" * 75, "x" * 76, "y" * 149, "y" * 150, "z" * 151, "w" * 300]
    expected = token_chunks(tokenizer, encoder, texts, max_token_length)
    count = chunk_budget(max_token_length)
    ids, weights = encoder_inputs(tokenizer, [weighted_chunks(tokenizer, t, max_token_length) for t in texts],
                                  count, encoder.device)
    assert len(ids) == len(expected) == count
    for ours, theirs in zip(ids, expected, strict=True):
        assert torch.equal(ours, theirs)
    assert weights.shape == (len(texts), 2 + 75 * count) and bool((weights == 1).all())


def test_apply_weights_leaves_unweighted_prompts_alone_and_never_flips_the_sign():
    hidden = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0))
    weights = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 1.0, 1.0]])
    out = apply_weights(hidden, weights)
    assert torch.equal(out[0], hidden[0])
    assert out[1].mean() == pytest.approx(hidden[1].mean().item(), rel=1e-5)
    centred = torch.tensor([[[1.0], [-1.0]]])  # mean 0: a rescale to it would be 0 / x
    assert torch.equal(apply_weights(centred, torch.tensor([[2.0, 1.0]])), torch.tensor([[[2.0], [-1.0]]]))


# --- SD 1.x / 2.x embeddings ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd_family(tiny_sd_dir):
    from library.families.sd import SDFamily

    family = SDFamily.load(str(tiny_sd_dir))
    family.prepare(torch.device("cpu"), torch.float32, False, False)
    # A random CLIP's final layer norm has a zero bias, so its outputs average to ~0 and the mean that weighting
    # preserves is noise; a trained CLIP's bias is not zero. Give the tiny one a bias like a trained one.
    inner = getattr(family.text_encoder, "text_model", family.text_encoder)
    with torch.no_grad():
        inner.final_layer_norm.bias.copy_(torch.linspace(-0.2, 0.6, inner.final_layer_norm.bias.numel()))
    return family


def sd(family, max_token_length=None, clip_skip=None):
    return dataclasses.replace(family, max_token_length=max_token_length, clip_skip=clip_skip)


@pytest.mark.parametrize("max_token_length", [None, 150, 225])
@pytest.mark.parametrize("negative", ["", "blurry, lowres"])
@pytest.mark.parametrize("prompt", ["sks red square", "a b, c " * 30, "x" * 300])
def test_a_prompt_without_syntax_is_encoded_exactly_as_before(sd_family, prompt, negative, max_token_length):
    family = sd(sd_family, max_token_length, clip_skip=2 if max_token_length == 150 else None)
    embeds = family.sample_embeds(prompt, negative)
    with torch.no_grad():
        before = family.encode_text([prompt, negative])  # what sample_embeds returned before weighting existed
    assert torch.equal(embeds["prompt_embeds"], before[:1])
    assert torch.equal(embeds["negative_prompt_embeds"], before[1:])


def check_weighted(weighted: torch.Tensor, plain: torch.Tensor, position: int, weight: float) -> None:
    """``weighted`` is ``plain`` with the token at ``position`` times ``weight``, all rescaled to plain's mean."""
    assert weighted.shape == plain.shape
    assert weighted.mean().item() == pytest.approx(plain.mean().item(), rel=1e-4)
    scale = plain.mean() / torch.cat([plain[:, :position], plain[:, position:position + 1] * weight,
                                      plain[:, position + 1:]], dim=1).mean()
    assert scale != pytest.approx(1.0, abs=1e-3)  # else the rescale would go unchecked
    others = torch.cat([weighted[:, :position], weighted[:, position + 1:]], dim=1)
    assert torch.allclose(others, torch.cat([plain[:, :position], plain[:, position + 1:]], dim=1) * scale,
                          atol=1e-5)
    assert torch.allclose(weighted[:, position], plain[:, position] * weight * scale, atol=1e-5)


@pytest.mark.parametrize(("text", "weight"), [("(b:1.5) c", 1.5), ("((b)) c", 1.21), ("[b] c", 1 / 1.1)])
def test_a_weighted_tokens_embedding_moves_by_its_weight_and_the_mean_is_kept(sd_family, text, weight):
    family = sd(sd_family)
    plain = family.sample_embeds("b c", "")
    weighted = family.sample_embeds(text, "")
    check_weighted(weighted["prompt_embeds"], plain["prompt_embeds"], 1, weight)
    # The token stands out from its neighbours by its weight (more for > 1, less for < 1).
    norms = [e["prompt_embeds"][0, 1:3].norm(dim=-1) for e in (weighted, plain)]
    assert (norms[0][0] / norms[0][1]).item() == pytest.approx(weight * (norms[1][0] / norms[1][1]).item(), rel=1e-4)
    assert torch.equal(weighted["negative_prompt_embeds"], plain["negative_prompt_embeds"])


def test_the_negative_prompt_is_weighted_too(sd_family):
    family = sd(sd_family)
    plain = family.sample_embeds("b c", "b c")
    weighted = family.sample_embeds("b c", "b (c:1.3)")
    assert torch.equal(weighted["prompt_embeds"], plain["prompt_embeds"])
    check_weighted(weighted["negative_prompt_embeds"], plain["negative_prompt_embeds"], 2, 1.3)


def test_weights_past_the_first_75_tokens_of_a_long_prompt(sd_family):
    family = sd(sd_family, 225)
    plain = family.sample_embeds("a " * 100 + "b", "")
    weighted = family.sample_embeds("a " * 100 + "(b:1.5)", "")
    assert weighted["prompt_embeds"].shape == (1, 227, 32)
    check_weighted(weighted["prompt_embeds"], plain["prompt_embeds"], 101, 1.5)


def test_break_encodes_each_section_in_its_own_chunk_and_the_pipeline_samples_it(sd_family):
    from library.sample_prompts import SamplePrompt
    from library.sampling import generate_image

    family = sd(sd_family)
    embeds = family.sample_embeds("a BREAK b", "blurry")
    with torch.no_grad():
        first, second = (family.encode_text([text]) for text in ("a", "b"))
    # <bos> a <eos> <pad>... of the first chunk, then the second chunk's 75 tokens and its end token.
    assert torch.allclose(embeds["prompt_embeds"], torch.cat([first[:, :76], second[:, 1:]], dim=1), atol=1e-6)
    assert embeds["negative_prompt_embeds"].shape == (1, 152, 32)  # padded with an empty chunk to match
    pipe = family.sample_pipeline()
    prompt = SamplePrompt("a BREAK b", "blurry", width=64, height=64, sample_steps=1, sample_sampler="euler")
    with torch.no_grad():
        image = generate_image(pipe, prompt, 1, pipe.scheduler.config, embeds)
    assert image.size == (64, 64)


# --- SDXL: both encoders weighted, the pooled embedding not -------------------------------------------------


@pytest.fixture(scope="module")
def sdxl_family():
    from library.families.diffusion import NoiseSettings
    from library.families.sdxl import SDXLFamily
    from library.tiny_models import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline(seed=0)
    family = SDXLFamily(pipe.tokenizer, pipe.tokenizer_2, pipe.text_encoder, pipe.text_encoder_2, pipe.vae,
                        pipe.unet, pipe.scheduler, NoiseSettings(), 0)
    family.prepare(torch.device("cpu"), torch.float32, False, False)
    return family


@pytest.mark.parametrize("max_token_length", [None, 225])
@pytest.mark.parametrize("negative", ["", "blurry"])
def test_sdxl_prompt_without_syntax_is_encoded_exactly_as_before(sdxl_family, negative, max_token_length):
    family = dataclasses.replace(sdxl_family, max_token_length=max_token_length)
    prompt = "sks red square, " * 8
    embeds = family.sample_embeds(prompt, negative)
    with torch.no_grad():
        context, pooled = family.encode_text([prompt, negative])
    if not negative:
        context[1:], pooled[1:] = 0, 0
    assert torch.equal(embeds["prompt_embeds"], context[:1])
    assert torch.equal(embeds["negative_prompt_embeds"], context[1:])
    assert torch.equal(embeds["pooled_prompt_embeds"], pooled[:1])
    assert torch.equal(embeds["negative_pooled_prompt_embeds"], pooled[1:])


def test_sdxl_weights_both_encoders_each_to_its_own_mean_and_not_the_pooled_embedding(sdxl_family):
    plain = sdxl_family.sample_embeds("b c", "")
    weighted = sdxl_family.sample_embeds("(b:1.5) c", "")
    for half in (slice(0, 32), slice(32, 64)):  # text encoder 1's features, then text encoder 2's
        check_weighted(weighted["prompt_embeds"][..., half], plain["prompt_embeds"][..., half], 1, 1.5)
    assert torch.equal(weighted["pooled_prompt_embeds"], plain["pooled_prompt_embeds"])


def test_sdxl_long_prompts_and_break(sdxl_family):
    family = dataclasses.replace(sdxl_family, max_token_length=225)
    plain = family.sample_embeds("a " * 100 + "b", "blurry")
    weighted = family.sample_embeds("a " * 100 + "(b:1.5)", "blurry")
    assert weighted["prompt_embeds"].shape == weighted["negative_prompt_embeds"].shape == (1, 227, 64)
    for half in (slice(0, 32), slice(32, 64)):
        check_weighted(weighted["prompt_embeds"][..., half], plain["prompt_embeds"][..., half], 101, 1.5)
    embeds = sdxl_family.sample_embeds("a BREAK b", "")
    assert embeds["prompt_embeds"].shape == embeds["negative_prompt_embeds"].shape == (1, 152, 64)
    with torch.no_grad():
        first, pooled = sdxl_family.encode_text(["a"])
        second, _ = sdxl_family.encode_text(["b"])
    assert torch.allclose(embeds["prompt_embeds"], torch.cat([first[:, :76], second[:, 1:]], dim=1), atol=1e-6)
    assert torch.allclose(embeds["pooled_prompt_embeds"], pooled, atol=1e-6)  # the first chunk's, as training
