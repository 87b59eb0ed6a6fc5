"""A UserError that every process of a launch hits is printed once per machine; nothing is ever hidden."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = textwrap.dedent("""
    import sys
    from library.error_report import report_error
    from library.errors import UserError
    report_error(UserError(sys.argv[1]))
""")


def _launch(messages: list[str], world_size: int, launcher: bool = True, port: str = "29500") -> str:
    """One process per message, all children of this process (as workers are of their launcher); the first is
    local rank 0."""
    procs = []
    for rank, message in enumerate(messages):
        env = {**os.environ, "WORLD_SIZE": str(world_size), "PYTHONPATH": str(ROOT)}
        env.pop("LOCAL_RANK", None)
        if launcher:
            env.update(LOCAL_RANK=str(rank), MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-c", CODE, message], env=env, stderr=subprocess.PIPE,
                                      text=True))
    return "".join(p.communicate()[1] for p in procs)


def test_the_same_error_of_every_process_prints_once():
    message = f"bad --resolution abc ({uuid.uuid4()})"  # unique: markers of earlier test runs never match
    err = _launch([message] * 3, world_size=3)
    assert err.count(f"error: {message}") == 1, err


def test_different_errors_all_print():
    tag = uuid.uuid4()
    err = _launch([f"image a.png is broken ({tag})", f"image b.png is broken ({tag})"], world_size=2)
    assert f"error: image a.png is broken ({tag})" in err and f"error: image b.png is broken ({tag})" in err


def test_a_second_launch_prints_the_same_error_again():
    message = f"same mistake twice ({uuid.uuid4()})"
    port = str(20000 + uuid.uuid4().int % 10000)
    assert _launch([message] * 2, world_size=2, port=port).count("error:") == 1
    # the same launcher (this process) and port, again: local rank 0 always prints
    assert _launch([message] * 2, world_size=2, port=port).count("error:") >= 1


def test_without_a_launcher_nothing_is_deduplicated():
    message = f"exported WORLD_SIZE ({uuid.uuid4()})"
    # a shell that exports WORLD_SIZE but runs the script directly, twice: both runs print
    assert _launch([message], world_size=4, launcher=False).count("error:") == 1
    assert _launch([message], world_size=4, launcher=False).count("error:") == 1


def test_the_stop_line_of_a_launch_prints_once_per_machine_too(monkeypatch, capsys):
    """Every process of a launch stops at the same step with the same '--resume' line (resume audit F6)."""
    import train_network
    from library.signals import Interrupted

    def stopped(args, sources):
        raise Interrupted(143, "Stopped by signal 15 after step 3; saved out/lora-step00000003-state.")

    monkeypatch.setattr(train_network, "train", stopped)
    argv = ["--pretrained_model_name_or_path", "m", "--output_dir", "o", "--train_data_dir", "d"]
    monkeypatch.setattr(train_network, "should_print", lambda message: True)
    assert train_network.main(argv) == 143
    assert "Stopped by signal 15 after step 3" in capsys.readouterr().err
    monkeypatch.setattr(train_network, "should_print", lambda message: False)  # another process printed it
    assert train_network.main(argv) == 143
    assert "Stopped by signal" not in capsys.readouterr().err
