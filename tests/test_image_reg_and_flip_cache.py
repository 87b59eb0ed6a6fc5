"""sd-scripts compatibility of the image data: reg balancing, dataset counts, flip_aug with cached latents."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from library.data.image_data import build_image_data
from library.data.images import ImageCaptionDataset
from library.data.reg_balance import balance_reg_repeats
from library.dataset_config import (
    DatasetConfig,
    DatasetDefaults,
    DatasetGroupConfig,
    SubsetConfig,
    config_from_train_data_dir,
)
from library.errors import UserError
from library.tiny_models import write_synthetic_images


def sd_scripts_reg_repeats(repeats: list[int], is_reg: list[bool]) -> list[int]:
    """sd-scripts' DreamBoothDataset loop, transcribed as the oracle (one repeat at a time)."""
    num_train = sum(n for n, reg in zip(repeats, is_reg, strict=True) if not reg)
    out = [0 if reg else n for n, reg in zip(repeats, is_reg, strict=True)]
    reg_infos = [i for i, reg in enumerate(is_reg) if reg]
    n, first_loop = 0, True
    while reg_infos and n < num_train:
        for i in reg_infos:
            if first_loop:
                out[i] = repeats[i]
                n += repeats[i]
            else:
                out[i] += 1
                n += 1
            if n >= num_train:
                break
        first_loop = False
    return out


@pytest.mark.parametrize("repeats, is_reg", [
    ([5, 5, 5, 5, 1, 1, 1], [False] * 4 + [True] * 3),  # the audit's case: 20 train -> reg 7, 7, 6
    ([1, 3, 3], [False, True, True]),  # the first reg image's repeats already pass the target
    ([1, 1, 1, 1, 1, 1], [False, False, False, True, True, True]),  # exactly balanced
    ([2, 1, 1, 1, 1, 1, 1], [False] + [True] * 6),  # more reg than train: later reg images unused
    ([2, 4, 3, 7, 2], [True, False, True, False, True]),  # interleaved subsets
    ([3, 3], [False, False]),  # no reg at all
])
def test_balance_matches_sd_scripts_loop(repeats, is_reg):
    assert balance_reg_repeats(repeats, is_reg) == sd_scripts_reg_repeats(repeats, is_reg)


def test_balance_exact_values():
    assert balance_reg_repeats([5] * 4 + [1] * 3, [False] * 4 + [True] * 3) == [5] * 4 + [7, 7, 6]
    assert balance_reg_repeats([2] + [1] * 4, [False] + [True] * 4) == [2, 1, 1, 0, 0]


def _folders(tmp_path: Path) -> tuple[Path, Path]:
    train = write_synthetic_images(tmp_path / "train" / "5_sks shape", count=4, size=32)
    reg = write_synthetic_images(tmp_path / "reg" / "1_shape", count=3, size=32, seed=1)
    return train, reg


def test_toml_reg_subset_is_balanced_to_the_training_samples(tmp_path):
    train, reg = _folders(tmp_path)
    config = DatasetConfig(subsets=(SubsetConfig(train, num_repeats=5), SubsetConfig(reg, is_reg=True)),
                           resolution=(32, 32))
    ds = ImageCaptionDataset(config, seed=0)
    assert len(ds) == 40  # 20 training + 20 reg samples, as sd-scripts
    assert sum(ds[(0, i)]["is_reg"] for i in range(len(ds))) == 20
    assert [ds.repeats_of(r) for r in range(len(ds.records))] == [5, 5, 5, 5, 7, 7, 6]
    assert ds.num_train_images == 20 and ds.num_reg_images == 3  # sd-scripts' counts (reg before balancing)
    text = "\n".join(ds.summary())
    assert "3 regularisation images x 1 repeats = 3 samples -> 20 (reg samples balanced" in text
    assert "total: 7 images, 40 samples per epoch" in text


def test_legacy_reg_data_dir_is_balanced_the_same_way(tmp_path):
    _folders(tmp_path)
    defaults = DatasetDefaults(resolution=(32, 32), train_data_dir=tmp_path / "train", reg_data_dir=tmp_path / "reg")
    ds = ImageCaptionDataset(config_from_train_data_dir(defaults).datasets[0], seed=0)
    assert len(ds) == 40


