"""SIGTERM / SIGINT: finish the current step, save a resumable state, then exit.

The handler only records the signal; the loop asks ``should_stop`` after each optimizer step.
With several processes the flag is all-reduced, so every process stops at the same step
(one process alone stopping would leave the others waiting in a collective until timeout).
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator
from types import FrameType

import torch


class StopRequest:
    """Installs the handlers on enter, restores the previous ones on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some test runners): no handler
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signum = signum

    def should_stop(self, num_processes: int, device: torch.device) -> bool:
        """True on every process once any process received a signal."""
        local = self.signum or 0
        if num_processes > 1:
            import torch.distributed as dist

            flag = torch.tensor([local], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            local = int(flag.item())
            if self.signum is None and local:
                self.signum = local
        return bool(local)

    @property
    def exit_code(self) -> int:
        """128 + signal number: 143 for SIGTERM, 130 for SIGINT."""
        return 128 + (self.signum or 0)


class Interrupted(Exception):
    """Raised by the loop after saving, carrying the process exit code."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Terminated(BaseException):
    """SIGTERM outside the training loop (loading, caching, the final save): unwinds like Ctrl-C does, so a
    half-started run cleans up after itself instead of dying where it stands."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def terminate_as_exception() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` while inside (the loop's StopRequest takes over during training)."""
    def raise_terminated(signum: int, _frame: FrameType | None) -> None:
        raise Terminated(signum)

    try:
        previous = signal.signal(signal.SIGTERM, raise_terminated)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stop_when_launcher_dies() -> None:
    """Ask Linux to send us SIGTERM if the process that launched us dies.

    ``accelerate launch`` (one process) does not forward SIGTERM to the training process: a
    job scheduler that stops the launcher would leave training running unsupervised. With
    this, the training process gets SIGTERM too and saves a resumable state. No-op elsewhere.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
