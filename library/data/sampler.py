"""The order in which samples are trained: one global, bucket-aware shuffle per epoch.

CONTRACTS.md §3: the order depends only on (seed, epoch, the bucket of each sample, the
samples per optimizer step), never on how an optimizer step is split between processes and
gradient accumulation. With ``b`` = batch size per process, ``P`` = processes and ``A`` =
gradient accumulation steps, an optimizer step trains ``b·P·A`` samples. For each epoch:

1. all sample indices are shuffled with a generator seeded from (seed, epoch);
2. they are grouped by bucket (keeping the shuffled order), and each group is cut into
   *optimizer-step groups* of ``b·P·A`` samples, so a step never mixes buckets;
3. the step groups are shuffled;
4. each step group is split into ``A`` consecutive *micro-batches* of ``b·P`` samples (one per
   accumulation step), and process ``rank`` takes its contiguous slice ``[rank·b, (rank+1)·b)``
   of every micro-batch.

So an optimizer step's samples are the same whatever the split: 1 process × batch b ×
accumulation 2, 2 processes × batch b × accumulation 1 and 1 process × batch 2b train the same
samples step by step (P×A is what matters, as CONTRACTS §4 compares it on resume).
**Short last group of a bucket**: it is filled up to ``b·P·A`` samples by wrapping around to
the first samples of the same bucket (in this epoch's order), so every process gets the same
number of micro-batches, all of exactly ``b`` samples (DDP never waits on a process with fewer
batches, and no small bucket is dropped), and every epoch ends on a complete accumulation group.
A few samples therefore appear twice in an epoch (fewer than ``b·P·A`` per bucket); optimizer
steps per epoch = Σ over buckets of ceil(samples in bucket / (b·P·A)), and micro-batches per
process per epoch = that × A. With A = 1 this is sd-scripts' step count for one process.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter
from collections.abc import Hashable, Iterator, Sequence


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from its parts, identical in every process and Python run.

    (Python's ``hash`` of a string changes per process, so a cryptographic digest is used.)
    """
    digest = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _check(batch_size: int, num_processes: int, rank: int, accumulation: int = 1) -> None:
    if batch_size < 1 or num_processes < 1 or accumulation < 1:
        raise ValueError(f"batch_size ({batch_size}), num_processes ({num_processes}) and accumulation "
                         f"({accumulation}) must be >= 1")
    if not 0 <= rank < num_processes:
        raise ValueError(f"rank {rank} is outside 0..{num_processes - 1}")


def global_batches(buckets: Sequence[Hashable], global_batch_size: int, seed: int, epoch: int,
                   accumulation: int = 1) -> list[list[int]]:
    """Step 1-4 above before the split by rank: this epoch's micro-batches of ``global_batch_size``
    (= b·P) sample indices, each of one bucket; every ``accumulation`` consecutive ones form one
    optimizer step."""
    if global_batch_size < 1 or accumulation < 1:
        raise ValueError(f"global_batch_size ({global_batch_size}) and accumulation ({accumulation}) must be >= 1")
    rng = random.Random(derive_seed(seed, epoch, "order"))
    order = list(range(len(buckets)))
    rng.shuffle(order)
    groups: dict[Hashable, list[int]] = {}
    for index in order:
        groups.setdefault(buckets[index], []).append(index)
    step_size = global_batch_size * accumulation
    steps: list[list[int]] = []
    for bucket in sorted(groups, key=repr):  # repr: any hashable bucket key sorts deterministically
        members = groups[bucket]
        for start in range(0, len(members), step_size):
            step = members[start : start + step_size]
            missing = step_size - len(step)
            step += [members[i % len(members)] for i in range(missing)]  # wrap within the bucket
            steps.append(step)
    rng.shuffle(steps)
    return [step[i : i + global_batch_size] for step in steps for i in range(0, step_size, global_batch_size)]


def epoch_batches(
    buckets: Sequence[Hashable], batch_size: int, num_processes: int, rank: int, seed: int, epoch: int,
    accumulation: int = 1,
) -> list[list[int]]:
    """The micro-batches (lists of sample indices) process ``rank`` trains on in ``epoch``.

    ``buckets[i]`` is the bucket of sample i; ``batch_size`` is per process; every
    ``accumulation`` consecutive micro-batches make one optimizer step.
    """
    _check(batch_size, num_processes, rank, accumulation)
    start = rank * batch_size
    everything = global_batches(buckets, batch_size * num_processes, seed, epoch, accumulation)
    return [batch[start : start + batch_size] for batch in everything]


def steps_per_epoch(buckets: Sequence[Hashable], batch_size: int, num_processes: int = 1,
                    accumulation: int = 1) -> int:
    """Micro-batches per process per epoch; always a multiple of ``accumulation`` (the optimizer
    steps per epoch are this divided by ``accumulation``)."""
    _check(batch_size, num_processes, 0, accumulation)
    per_step = batch_size * num_processes * accumulation
    return accumulation * sum(math.ceil(count / per_step) for count in Counter(buckets).values())


class EpochBatchSampler:
    """A batch sampler for ``torch.utils.data.DataLoader(batch_sampler=...)`` over ``epoch_batches``.

    Yields lists of ``(epoch, sample_index)`` keys (``yield_epoch=True``), which
    ``ImageCaptionDataset`` accepts: the epoch then travels with each key, so persistent
    DataLoader workers (which keep their own copy of the dataset) never use a stale epoch.

    ``accumulation`` is the run's gradient accumulation steps: every ``accumulation`` consecutive
    batches are one optimizer step's group (module docstring), and ``len()`` is a multiple of it.

    Do not pass the DataLoader through ``accelerator.prepare``: this sampler already gives each
    process its own slice, and accelerate would shard it a second time.
    """

    def __init__(
        self,
        buckets: Sequence[Hashable],
        batch_size: int,
        num_processes: int = 1,
        rank: int = 0,
        seed: int = 0,
        yield_epoch: bool = True,
        accumulation: int = 1,
    ) -> None:
        _check(batch_size, num_processes, rank, accumulation)
        self.buckets = list(buckets)
        self.batch_size = batch_size
        self.num_processes = num_processes
        self.rank = rank
        self.seed = seed
        self.yield_epoch = yield_epoch
        self.accumulation = accumulation
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch; on resume, ``skip_batches`` = batches already trained in it
        (optimizer steps done in this epoch × gradient_accumulation_steps, so the rest starts on
        the first micro-batch of the next step's group)."""
        if skip_batches < 0:
            raise ValueError(f"skip_batches must be >= 0, got {skip_batches}")
        self.epoch = epoch
        self.skip = skip_batches

    def __len__(self) -> int:
        return max(0, steps_per_epoch(self.buckets, self.batch_size, self.num_processes,
                                   self.accumulation) - self.skip)

    def __iter__(self) -> Iterator[list]:
        batches = epoch_batches(self.buckets, self.batch_size, self.num_processes, self.rank, self.seed, self.epoch,
                                self.accumulation)
        for batch in batches[self.skip :]:
            yield [(self.epoch, i) for i in batch] if self.yield_epoch else list(batch)
