"""The epoch order is grouped by optimizer step: processes × accumulation is what matters.

1 process × batch b × accumulation 2, 2 processes × batch b and 1 process × batch 2b train the
same samples at every optimizer step (library/data/sampler.py), and a training run with
accumulation ends with the same LoRA as one with the whole batch at once.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import train_network
from library.data.sampler import EpochBatchSampler, epoch_batches, global_batches, steps_per_epoch
from library.loss_curve import read_loss_curve

# three buckets of 23, 9 and 2 samples: none is a multiple of the step sizes below
BUCKETS = [(64, 64)] * 23 + [(96, 48)] * 9 + [(48, 96)] * 2


def _per_step(batch: int, processes: int, accumulation: int, seed: int, epoch: int) -> list[list[int]]:
    """Each optimizer step's samples: its micro-batches in order, each as rank 0's slice, rank 1's, ..."""
    per_rank = [epoch_batches(BUCKETS, batch, processes, rank, seed, epoch, accumulation)
                for rank in range(processes)]
    assert len({len(r) for r in per_rank}) == 1  # every process trains the same number of micro-batches
    micro = [sum((r[i] for r in per_rank), []) for i in range(len(per_rank[0]))]
    assert len(micro) % accumulation == 0
    return [sum(micro[i:i + accumulation], []) for i in range(0, len(micro), accumulation)]


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_an_optimizer_step_trains_the_same_samples_whatever_the_split(batch):
    for epoch in range(3):
        accumulated = _per_step(batch, 1, 2, seed=11, epoch=epoch)
        assert accumulated == _per_step(batch, 2, 1, seed=11, epoch=epoch)
        assert accumulated == _per_step(2 * batch, 1, 1, seed=11, epoch=epoch)
        # four samples-per-batch units per step, split every way
        four = _per_step(batch, 1, 4, seed=11, epoch=epoch)
        assert four == _per_step(batch, 2, 2, seed=11, epoch=epoch) == _per_step(batch, 4, 1, seed=11, epoch=epoch)
        assert four == _per_step(2 * batch, 2, 1, seed=11, epoch=epoch) == _per_step(4 * batch, 1, 1, 11, epoch)
        assert four != accumulated  # the step size, not the split, decides the order
        for step in accumulated + four:
            assert len({BUCKETS[i] for i in step}) == 1  # a step never mixes buckets


