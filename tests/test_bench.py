"""bench/bench_lora_step.py runs (one step of each implementation on the tiny cases) and reports what it claims.

A smoke test, not a timing: the ratios are only checked to exist and be positive; FLOP counts and memory are
checked where they follow from the implementation (gradient checkpointing saves less and recomputes more, fp8
halves the resident base weights, PEFT and ours hold the same trainable parameter count).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_lora_step.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_lora_step", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_lora_step"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_lora_step", None)


def test_tiny_cases_report_every_implementation_and_feature(bench, tmp_path, capsys):
    out = tmp_path / "r.json"
    impls = "floor,peft,ours,ours+gc,ours+fp8,ours+8bit,ours+te,ours+ce"
    assert bench.main(["--cases", "sd-tiny,llama-tiny,sd15", "--impls", impls, "--steps", "1", "--warmup", "1",
                       "--threads", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| case | impl |" in printed and "ours/peft" in printed
    results = {r["case"]: r for r in json.loads(out.read_text())["results"]}
    assert results["sd15"] == {"case": "sd15", "pending": "pending (needs CUDA)"}
    sd, llm = results["sd-tiny"], results["llama-tiny"]
    assert "ours+ce" not in sd["impls"] and "ours+te" not in llm["impls"]  # features that do not apply
    for r in (sd, llm):
        s = r["impls"]
        assert all(v["step_s"] > 0 and v["flops"] > 0 for v in s.values())
        assert s["peft"]["trainable"] == s["ours"]["trainable"] > 0 and s["floor"]["trainable"] == 0
        assert s["ours+gc"]["saved_MiB"] < 0.5 * s["ours"]["saved_MiB"]  # checkpointing keeps less
        assert s["ours+gc"]["flops"] > s["ours"]["flops"]  # and recomputes the forward
        assert s["ours+fp8"]["resident_MiB"] < 0.75 * s["ours"]["resident_MiB"]  # (embeddings stay fp32)
        assert s["ours"]["flops"] < s["peft"]["flops"]  # the merged weight in fp32 (fast_lora.merge_pays)
        assert r["ratios"]["ours/peft"] > 0 and r["ratios"]["ours+8bit/ours"] > 0
    assert sd["impls"]["ours+te"]["flops"] > sd["impls"]["ours"]["flops"]  # the text encoder ran
    assert llm["impls"]["ours+ce"]["saved_MiB"] < llm["impls"]["ours"]["saved_MiB"]  # no logits kept


def test_unknown_feature_is_refused(bench):
    with pytest.raises(SystemExit, match="unknown feature"):
        bench.main(["--cases", "sd-tiny", "--impls", "ours+nope", "--steps", "1"])
