"""The README stays true: its argument reference is the parser's, and CI runs its test command."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_argument_reference_matches_the_parser():
    import importlib.util

    spec = importlib.util.spec_from_file_location("args_reference", ROOT / "tools" / "args_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index(module.BEGIN) + len(module.BEGIN):readme.index(module.END)]
    assert block.strip() == module.reference().strip(), "run: python tools/args_reference.py --update"


def test_quick_start_commands_exist_and_ci_runs_the_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "./demo.sh" in readme and "./test.sh" in readme
    assert (ROOT / "demo.sh").is_file() and (ROOT / "test.sh").is_file()
    assert "bash test.sh" in (ROOT / ".ci" / "run").read_text()
