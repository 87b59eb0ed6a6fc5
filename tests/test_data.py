"""Images, captions, buckets and the epoch order (CPU, small generated images, exact values)."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from library.data.buckets import (
    BucketSettings,
    assign_buckets,
    closest_bucket,
    make_bucket_resolutions,
    no_upscale_bucket,
)
from library.data.captions import (
    CaptionOptions,
    add_prefix_suffix,
    count_tags,
    image_caption,
    is_dropped_out,
    process_caption,
    read_caption_file,
    shuffle_and_drop_tags,
)
from library.data.images import ImageCaptionDataset, collate_fn, list_images, resize_and_crop
from library.data.sampler import EpochBatchSampler, derive_seed, epoch_batches, global_batches, steps_per_epoch
from library.dataset_config import DatasetConfig, SubsetConfig
from library.errors import UserError
from library.tiny_models import write_synthetic_images


def subset(folder: Path, **kw) -> SubsetConfig:
    return SubsetConfig(image_dir=folder, **kw)


def dataset(*subsets: SubsetConfig, resolution=(32, 32), **kw) -> DatasetConfig:
    return DatasetConfig(subsets=subsets, resolution=resolution, **kw)


def half_and_half(path: Path, size=(32, 32), exif_orientation: int | None = None) -> Path:
    """Left half red, right half blue: flips and rotations are visible in the pixels."""
    image = Image.new("RGB", size, (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, size[0] // 2, size[1]))
    path.parent.mkdir(parents=True, exist_ok=True)
    if exif_orientation is None:
        image.save(path)
    else:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        image.save(path, exif=exif)
    return path


# --- captions: exact outputs for fixed seeds -------------------------------------------------

CAPTION = "sks dog, red collar, grass, sunny day, park"


def test_shuffle_keeps_the_first_tokens_and_is_seeded():
    options = CaptionOptions(shuffle=True, keep_tokens=1)
    assert shuffle_and_drop_tags(CAPTION, options, random.Random(0)) == "sks dog, sunny day, red collar, grass, park"
    assert shuffle_and_drop_tags(CAPTION, options, random.Random(1)) == "sks dog, park, red collar, sunny day, grass"


def test_tag_dropout_exact():
    # random.Random(0) draws 0.844, 0.758, 0.421, 0.259, 0.511: tags 3 and 4 fall below 0.5
    options = CaptionOptions(tag_dropout_rate=0.5)
    assert shuffle_and_drop_tags(CAPTION, options, random.Random(0)) == "sks dog, red collar, park"


def test_keep_tokens_separator_pins_head_and_tail():
    options = CaptionOptions(shuffle=True, keep_tokens_separator="|||")
    caption = "sks, 1girl ||| red, blue, green ||| masterpiece, best"
    expected = "sks, 1girl, red, green, blue, masterpiece, best"
    assert shuffle_and_drop_tags(caption, options, random.Random(0)) == expected
    # without shuffling the marker is still removed (sd-scripts would leave "|||" in the text)
    marker_only = CaptionOptions(keep_tokens_separator="|||")
    assert shuffle_and_drop_tags("a ||| b, c", marker_only, random.Random(0)) == "a, b, c"


def test_nothing_enabled_leaves_caption_untouched():
    assert shuffle_and_drop_tags("a,b ,,c", CaptionOptions(), random.Random(0)) == "a,b ,,c"


def test_custom_separator_and_empty_tags():
    options = CaptionOptions(shuffle=True, keep_tokens=3, separator=";")
    assert shuffle_and_drop_tags("a;b;;c", options, random.Random(0)) == "a; b; c"


def test_prefix_suffix_and_whole_caption_dropout():
    assert add_prefix_suffix("a, b", "photo of", "hd") == "photo of a, b hd"
    assert process_caption("a, b", CaptionOptions(prefix="photo of", suffix="hd"), random.Random(0), 1) == (
        "photo of a, b hd"
    )
    # Random(0).random() = 0.844 (kept), Random(3).random() = 0.238 (dropped)
    assert process_caption("a, b", CaptionOptions(dropout_rate=0.5), random.Random(0), 1) == "a, b"
    assert process_caption("a, b", CaptionOptions(dropout_rate=0.5), random.Random(3), 1) == ""


def test_dropout_every_n_epochs_counts_from_one():
    rng = random.Random(0)
    assert [is_dropped_out(rng, 0.0, epoch, 3) for epoch in range(1, 7)] == [False, False, True, False, False, True]
    options = CaptionOptions(dropout_every_n_epochs=2)
    assert [process_caption("a", options, random.Random(0), e) for e in (1, 2)] == ["a", ""]


def test_reading_captions(tmp_path):
    image = tmp_path / "img.v2.png"
    (tmp_path / "img.v2.txt").write_text("\ufeff\n  first line  \nsecond\n", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("")
    assert read_caption_file(tmp_path / "img.v2.txt") == "first line"
    assert read_caption_file(tmp_path / "empty.txt") == ""
    assert read_caption_file(tmp_path / "none.txt") is None
    assert image_caption(image, ".txt", "sks") == "first line"
    assert image_caption(tmp_path / "other.png", ".txt", "sks") == "sks"
    assert image_caption(tmp_path / "other.png", ".txt", None) is None


def test_count_tags():
    assert count_tags(["a, b", "b,c", " c ,, b"]) == {"a": 1, "b": 3, "c": 2}


# --- the dataset ------------------------------------------------------------------------------


def test_length_repeats_and_items(tmp_path):
    write_synthetic_images(tmp_path / "a", count=3, size=48)
    write_synthetic_images(tmp_path / "b", count=2, size=40, seed=1)
    ds = ImageCaptionDataset(
        dataset(subset(tmp_path / "a", num_repeats=2), subset(tmp_path / "b", num_repeats=3, is_reg=True)), seed=0
    )
    assert len(ds) == 3 * 2 + 2 * 3
    # sample order: subsets in order, images sorted, repeats adjacent
    assert [Path(ds[i]["image_path"]).name for i in range(4)] == [
        "img_000.png",
        "img_000.png",
        "img_001.png",
        "img_001.png",
    ]
    item = ds[7]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert -1.0 <= float(item["image"].min()) < 0 < float(item["image"].max()) <= 1.0
    assert item["is_reg"] is True and item["index"] == 7 and item["bucket"] == (32, 32)
    assert item["caption"].startswith("sks ") and item["original_size"] == (40, 40)
    assert ds[0]["is_reg"] is False
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_image_values_are_exact(tmp_path):
    Image.new("RGB", (8, 8), (255, 0, 128)).save(tmp_path / "x.png")
    ds = ImageCaptionDataset(dataset(subset(tmp_path, class_tokens="x"), resolution=(8, 8)), seed=0)
    image = ds[0]["image"]
    assert torch.allclose(image[:, 0, 0], torch.tensor([1.0, -1.0, 128 / 127.5 - 1]), atol=1e-6)


def test_exif_orientation_is_applied(tmp_path):
    # Stored 64x32 with orientation 6 (display = rotate 90° clockwise): the stored left (red)
    # half becomes the displayed top half, and the image is displayed 32 wide, 64 high.
    half_and_half(tmp_path / "d" / "rot.jpg", size=(64, 32), exif_orientation=6)
    ds = ImageCaptionDataset(dataset(subset(tmp_path / "d", class_tokens="x"), resolution=(16, 32)), seed=0)
    item = ds[0]
    assert item["original_size"] == (32, 64)
    image = item["image"]
    assert image[0, 2, 8] > 0.8 and image[2, 2, 8] < -0.8  # top is red
    assert image[2, 29, 8] > 0.8 and image[0, 29, 8] < -0.8  # bottom is blue


def test_transparent_png_is_composited_on_white(tmp_path):
    Image.new("RGBA", (8, 8), (10, 20, 30, 0)).save(tmp_path / "t.png")
    ds = ImageCaptionDataset(dataset(subset(tmp_path, class_tokens="x"), resolution=(8, 8)), seed=0)
    assert torch.equal(ds[0]["image"], torch.ones(3, 8, 8))


def flipped(item) -> bool:
    return bool(item["image"][0, 16, 2] < 0)  # the left column is red unless flipped


def test_flip_is_a_function_of_seed_epoch_and_index(tmp_path):
    for i in range(4):
        half_and_half(tmp_path / "d" / f"{i}.png")
    config = dataset(subset(tmp_path / "d", class_tokens="x", flip_aug=True, num_repeats=4))
    ds, again = ImageCaptionDataset(config, seed=5), ImageCaptionDataset(config, seed=5)
    pattern = [flipped(ds[(0, i)]) for i in range(len(ds))]
    assert 0 < sum(pattern) < len(pattern)  # some flipped, some not
    assert [flipped(again[(0, i)]) for i in range(len(ds))] == pattern  # same in another "process"
    assert [flipped(ds[(1, i)]) for i in range(len(ds))] != pattern  # another epoch draws anew
    assert [flipped(ImageCaptionDataset(config, seed=6)[(0, i)]) for i in range(len(ds))] != pattern
    ds.set_epoch(1)
    assert [flipped(ds[i]) for i in range(len(ds))] == [flipped(again[(1, i)]) for i in range(len(ds))]
    no_flip = ImageCaptionDataset(dataset(subset(tmp_path / "d", class_tokens="x")), seed=5)
    assert not any(flipped(no_flip[i]) for i in range(len(no_flip)))


def test_random_crop_and_caption_shuffle_are_deterministic(tmp_path):
    write_synthetic_images(tmp_path / "d", count=2, size=64)
    for path in (tmp_path / "d").glob("*.caption"):
        path.write_text("a, b, c, d, e, f")
    # 64x64 images at 32 wide x 16 high: scaled to 32x32, so the crop can move vertically only
    config = dataset(subset(tmp_path / "d", random_crop=True, shuffle_caption=True, num_repeats=8), resolution=(32, 16))
    first, second = ImageCaptionDataset(config, seed=1), ImageCaptionDataset(config, seed=1)
    crops = {first[(0, i)]["crop_top_left"] for i in range(len(first))}
    assert len(crops) > 1 and all(0 <= top <= 16 and left == 0 for top, left in crops)
    for i in range(len(first)):
        a, b = first[(3, i)], second[(3, i)]
        assert torch.equal(a["image"], b["image"]) and a["caption"] == b["caption"]
    assert len({first[(0, i)]["caption"] for i in range(len(first))}) > 1


def test_missing_image_dir_and_empty_subset(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        ImageCaptionDataset(dataset(subset(tmp_path / "nope")), seed=0)
    (tmp_path / "gifs").mkdir()
    (tmp_path / "gifs" / "a.gif").write_bytes(b"GIF89a")
    with pytest.raises(UserError) as info:
        ImageCaptionDataset(dataset(subset(tmp_path / "gifs", name="datasets[0].subsets[0]")), seed=0)
    assert "datasets[0].subsets[0]: no images" in str(info.value) and ".gif" in str(info.value)


def test_missing_captions_name_the_extension_that_exists(tmp_path):
    write_synthetic_images(tmp_path / "d", count=8)
    for path in (tmp_path / "d").glob("*.caption"):
        path.rename(path.with_suffix(".txt"))
    (tmp_path / "d" / "img_000.caption").write_text("only one")
    with pytest.raises(UserError) as info:
        ImageCaptionDataset(dataset(subset(tmp_path / "d")), seed=0)
    message = str(info.value)
    assert "7 of 8 images" in message and '"img_001.caption"' not in message
    assert ".txt found for 7 images" in message and 'set caption_extension = ".txt"' in message
    # the hint is right: with it, every image has its caption
    ds = ImageCaptionDataset(dataset(subset(tmp_path / "d", caption_extension=".txt")), seed=0)
    assert ds[1]["caption"].startswith("sks ")


def test_class_tokens_caption_images_without_caption_files(tmp_path):
    write_synthetic_images(tmp_path / "d", count=2)
    (tmp_path / "d" / "img_001.caption").unlink()
    ds = ImageCaptionDataset(dataset(subset(tmp_path / "d", class_tokens="sks dog")), seed=0)
    assert ds[0]["caption"] == "sks red square" and ds[1]["caption"] == "sks dog"


def test_bad_images_error_or_skip(tmp_path):
    write_synthetic_images(tmp_path / "d", count=3, size=64)
    data = (tmp_path / "d" / "img_001.png").read_bytes()
    (tmp_path / "d" / "img_001.png").write_bytes(data[: len(data) // 2])  # truncated
    (tmp_path / "d" / "img_002.png").write_bytes(b"not an image")
    config = dataset(subset(tmp_path / "d"))
    with pytest.raises(UserError) as info:
        ImageCaptionDataset(config, seed=0)
    assert "2 unreadable image(s)" in str(info.value)
    assert "img_001.png" in str(info.value) and "img_002.png" in str(info.value)
    ds = ImageCaptionDataset(config, seed=0, on_bad_image="skip")
    assert len(ds) == 1 and [p.name for p, _ in ds.skipped] == ["img_001.png", "img_002.png"]
    assert any("skipped unreadable image" in line and "img_002.png" in line for line in ds.summary())


def test_list_images_is_case_insensitive_and_sorted(tmp_path):
    for name in ("b.JPG", "a.png", "c.WebP", "d.bmp", "e.jpeg", "f.gif", "g.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_images(tmp_path)] == ["a.png", "b.JPG", "c.WebP", "d.bmp", "e.jpeg"]


def test_collate_and_summary_and_tag_frequency(tmp_path):
    write_synthetic_images(tmp_path / "5_sks", count=4)
    write_synthetic_images(tmp_path / "reg", count=1)
    (tmp_path / "reg" / "img_000.caption").unlink()
    ds = ImageCaptionDataset(
        dataset(subset(tmp_path / "5_sks", num_repeats=5), subset(tmp_path / "reg", is_reg=True, class_tokens="dog")),
        seed=0,
    )
    batch = collate_fn([ds[0], ds[20]])
    assert batch["images"].shape == (2, 3, 32, 32)
    assert batch["is_reg"].tolist() == [False, True] and batch["is_reg"].dtype == torch.bool
    assert batch["captions"] == ["sks red square", "dog"] and batch["indices"] == [0, 20]
    text = "\n".join(ds.summary())
    assert "4 training images x 5 repeats = 20 samples" in text
    # the reg image is repeated to match the 20 training samples, as sd-scripts does
    assert "1 regularisation images x 1 repeats = 1 samples -> 20" in text
    assert "total: 5 images, 40 samples per epoch" in text and "bucket 32x32: 40 samples" in text
    assert ds.tag_frequency() == {
        "5_sks": {"sks blue square": 1, "sks green circle": 1, "sks red square": 1, "sks yellow circle": 1},
        "reg": {"dog": 1},
    }
    with pytest.raises(ValueError, match="mixes buckets"):
        collate_fn([{**ds[0], "bucket": (64, 32)}, ds[1]])


def test_fine_tuning_metadata_subset(tmp_path):
    write_synthetic_images(tmp_path / "d", count=3)
    metadata = {"img_000": {"caption": "a cat", "tags": "cute, fluffy"}, "img_002.png": {"tags": "dog"}}
    (tmp_path / "md.json").write_text(json.dumps(metadata))
    config = dataset(subset(tmp_path / "d", metadata_file=tmp_path / "md.json"))
    ds = ImageCaptionDataset(config, seed=0)
    assert [(Path(ds[i]["image_path"]).name, ds[i]["caption"]) for i in range(len(ds))] == [
        ("img_000.png", "a cat, cute, fluffy"),
        ("img_002.png", "dog"),
    ]
    (tmp_path / "md.json").write_text('{"img_000": {"caption": "x"},\n "nope": {"caption": "y"}}')
    with pytest.raises(UserError, match="name no image.*nope"):
        ImageCaptionDataset(config, seed=0)
    (tmp_path / "md.json").write_text('{"img_000": {"caption": "x"},\n oops}')
    with pytest.raises(UserError, match="invalid JSON at line 2"):
        ImageCaptionDataset(config, seed=0)


def test_validation_split_is_disjoint_and_seeded(tmp_path):
    write_synthetic_images(tmp_path / "d", count=10)
    config = dataset(subset(tmp_path / "d", num_repeats=3), validation_split=0.2, validation_seed=7)
    train, val = ImageCaptionDataset(config, seed=0), ImageCaptionDataset(config, seed=0, split="validation")
    train_paths = {r.path for r in train.records}
    val_paths = {r.path for r in val.records}
    assert len(val_paths) == 2 and len(train_paths) == 8 and not train_paths & val_paths
    assert len(train) == 8 * 3 and len(val) == 2  # validation images appear once
    assert {r.path for r in ImageCaptionDataset(config, seed=99, split="validation").records} == val_paths


def test_caption_item_and_record_image_match_the_full_item(tmp_path):
    write_synthetic_images(tmp_path / "d", count=2, size=64)
    config = dataset(subset(tmp_path / "d", num_repeats=3, random_crop=True, shuffle_caption=True), resolution=(32, 16))
    ds = ImageCaptionDataset(config, seed=2)
    for i in range(len(ds)):
        full, light = ds[(1, i)], ds.caption_item((1, i))
        assert "image" not in light and light == {k: v for k, v in full.items() if k != "image"}
    assert [ds.record_of(i) for i in range(len(ds))] == [0, 0, 0, 1, 1, 1]
    plain = ImageCaptionDataset(dataset(subset(tmp_path / "d"), resolution=(32, 16)), seed=2)
    assert torch.equal(ds.record_image(1), plain[1]["image"])  # centre crop, no augmentation


def test_data_loader_with_workers_matches_direct_indexing(tmp_path):
    write_synthetic_images(tmp_path / "d", count=3)
    ds = ImageCaptionDataset(dataset(subset(tmp_path / "d", flip_aug=True, num_repeats=2)), seed=3)
    sampler = EpochBatchSampler(ds.buckets, batch_size=2, seed=3)
    loader = torch.utils.data.DataLoader(
        ds, batch_sampler=sampler, collate_fn=collate_fn, num_workers=2, persistent_workers=True
    )
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        for batch, keys in zip(loader, list(sampler), strict=True):
            expected = torch.stack([ds[key]["image"] for key in keys])
            assert torch.equal(batch["images"], expected)


# --- buckets ----------------------------------------------------------------------------------


def test_bucket_resolutions():
    buckets = make_bucket_resolutions((512, 512), 256, 1024, 64)
    assert (512, 512) in buckets and (768, 320) in buckets and (320, 768) in buckets and (1024, 256) in buckets
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in buckets)
    assert all(256 <= min(w, h) and max(w, h) <= 1024 for w, h in buckets)
    assert closest_bucket((1000, 500), buckets) == (704, 320)
    assert closest_bucket((500, 1000), buckets) == (320, 704)
    assert closest_bucket((300, 300), buckets) == (512, 512)


def test_no_upscale_buckets():
    assert no_upscale_bucket((300, 200), 512 * 512, 1024, 64) == (256, 192)  # small: floored, not enlarged
    assert no_upscale_bucket((1000, 500), 512 * 512, 1024, 64) == (704, 320)
    assert no_upscale_bucket((4000, 500), 512 * 512, 1024, 64) == (1024, 128)  # capped by max_bucket_reso
    settings = BucketSettings((512, 512), enable_bucket=True, bucket_no_upscale=True)
    assert assign_buckets([(300, 200)], settings) == [(256, 192)]
    assert assign_buckets([(300, 200)], BucketSettings((512, 512))) == [(512, 512)]


def test_resize_and_crop_covers_the_target():
    image = Image.new("RGB", (100, 50))
    out, (top, left) = resize_and_crop(image, (32, 32), random_crop=False, uniforms=(0.0, 0.0))
    assert out.size == (32, 32) and (top, left) == (0, 16)  # scaled to 64x32, centred
    _, (top, left) = resize_and_crop(image, (32, 32), random_crop=True, uniforms=(0.999, 0.5))
    assert (top, left) == (0, 32)


def test_bucketed_dataset_batches_never_mix_buckets(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    for i, size in enumerate([(128, 64), (128, 64), (64, 128), (64, 64), (128, 60), (64, 64), (60, 128)]):
        Image.new("RGB", size, (i * 30, 0, 0)).save(folder / f"{i}.png")
    config = dataset(
        subset(folder, class_tokens="x", num_repeats=2),
        resolution=(64, 64),
        enable_bucket=True,
        min_bucket_reso=32,
        max_bucket_reso=128,
        bucket_reso_steps=16,
    )
    ds = ImageCaptionDataset(config, seed=0)
    # candidates for area 64x64 in steps of 16 include 80x48 and 48x80 (closest to 2:1 and 1:2)
    assert set(ds.buckets) == {(80, 48), (48, 80), (64, 64)}
    for batch in epoch_batches(ds.buckets, 3, 1, 0, seed=0, epoch=0):
        items = [ds[i] for i in batch]
        assert collate_fn(items)["images"].shape[2:] == tuple(reversed(items[0]["bucket"]))
    assert "bucket 80x48: 6 samples" in "\n".join(ds.summary())


# --- the sampler ------------------------------------------------------------------------------

BUCKETS = [(64, 64)] * 23 + [(96, 48)] * 9 + [(48, 96)] * 2


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_two_ranks_equal_one_rank_with_twice_the_batch(batch):
    for epoch in range(3):
        single = epoch_batches(BUCKETS, 2 * batch, 1, 0, seed=11, epoch=epoch)
        rank0 = epoch_batches(BUCKETS, batch, 2, 0, seed=11, epoch=epoch)
        rank1 = epoch_batches(BUCKETS, batch, 2, 1, seed=11, epoch=epoch)
        assert len(rank0) == len(rank1) == len(single) == steps_per_epoch(BUCKETS, batch, 2)
        for step, whole in enumerate(single):
            assert rank0[step] + rank1[step] == whole
            assert len(rank0[step]) == len(rank1[step]) == batch


def test_batches_never_mix_buckets_and_cover_every_sample():
    for ranks in (1, 2, 4):
        seen = Counter()
        for rank in range(ranks):
            for batch in epoch_batches(BUCKETS, 2, ranks, rank, seed=0, epoch=0):
                assert len({BUCKETS[i] for i in batch}) == 1
                seen.update(batch)
        assert set(seen) == set(range(len(BUCKETS)))
        # the short last batch of a bucket is filled by wrapping: few duplicates
        assert sum(seen.values()) - len(BUCKETS) < 3 * 2 * ranks


def test_short_bucket_is_filled_by_wrapping():
    batches = global_batches([(1, 1)] * 5 + [(2, 2)] * 3, 2, seed=0, epoch=0)
    assert sorted(batches) == sorted([[7, 6], [2, 0], [3, 2], [4, 1], [5, 7]])
    assert epoch_batches([(1, 1)], 1, 2, 1, seed=0, epoch=0) == [[0]]  # one image still reaches rank 1
    assert steps_per_epoch([(1, 1)] * 5 + [(2, 2)] * 3, 2) == 5


def test_order_depends_on_seed_and_epoch_only():
    a = epoch_batches(BUCKETS, 2, 1, 0, seed=1, epoch=0)
    assert a == epoch_batches(BUCKETS, 2, 1, 0, seed=1, epoch=0)
    assert a != epoch_batches(BUCKETS, 2, 1, 0, seed=1, epoch=1)
    assert a != epoch_batches(BUCKETS, 2, 1, 0, seed=2, epoch=0)
    assert derive_seed(1, 0, "order") == derive_seed(1, 0, "order") != derive_seed(1, 1, "order")


def test_batch_sampler_epochs_skip_and_len():
    sampler = EpochBatchSampler(BUCKETS, batch_size=2, num_processes=2, rank=1, seed=4)
    sampler.set_epoch(2)
    full = list(sampler)
    assert full == [[(2, i) for i in b] for b in epoch_batches(BUCKETS, 2, 2, 1, seed=4, epoch=2)]
    assert len(sampler) == len(full) == steps_per_epoch(BUCKETS, 2, 2)
    sampler.set_epoch(2, skip_batches=3)
    assert list(sampler) == full[3:] and len(sampler) == len(full) - 3
    plain = EpochBatchSampler(BUCKETS, batch_size=2, seed=4, yield_epoch=False)
    assert list(plain) == epoch_batches(BUCKETS, 2, 1, 0, seed=4, epoch=0)
    with pytest.raises(ValueError):
        EpochBatchSampler(BUCKETS, batch_size=2, num_processes=2, rank=2)
