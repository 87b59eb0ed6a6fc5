"""Printing a UserError once per machine when several processes of one launch hit it.

Under ``accelerate launch`` every process runs the same checks on the same files, so a bad argument used
to print the same paragraph once per GPU. Now the first process of the machine (``LOCAL_RANK`` 0) always
prints, and leaves a marker keyed on the launch and the message; another process of the same launch stays
quiet only when that marker for the very same message is there. So:

- nothing is hidden outside a launcher (``python train_network.py`` run twice from a shell that happens
  to export ``WORLD_SIZE``): without ``LOCAL_RANK`` and a launch id every error prints;
- local rank 0 never stays quiet, and a message that differs (an image only one process's share of the
  data holds), or one another machine sees, is printed by the process that hit it;
- another process waits up to two seconds for local rank 0's marker; if rank 0 is slower than that, or
  never hits the error, the line is printed (at worst a repeat).
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

_FOLDER = "lora-train-errors"
_STALE_S = 24 * 3600  # markers older than a day are from launches long gone
_WAIT_S = 2.0  # how long another process waits for local rank 0's marker before printing itself


def _launch_key() -> str | None:
    """This launch on this machine: the launcher process (pid and start time: pids are reused), its rendezvous
    and restart count; None outside a launcher."""
    env = os.environ
    if env.get("LOCAL_RANK") is None or not (env.get("TORCHELASTIC_RUN_ID") or env.get("MASTER_PORT")):
        return None
    parent = os.getppid()
    try:
        # field 22 of /proc/<pid>/stat is the start time; the name in field 2 may hold spaces, so split after ")"
        start = Path(f"/proc/{parent}/stat").read_text().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None
    parts = (str(parent), start, env.get("TORCHELASTIC_RUN_ID", ""), env.get("MASTER_PORT", ""),
             env.get("TORCHELASTIC_RESTART_COUNT", "0"))
    return hashlib.sha1("\0".join(parts).encode()).hexdigest()[:16]


def _marker(key: str, message: str) -> Path:
    digest = hashlib.sha1(message.encode("utf-8")).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / _FOLDER / f"{key}-{digest}"


def should_print(message: str) -> bool:
    """Whether this process prints ``message`` (see the module docstring)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return True
    key = _launch_key()
    if key is None:
        return True
    marker = _marker(key, message)
    if os.environ.get("LOCAL_RANK") != "0":
        # The processes hit a shared error at about the same moment: give local rank 0 a moment to mark it.
        deadline = time.monotonic() + _WAIT_S
        while not marker.exists():
            if time.monotonic() > deadline:
                return True
            time.sleep(0.05)
        return False
    try:
        marker.parent.mkdir(exist_ok=True)
        marker.touch()
        now = time.time()
        for old in marker.parent.iterdir():  # tidy up after launches long gone
            if now - old.stat().st_mtime > _STALE_S:
                old.unlink(missing_ok=True)
    except OSError:  # an unwritable temp folder: the others print too, which is only a repeat
        pass
    return True


def report_error(error: BaseException) -> None:
    """``error: <message>`` on stderr, once per machine for a message every process of a launch hits."""
    line = f"error: {error}"
    if should_print(line):
        print(line, file=sys.stderr)
