"""How the benchmark measures a step: its time (CUDA events, wall or CPU clock), FLOPs and saved activations."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def timed(fn: Callable[[], None], device: torch.device, clock: str = "wall") -> float:
    if clock == "cpu":  # CPU seconds of this process: steadier than wall time on a shared machine
        t0 = time.process_time()
        fn()
        return time.process_time() - t0
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def count_flops(fn: Callable[[], None]) -> int:
    from torch.utils.flop_counter import FlopCounterMode, flop_registry

    aten = torch.ops.aten
    # The in-place products of the fused path do the same work as their out-of-place forms.
    flop_registry.setdefault(aten.addmm_, flop_registry[aten.addmm])
    flop_registry.setdefault(aten.baddbmm_, flop_registry[aten.baddbmm])
    # force_eager: under a dispatch mode dynamo skips a frame and marks its code object to run eagerly from then on,
    # which left every later compiled implementation of the process uncompiled; the count is of the eager form
    with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def saved_bytes(fn: Callable[[], None]) -> int:
    """Bytes of the distinct storages autograd saves for backward during ``fn``'s forward."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.compiler.set_stance("force_eager"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()  # eager, as count_flops: the eager form's saved tensors (Inductor's partitioner may keep others)
    return sum(seen.values())