def test_surplus_reg_images_are_left_unused_and_reported(tmp_path):
    train = write_synthetic_images(tmp_path / "t", count=2, size=32)
    reg = write_synthetic_images(tmp_path / "r", count=5, size=32, seed=1)
    config = DatasetConfig(subsets=(SubsetConfig(train), SubsetConfig(reg, is_reg=True)), resolution=(32, 32))
    ds = ImageCaptionDataset(config, seed=0)
    assert len(ds) == 4
    assert {Path(ds[(0, i)]["image_path"]).name for i in range(2, 4)} == {"img_000.png", "img_001.png"}
    assert "3 images unused" in "\n".join(ds.summary())


def test_dataset_of_only_reg_images_is_refused(tmp_path):
    reg = write_synthetic_images(tmp_path / "r", count=2, size=32)
    config = DatasetConfig(subsets=(SubsetConfig(reg, is_reg=True, name="datasets[0].subsets[0]"),),
                           resolution=(32, 32), name="datasets[0]")
    with pytest.raises(UserError, match=r"datasets\[0\]: every subset .* is_reg = true.*add a training subset"):
        ImageCaptionDataset(config, seed=0)


def _data(*subsets: SubsetConfig, batch_size: int = 2):
    group = DatasetGroupConfig(datasets=(DatasetConfig(subsets=subsets, resolution=(32, 32), batch_size=batch_size),))
    return build_image_data(group, seed=3, on_bad_image="error", num_processes=1, rank=0, num_workers=0,
                            persistent_workers=False)


def test_ss_datasets_num_train_images_equals_ss_num_train_images(tmp_path):
    a = write_synthetic_images(tmp_path / "a", count=4, size=32)
    b = write_synthetic_images(tmp_path / "b", count=5, size=32, seed=1)
    reg = write_synthetic_images(tmp_path / "reg", count=3, size=32, seed=2)
    data = _data(SubsetConfig(a, num_repeats=2), SubsetConfig(b), SubsetConfig(reg, is_reg=True))
    assert data.num_train_images == 13 and data.num_reg_images == 3
    (meta,) = data.metadata()
    assert meta["num_train_images"] == data.num_train_images == 13
    assert meta["num_reg_images"] == 3


