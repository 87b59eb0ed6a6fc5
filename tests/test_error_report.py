"""A UserError that every process of a launch hits is printed once per machine, different ones each."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _launch(messages: list[str], world_size: int) -> str:
    """Run one process per message, all children of this process (as workers are of their launcher)."""
    code = textwrap.dedent("""
        import sys
        from library.error_report import report_error
        from library.errors import UserError
        report_error(UserError(sys.argv[1]))
    """)
    env = {**os.environ, "WORLD_SIZE": str(world_size), "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", code, m], env=env, stderr=subprocess.PIPE, text=True)
             for m in messages]
    return "".join(p.communicate()[1] for p in procs)


def test_the_same_error_of_every_process_prints_once():
    message = f"bad --resolution abc ({uuid.uuid4()})"  # unique: markers of earlier test runs never match
    err = _launch([message] * 3, world_size=3)
    assert err.count(f"error: {message}") == 1, err


def test_different_errors_all_print():
    tag = uuid.uuid4()
    err = _launch([f"image a.png is broken ({tag})", f"image b.png is broken ({tag})"], world_size=2)
    assert f"error: image a.png is broken ({tag})" in err and f"error: image b.png is broken ({tag})" in err


def test_a_single_process_always_prints():
    message = f"repeated ({uuid.uuid4()})"
    # two separate single-process runs (no launcher): both print
    assert _launch([message], world_size=1).count("error:") == 1
    assert _launch([message], world_size=1).count("error:") == 1
