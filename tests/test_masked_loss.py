"""--masked_loss with alpha_mask / conditioning_data_dir (sd-scripts' names): masks, batches, the loss, a run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from library.data.masks import mask_tensor, to_latent_grid
from library.errors import UserError
from library.families.diffusion import per_sample_loss


def _half_transparent(path: Path, size: int = 64) -> Path:
    """An RGBA image whose left half is transparent."""
    image = Image.new("RGBA", (size, size), (200, 50, 50, 255))
    image.paste((0, 0, 0, 0), (0, 0, size // 2, size))
    image.save(path)
    return path


def test_alpha_becomes_the_mask_and_follows_crop_and_flip(tmp_path):
    path = _half_transparent(tmp_path / "a.png")
    mask = mask_tensor(path, None, (64, 64), (32, 32), False, (0.0, 0.0), False)
    assert mask.shape == (1, 32, 32)
    assert mask[..., :14].max() <= 0.01 and mask[..., 18:].min() >= 0.99  # (resampling softens the edge)
    flipped = mask_tensor(path, None, (64, 64), (32, 32), False, (0.0, 0.0), True)
    assert torch.equal(flipped, mask.flip(-1))
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "opaque.png")
    assert mask_tensor(tmp_path / "opaque.png", None, (64, 64), (32, 32), False, (0.0, 0.0), False).min() == 1


def test_a_mask_file_gives_its_red_channel_scaled_to_the_image(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "img.png")
    Image.new("RGB", (16, 16), (255, 0, 0)).save(tmp_path / "mask.png")  # red: trains, whatever G and B
    mask = mask_tensor(tmp_path / "img.png", tmp_path / "mask.png", (64, 64), (64, 64), False, (0.0, 0.0), False)
    assert mask.shape == (1, 64, 64) and mask.min() == 1


def test_the_loss_weighs_each_latent_position_and_keeps_the_mean_over_all():
    pred, target = torch.zeros(2, 4, 8, 8), torch.ones(2, 4, 8, 8)
    mask = torch.zeros(2, 1, 64, 64)
    mask[0, :, :, :32] = 1.0  # sample 0 trains on its left half, sample 1 nowhere
    losses = per_sample_loss(pred, target, "l2", 0.1, mask)
    assert losses.tolist() == pytest.approx([0.5, 0.0])  # sd-scripts: the mean over every position
    assert torch.equal(per_sample_loss(pred, target, "l2", 0.1, torch.ones(2, 1, 8, 8)),
                       per_sample_loss(pred, target, "l2", 0.1))


def _dataset_toml(tmp_path: Path, masked: str, plain: Path | None = None) -> Path:
    toml = tmp_path / "data.toml"
    text = f'[[datasets]]\nresolution = 32\nbatch_size = 2\n[[datasets.subsets]]\nimage_dir = "{tmp_path / "m"}"\n' \
           f"class_tokens = \"sks\"\n{masked}\n"
    if plain is not None:
        text += f'[[datasets.subsets]]\nimage_dir = "{plain}"\n'
    toml.write_text(text)
    return toml


def test_batches_carry_masks_and_ones_for_subsets_without(tmp_path, tiny_images):
    from library.data.images import ImageCaptionDataset, collate_fn
    from library.dataset_config import DatasetDefaults, load_dataset_config

    (tmp_path / "m").mkdir()
    _half_transparent(tmp_path / "m" / "a.png")
    config = load_dataset_config(_dataset_toml(tmp_path, "alpha_mask = true", tiny_images), DatasetDefaults())
    data = ImageCaptionDataset(config.datasets[0], seed=0)
    items = [data[(0, i)] for i in range(len(data))]
    masked = [item for item in items if "mask" in item]
    assert len(masked) == 1 and masked[0]["mask"].min() == 0
    batch = collate_fn([masked[0], next(item for item in items if "mask" not in item)])
    assert batch["masks"].shape == (2, 1, 32, 32) and batch["masks"][1].min() == 1


def test_cached_latents_carry_the_same_mask_on_the_latent_grid(tmp_path):
    from library.data.image_data import build_image_data
    from library.dataset_config import DatasetDefaults, load_dataset_config

    (tmp_path / "m").mkdir()
    _half_transparent(tmp_path / "m" / "a.png")
    toml = _dataset_toml(tmp_path, "alpha_mask = true\nflip_aug = true\nnum_repeats = 8")
    config = load_dataset_config(toml, DatasetDefaults())
    data = build_image_data(config, seed=0, on_bad_image="error", num_processes=1, rank=0, num_workers=0,
                            persistent_workers=False)
    live = [data.concat[(0, i)] for i in range(len(data.concat))]
    data.cache_latents(lambda images, keys: torch.zeros(len(images), 4, 4, 4), 1, torch.device("cpu"))
    cached = [data.concat[(0, i)] for i in range(len(data.concat))]
    assert {item["flipped"] for item in cached} == {True, False}
    for a, b in zip(live, cached, strict=True):
        assert torch.allclose(to_latent_grid(a["mask"][None], (4, 4))[0], b["mask"], atol=1e-6)


def test_options_without_masks_and_masks_without_the_option(tmp_path, tiny_images, caplog):
    from library.dataset_config import DatasetDefaults, load_dataset_config
    from library.families.diffusion_parts import with_loss_masks

    plain = load_dataset_config(_dataset_toml(tmp_path, "", None), DatasetDefaults())
    (tmp_path / "m").mkdir()
    with pytest.raises(UserError, match="no subset .* has a mask.*alpha_mask"):
        with_loss_masks(plain, masked_loss=True)
    masked = load_dataset_config(_dataset_toml(tmp_path, "alpha_mask = true"), DatasetDefaults())
    unused = with_loss_masks(masked, masked_loss=False)
    assert not unused.datasets[0].subsets[0].alpha_mask and "masks are not used" in caplog.text


def test_a_missing_mask_file_is_named(tmp_path):
    from library.data.images import ImageCaptionDataset
    from library.dataset_config import DatasetDefaults, load_dataset_config

    (tmp_path / "m").mkdir()
    (tmp_path / "masks").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "m" / "a.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "m" / "b.png")
    Image.new("L", (64, 64), 255).save(tmp_path / "masks" / "a.png")
    config = load_dataset_config(_dataset_toml(tmp_path, f'conditioning_data_dir = "{tmp_path / "masks"}"'),
                                 DatasetDefaults())
    with pytest.raises(UserError, match=r"1 image\(s\) have no mask of the same name .*: b\.png"):
        ImageCaptionDataset(config.datasets[0], seed=0)


def test_a_run_with_fully_transparent_images_learns_nothing(tmp_path, tiny_sd_dir):
    from safetensors.torch import load_file

    import train_network

    (tmp_path / "m").mkdir()
    for i in range(2):
        Image.new("RGBA", (64, 64), (255, 0, 0, 0)).save(tmp_path / "m" / f"{i}.png")
    toml = _dataset_toml(tmp_path, "alpha_mask = true")
    common = ["--pretrained_model_name_or_path", str(tiny_sd_dir), "--dataset_config", str(toml),
              "--max_train_steps", "2", "--network_dim", "4", "--learning_rate", "1e-2", "--seed", "0"]
    for name, extra in (("masked", ["--masked_loss"]), ("plain", [])):
        assert train_network.main([*common, "--output_dir", str(tmp_path / name), *extra]) == 0
    ups = {name: [v for k, v in load_file(str(tmp_path / name / "last.safetensors")).items() if "lora_up" in k]
           for name in ("masked", "plain")}
    assert all(v.abs().max() == 0 for v in ups["masked"])  # zero mask: zero loss, zero gradient
    assert any(v.abs().max() > 0 for v in ups["plain"])