class CountingEncoder:
    """A stand-in VAE: 4x4 average pooling (a pure function of the pixels), counting images encoded."""

    def __init__(self) -> None:
        self.images = 0

    def __call__(self, images: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        self.images += len(images)
        return F.avg_pool2d(images, 4)


def test_flip_aug_with_cached_latents_follows_the_per_sample_flip(tmp_path):
    folder = write_synthetic_images(tmp_path / "a", count=3, size=32)
    data = _data(SubsetConfig(folder, num_repeats=4, flip_aug=True))
    encoder = CountingEncoder()
    data.cache_latents(encoder, 2, torch.device("cpu"))
    assert encoder.images == 6  # each image and its mirror image once
    seen = set()
    for epoch in range(3):
        for index in range(len(data.concat)):
            uncached = data.datasets[0][(epoch, index)]
            cached = data.concat[(epoch, index)]
            assert cached["flipped"] == uncached["flipped"]
            assert torch.equal(cached["latents"], F.avg_pool2d(uncached["image"][None], 4)[0])
            seen.add(cached["flipped"])
    assert seen == {True, False}
    batch = next(iter(data.loader))
    assert batch["latents"].shape == (2, 3, 8, 8) and "images" not in batch


def test_random_crop_and_color_aug_are_still_refused_with_cached_latents(tmp_path):
    folder = write_synthetic_images(tmp_path / "a", count=2, size=32)
    for aug in ("random_crop", "color_aug"):
        data = _data(SubsetConfig(folder, name="datasets[0].subsets[0]", **{aug: True}))
        with pytest.raises(UserError, match=r"datasets\[0\]\.subsets\[0\]: --cache_latents cannot be combined"):
            data.cache_latents(CountingEncoder(), 2, torch.device("cpu"))


def _tensor_names(path: Path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return set(f.keys())


def test_disk_cache_file_serves_runs_with_and_without_flip_aug(tmp_path):
    folder = write_synthetic_images(tmp_path / "a", count=2, size=32)
    files = [folder / "img_000_32x32.latent.safetensors", folder / "img_001_32x32.latent.safetensors"]

    plain = CountingEncoder()
    _data(SubsetConfig(folder)).cache_latents(plain, 2, torch.device("cpu"), to_disk=True)
    assert plain.images == 2 and all(_tensor_names(f) == {"latent"} for f in files)

    # flip_aug later: only the mirror images are encoded, and added to the same files
    flip = CountingEncoder()
    flipping = _data(SubsetConfig(folder, flip_aug=True))
    flipping.cache_latents(flip, 2, torch.device("cpu"), to_disk=True)
    assert flip.images == 2 and all(_tensor_names(f) == {"latent", "latent_flipped"} for f in files)
    sample = flipping.concat[(0, 0)]
    image = flipping.datasets[0][(0, 0)]["image"]
    assert torch.equal(sample["latents"], F.avg_pool2d(image[None], 4)[0])

    # both kinds of run now reuse the files without encoding, and the flipped latent is kept
    for subset in (SubsetConfig(folder, flip_aug=True), SubsetConfig(folder)):
        again = CountingEncoder()
        _data(subset).cache_latents(again, 2, torch.device("cpu"), to_disk=True)
        assert again.images == 0
    assert all(_tensor_names(f) == {"latent", "latent_flipped"} for f in files)


def test_unused_reg_images_are_not_encoded(tmp_path):
    train = write_synthetic_images(tmp_path / "t", count=1, size=32)
    reg = write_synthetic_images(tmp_path / "r", count=4, size=32, seed=1)
    encoder = CountingEncoder()
    _data(SubsetConfig(train), SubsetConfig(reg, is_reg=True)).cache_latents(encoder, 2, torch.device("cpu"))
    assert encoder.images == 2  # the training image and the one reg image balancing uses


def test_an_image_in_two_subsets_caches_to_disk_across_processes(tmp_path):
    # Two records of one image draw their own VAE samples (their seed keys differ), so they need a file each;
    # sharing one made two processes reject each other's file, and one process rewrite it every run.
    folder = write_synthetic_images(tmp_path / "a", count=2, size=32)
    subsets = (SubsetConfig(folder), SubsetConfig(folder, num_repeats=2))
    barrier, errors = threading.Barrier(2), []

    def process(rank: int) -> None:
        try:
            _data(*subsets).cache_latents(CountingEncoder(), 2, torch.device("cpu"), to_disk=True,
                                          num_processes=2, rank=rank, barrier=barrier.wait)
        except Exception as e:  # noqa: BLE001  (reported by the assertion below)
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=process, args=(rank,)) for rank in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len(list(folder.glob("*.latent.safetensors"))) == 4
    again = CountingEncoder()
    _data(*subsets).cache_latents(again, 2, torch.device("cpu"), to_disk=True)
    assert again.images == 0  # every record finds its own file on the next run


def test_move_batch_keeps_the_sample_indices_on_the_cpu():
    from library.data.image_data import move_batch

    batch = {"indices": torch.tensor([3, 4]), "latents": torch.zeros(2, 4, 8, 8), "captions": ["a", "b"]}
    moved = move_batch(batch, torch.device("meta"))  # stands in for a GPU: anything moved lands there
    assert moved["latents"].device.type == "meta" and moved["indices"].device.type == "cpu"
    assert moved["captions"] == ["a", "b"]


def test_vae_fingerprint_is_exact_and_follows_the_weights():
    from library.data.image_data import vae_fingerprint

    vae = torch.nn.Linear(3, 2)
    first = vae_fingerprint(vae)
    assert vae_fingerprint(vae) == first  # the same bytes, wherever they are summed or hashed
    with torch.no_grad():
        vae.weight[0, 0] = torch.nextafter(vae.weight[0, 0], torch.tensor(2.0))  # one ulp: a float sum can miss it
    assert vae_fingerprint(vae) != first
    assert vae_fingerprint(vae.to(torch.bfloat16)) != vae_fingerprint(vae.float())  # latents differ by dtype
