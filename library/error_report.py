"""Printing a UserError once per machine when several processes of one launch hit it.

Under ``accelerate launch`` every process runs the same checks on the same files, so a bad argument used
to print the same paragraph once per GPU. Each process now claims the message with an exclusively created
marker file keyed on the launcher process (the parent every worker of a machine shares) and the message
text: the first process prints it, the others stay quiet. Messages that differ (an image that only one
process's share of the data holds) are all printed, and a machine whose files differ from the others'
(several nodes without shared storage) prints its own, so no error is ever silent.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path


def _launcher_key() -> str | None:
    """The launcher process of this machine, as pid and start time (pids are reused; the pair is not)."""
    parent = os.getppid()
    try:
        # field 22 of /proc/<pid>/stat is the start time; the name in field 2 may hold spaces, so split after ")"
        start = Path(f"/proc/{parent}/stat").read_text().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None
    return f"{parent}-{start}"


def first_to_report(message: str) -> bool:
    """Whether this process is the first of its launch on this machine to report ``message``."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return True
    key = _launcher_key()
    if key is None:  # no /proc (not Linux): rather a repeated message than a lost one
        return True
    digest = hashlib.sha1(message.encode("utf-8")).hexdigest()[:16]
    marker = Path(tempfile.gettempdir()) / f"lora-train-error-{key}-{digest}"
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return False
    except OSError:  # an unwritable temp folder must not hide the error
        return True
    return True


def report_error(error: BaseException) -> None:
    """``error: <message>`` on stderr, once per machine for a message every process of a launch hits."""
    line = f"error: {error}"
    if first_to_report(line):
        print(line, file=sys.stderr)
