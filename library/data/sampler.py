"""The order in which samples are trained: one global, bucket-aware shuffle per epoch.

CONTRACTS.md §3: the order depends only on (seed, epoch, the bucket of each sample, the
global batch size), never on the number of processes. For each epoch:

1. all sample indices are shuffled with a generator seeded from (seed, epoch);
2. they are grouped by bucket (keeping the shuffled order), and each group is cut into
   *global* batches of ``batch_size × num_processes`` samples, so a batch never mixes buckets;
3. the global batches are shuffled;
4. process ``rank`` takes its contiguous slice ``[rank·b, (rank+1)·b)`` of every global batch.

So N processes × batch b see exactly the samples that 1 process × batch N·b sees, step by
step. **Short last batch of a bucket**: it is filled up to the global batch size by wrapping
around to the first samples of the same bucket (in this epoch's order), so every process gets
the same number of batches, all of exactly ``batch_size`` samples (DDP never waits on a process
with fewer batches, and no small bucket is dropped). A few samples therefore appear twice in an
epoch; steps per epoch = Σ over buckets of ceil(samples in bucket / global batch size), the
same count sd-scripts gives for one process.
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


def _check(batch_size: int, num_processes: int, rank: int) -> None:
    if batch_size < 1 or num_processes < 1:
        raise ValueError(f"batch_size ({batch_size}) and num_processes ({num_processes}) must be >= 1")
    if not 0 <= rank < num_processes:
        raise ValueError(f"rank {rank} is outside 0..{num_processes - 1}")


def global_batches(buckets: Sequence[Hashable], global_batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Step 1-3 above: this epoch's global batches of sample indices, each of one bucket."""
    rng = random.Random(derive_seed(seed, epoch, "order"))
    order = list(range(len(buckets)))
    rng.shuffle(order)
    groups: dict[Hashable, list[int]] = {}
    for index in order:
        groups.setdefault(buckets[index], []).append(index)
    batches: list[list[int]] = []
    for bucket in sorted(groups, key=repr):  # repr: any hashable bucket key sorts deterministically
        members = groups[bucket]
        for start in range(0, len(members), global_batch_size):
            batch = members[start : start + global_batch_size]
            missing = global_batch_size - len(batch)
            batch += [members[i % len(members)] for i in range(missing)]  # wrap within the bucket
            batches.append(batch)
    rng.shuffle(batches)
    return batches


def epoch_batches(
    buckets: Sequence[Hashable], batch_size: int, num_processes: int, rank: int, seed: int, epoch: int
) -> list[list[int]]:
    """The batches (lists of sample indices) process ``rank`` trains on in ``epoch``.

    ``buckets[i]`` is the bucket of sample i; ``batch_size`` is per process.
    """
    _check(batch_size, num_processes, rank)
    start = rank * batch_size
    everything = global_batches(buckets, batch_size * num_processes, seed, epoch)
    return [batch[start : start + batch_size] for batch in everything]


def steps_per_epoch(buckets: Sequence[Hashable], batch_size: int, num_processes: int = 1) -> int:
    """Batches per process per epoch (optimizer steps per epoch before gradient accumulation)."""
    _check(batch_size, num_processes, 0)
    per_global = batch_size * num_processes
    return sum(math.ceil(count / per_global) for count in Counter(buckets).values())


class EpochBatchSampler:
    """A batch sampler for ``torch.utils.data.DataLoader(batch_sampler=...)`` over ``epoch_batches``.

    Yields lists of ``(epoch, sample_index)`` keys (``yield_epoch=True``), which
    ``ImageCaptionDataset`` accepts: the epoch then travels with each key, so persistent
    DataLoader workers (which keep their own copy of the dataset) never use a stale epoch.

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
    ) -> None:
        _check(batch_size, num_processes, rank)
        self.buckets = list(buckets)
        self.batch_size = batch_size
        self.num_processes = num_processes
        self.rank = rank
        self.seed = seed
        self.yield_epoch = yield_epoch
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch; on resume, ``skip_batches`` = batches already trained in it
        (optimizer steps done in this epoch × gradient_accumulation_steps)."""
        if skip_batches < 0:
            raise ValueError(f"skip_batches must be >= 0, got {skip_batches}")
        self.epoch = epoch
        self.skip = skip_batches

    def __len__(self) -> int:
        return max(0, steps_per_epoch(self.buckets, self.batch_size, self.num_processes) - self.skip)

    def __iter__(self) -> Iterator[list]:
        batches = epoch_batches(self.buckets, self.batch_size, self.num_processes, self.rank, self.seed, self.epoch)
        for batch in batches[self.skip :]:
            yield [(self.epoch, i) for i in batch] if self.yield_epoch else list(batch)
