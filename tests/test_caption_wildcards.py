"""sd-scripts' enable_wildcard and secondary_separator caption options."""

from __future__ import annotations

import random
from collections import Counter

from library.data.captions import CaptionOptions, choose_wildcards, process_caption, read_caption_file


def test_wildcards_choose_one_option_each_and_keep_escaped_braces():
    seen = Counter(choose_wildcards("a {red|blue} cat, {{not|a choice}}", random.Random(i)) for i in range(200))
    assert set(seen) == {"a red cat, {not|a choice}", "a blue cat, {not|a choice}"}
    assert min(seen.values()) > 60  # both options are drawn, about evenly


def test_a_multi_line_caption_gives_one_non_empty_line():
    seen = {choose_wildcards("first\n\n  second  \n", random.Random(i)) for i in range(50)}
    assert seen == {"first", "second"}


def test_empty_braces_stay_as_written():
    assert choose_wildcards("a {} b", random.Random(0)) == "a {} b"


def test_a_plain_caption_takes_no_draw():
    rng, untouched = random.Random(3), random.Random(3)
    assert choose_wildcards("plain, caption", rng) == "plain, caption"
    assert rng.random() == untouched.random()


def test_wildcard_is_off_by_default():
    assert process_caption("a {red|blue} cat", CaptionOptions(), random.Random(0), 1) == "a {red|blue} cat"


def test_secondary_separator_keeps_tags_together_then_becomes_the_separator():
    options = CaptionOptions(shuffle=True, secondary_separator=";;;")
    for seed in range(20):
        out = process_caption("1girl, hair;;;blue hair, smile, sky", options, random.Random(seed), 1)
        tags = out.split(", ")
        assert sorted(tags) == ["1girl", "blue hair", "hair", "sky", "smile"]
        assert tags.index("blue hair") == tags.index("hair") + 1  # moved as one tag
    # without shuffling it is still replaced
    assert process_caption("a;;;b, c", CaptionOptions(secondary_separator=";;;"), random.Random(0), 1) == "a, b, c"


def test_tag_dropout_drops_secondary_groups_whole():
    options = CaptionOptions(tag_dropout_rate=0.5, secondary_separator=";;;")
    for seed in range(30):
        out = process_caption("x;;;y, z", options, random.Random(seed), 1)
        assert ("x" in out) == ("y" in out)


def test_caption_file_keeps_every_line_for_wildcards(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("one\n\ntwo\n", encoding="utf-8")
    assert read_caption_file(path) == "one"
    assert read_caption_file(path, all_lines=True) == "one\ntwo"


def test_dataset_toml_keys_reach_the_training_captions(tmp_path):
    from library.data.images import ImageCaptionDataset
    from library.dataset_config import DatasetDefaults, load_dataset_config
    from library.tiny_models import write_synthetic_images

    write_synthetic_images(tmp_path / "d", count=1, size=64)
    next((tmp_path / "d").glob("*.caption")).write_text("{red|blue} cat;;;sitting, sky\nsecond line\n")
    toml = tmp_path / "data.toml"
    toml.write_text(f'[general]\nenable_wildcard = true\nsecondary_separator = ";;;"\nshuffle_caption = true\n'
                    f'[[datasets]]\nresolution = 32\n[[datasets.subsets]]\nimage_dir = "{tmp_path / "d"}"\n'
                    f"num_repeats = 40\n")
    config = load_dataset_config(toml, DatasetDefaults()).datasets[0]
    data = ImageCaptionDataset(config, seed=1)
    captions = {data.caption_item((0, i))["caption"] for i in range(len(data))}
    assert "second line" in captions
    assert {"red cat, sitting, sky", "sky, blue cat, sitting"} <= captions
    assert not any("{" in c or ";;;" in c for c in captions)


def test_the_command_line_sets_them_for_the_folder_layout():
    from library.args import build_parser
    from library.train_setup import dataset_defaults

    args = build_parser().parse_args(["--enable_wildcard", "--secondary_separator", ";;;"])
    defaults = dataset_defaults(args)
    assert defaults.enable_wildcard and defaults.secondary_separator == ";;;"