@pytest.mark.parametrize("batch, processes, accumulation", [(1, 1, 2), (2, 1, 3), (1, 2, 2), (3, 2, 4), (2, 1, 1)])
def test_epochs_are_whole_optimizer_steps(batch, processes, accumulation):
    expected = sum(-(-n // (batch * processes * accumulation)) for n in Counter(BUCKETS).values()) * accumulation
    count = steps_per_epoch(BUCKETS, batch, processes, accumulation)
    assert count == expected and count % accumulation == 0
    for rank in range(processes):
        sampler = EpochBatchSampler(BUCKETS, batch, processes, rank, seed=5, accumulation=accumulation)
        sampler.set_epoch(1)
        batches = list(sampler)
        assert len(sampler) == len(batches) == count
        assert batches == [[(1, i) for i in b] for b in epoch_batches(BUCKETS, batch, processes, rank, 5, 1,
                                                                       accumulation)]
        assert all(len(b) == batch for b in batches)
        # resume after 2 optimizer steps: the rest starts with the third step's first micro-batch
        sampler.set_epoch(1, skip_batches=2 * accumulation)
        assert list(sampler) == batches[2 * accumulation:] and len(sampler) == count - 2 * accumulation


def test_short_last_step_is_filled_within_its_bucket():
    # buckets of 5 and 3 samples, 1 per micro-batch, accumulation 2: 3 + 2 steps, the short ones wrapped
    buckets = [(1, 1)] * 5 + [(2, 2)] * 3
    micro = global_batches(buckets, 1, seed=0, epoch=0, accumulation=2)
    assert len(micro) == steps_per_epoch(buckets, 1, 1, 2) == 10  # not 8: no half step at the end
    steps = [micro[i] + micro[i + 1] for i in range(0, 10, 2)]
    assert all(len({buckets[i] for i in s}) == 1 for s in steps)
    seen = Counter(i for s in steps for i in s)
    assert set(seen) == set(range(8)) and sum(seen.values()) == 10  # every sample, 2 wrapped duplicates
    # accumulation 1 keeps the order it always had
    assert global_batches(buckets, 2, seed=0, epoch=0) == global_batches(buckets, 2, seed=0, epoch=0, accumulation=1)


def test_bad_accumulation_is_refused():
    with pytest.raises(ValueError):
        steps_per_epoch(BUCKETS, 2, 1, 0)
    with pytest.raises(ValueError):
        EpochBatchSampler(BUCKETS, 2, accumulation=0)


def test_plan_steps_needs_whole_steps():
    from library.train_setup import plan_steps

    plan = plan_steps(12, 3, 100, 2)
    assert plan.steps_per_epoch == 4 and plan.max_train_steps == 8 and plan.num_epochs == 2
    with pytest.raises(ValueError, match="not whole optimizer steps"):
        plan_steps(10, 3, 100, None)  # a sampler built without the accumulation


# --- training: accumulation gives the weights of the whole batch at once ----------------------------------


def _run(model: Path, data: Path, out: Path, *extra: str) -> dict[str, torch.Tensor]:
    # SGD: AdamW divides by sqrt(v) + 1e-8, which turns float rounding in near-zero gradients into
    # differences of ~2e-5 after one step (gone with eps=1e-4); SGD shows the gradients themselves.
    argv = ["--pretrained_model_name_or_path", str(model), "--dataset_config", str(data), "--output_dir", str(out),
            "--output_name", "lora", "--network_dim", "4", "--optimizer_type", "SGD", "--learning_rate", "1",
            "--seed", "3", "--cache_latents", "--network_train_unet_only", *extra]
    assert train_network.main(argv) == 0
    return load_file(str(out / "lora.safetensors"))


@pytest.fixture
def mixed_data(tmp_path):
    """data(batch_size) -> a dataset TOML over 5 images in buckets of 3 and 2."""
    from PIL import Image

    images = tmp_path / "mixed"
    images.mkdir()
    for i, size in enumerate([(64, 64)] * 3 + [(96, 48)] * 2):
        Image.new("RGB", size, (50 * i % 255, 90, 200 - 30 * i)).save(images / f"{i:02d}.png")
        (images / f"{i:02d}.caption").write_text(f"sks shape {i}")

    def data(batch_size: int) -> Path:
        path = tmp_path / f"data{batch_size}.toml"
        path.write_text(f"[[datasets]]\nresolution = 64\nbatch_size = {batch_size}\nenable_bucket = true\n"
                        f"min_bucket_reso = 32\nmax_bucket_reso = 128\nbucket_reso_steps = 16\n"
                        f"[[datasets.subsets]]\nimage_dir = \"{images}\"\n")
        return path

    return data


def test_accumulation_trains_like_one_big_batch(tmp_path, tiny_sd_dir, mixed_data):
    # 2 samples per optimizer step: 2 + 1 = 3 steps per epoch, the 3-image bucket's last step
    # wrapped; step 4 is in the second epoch
    whole = _run(tiny_sd_dir, mixed_data(2), tmp_path / "whole", "--max_train_steps", "4")
    accumulated = _run(tiny_sd_dir, mixed_data(1), tmp_path / "accumulated", "--max_train_steps", "4",
                       "--gradient_accumulation_steps", "2")
    assert whole.keys() == accumulated.keys()
    worst = max((whole[k] - accumulated[k]).abs().max().item() for k in whole)
    assert worst < 1e-6, f"largest difference {worst}"  # 1.5e-8 here; 1.6e-3 with the order of batch 1
    assert any(v.abs().sum() > 0 for k, v in whole.items() if "lora_up" in k)
    # the logged loss of a step is the mean over its micro-batches, as the batch-2 run logs it
    curves = [read_loss_curve(tmp_path / name / "lora_loss.csv", up_to=10**9) for name in ("whole", "accumulated")]
    assert [s for s, _, _ in curves[0]] == [s for s, _, _ in curves[1]] == [1, 2, 3, 4]
    for (_, a, _), (_, b, _) in zip(*curves, strict=True):
        assert a == pytest.approx(b, rel=1e-5)


def test_resume_inside_an_epoch_with_accumulation_is_exact(tmp_path, tiny_sd_dir, mixed_data):
    data = mixed_data(1)
    acc = ("--gradient_accumulation_steps", "2")
    straight = _run(tiny_sd_dir, data, tmp_path / "straight", "--max_train_steps", "5", *acc)
    split = tmp_path / "split"
    # stopped after step 2 of the 3-step epoch (4 of its 6 micro-batches), then resumed to step 5
    _run(tiny_sd_dir, data, split, "--max_train_steps", "2", "--save_state", *acc)
    state = json.loads((split / "lora-state" / "train_state.json").read_text())
    assert (state["epoch"], state["batches_done_in_epoch"]) == (0, 4)
    resumed = _run(tiny_sd_dir, data, split, "--max_train_steps", "5", "--resume", "latest", *acc)
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_resume_may_move_the_batch_into_accumulation(tmp_path, tiny_sd_dir, mixed_data):
    # Saved with batch 2 (accumulation 1) after step 2 of 3, resumed with batch 1 x accumulation 2: the same
    # 2 samples per optimizer step, so the same weights as a straight batch-2 run. The saved batches-done
    # count (2 micro-batches) must become 4 micro-batches of the new run, and accelerate's restored
    # micro-step counter must start a new accumulation group.
    straight = _run(tiny_sd_dir, mixed_data(2), tmp_path / "straight", "--max_train_steps", "5")
    split = tmp_path / "split"
    _run(tiny_sd_dir, mixed_data(2), split, "--max_train_steps", "2", "--save_state")
    resumed = _run(tiny_sd_dir, mixed_data(1), split, "--max_train_steps", "5", "--resume", "latest",
                   "--gradient_accumulation_steps", "2")  # the same samples per step: no --resume_allow_changes
    worst = max((straight[k] - resumed[k]).abs().max().item() for k in straight)
    assert worst < 1e-6, f"largest difference {worst}"


def test_resume_with_a_smaller_step_still_trains_to_max_train_steps(tmp_path, tiny_sd_dir, mixed_data):
    # Saved at the end of a 3-step epoch of 2 samples per step, resumed with 1 sample per step
    # (--resume_allow_changes): the epoch now holds 5 steps, so the run needs a second epoch to reach step 5,
    # and the samples the first epoch already saw are not trained again.
    split = tmp_path / "split"
    _run(tiny_sd_dir, mixed_data(1), split, "--max_train_steps", "3", "--save_state_on_train_end",
         "--gradient_accumulation_steps", "2")
    _run(tiny_sd_dir, mixed_data(1), split, "--max_train_steps", "5", "--resume", "latest", "--resume_allow_changes")
    steps = [s for s, _, _ in read_loss_curve(split / "lora_loss.csv", up_to=10**9)]
    assert steps == [1, 2, 3, 4, 5]
    metadata = safe_open(str(split / "lora.safetensors"), "pt").metadata()
    assert metadata["ss_steps"] == "5"
