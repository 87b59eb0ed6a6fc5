"""Per-sample random generators keyed on (seed, step or epoch, global sample index).

Every random draw that shapes training (noise, timesteps, latent sampling) comes from a
generator derived from these keys, never from a process's own running RNG: then two
processes give the same draws as one, and a resumed run gives the draws the straight run
would have (CONTRACTS.md §3).
"""

from __future__ import annotations

import hashlib

import torch


def derived_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys; stable across processes, platforms and versions."""
    digest = hashlib.blake2b(",".join(str(int(k)) for k in keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def sample_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from ``keys``."""
    return torch.Generator().manual_seed(derived_seed(*keys))


def per_sample_randn(shape: tuple[int, ...], keys: list[tuple[int, ...]]) -> torch.Tensor:
    """Stack one standard-normal tensor of ``shape`` per key tuple (on the CPU)."""
    return torch.stack([torch.randn(shape, generator=sample_generator(*k)) for k in keys])


def per_sample_randint(low: int, high: int, keys: list[tuple[int, ...]]) -> torch.Tensor:
    """One integer in [low, high) per key tuple."""
    return torch.cat([torch.randint(low, high, (1,), generator=sample_generator(*k)) for k in keys])
