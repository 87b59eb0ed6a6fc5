"""Tables and environment facts for bench/bench_lora_step.py (markdown, as pasted into bench/RESULTS.md)."""

from __future__ import annotations

import datetime
import platform

import torch

RATIO_KEYS = ["ours/floor", "ours/peft", "peft/floor", "head/floor", "ours/head", "ours/plain", "ours+compile/floor"]
# The memory features against the default LoRA step: their cost in time (the memory they save is in the table).
FEATURE_KEYS = ["ours+gc/ours", "ours+fp8/ours", "ours+8bit/ours", "ours+te/ours", "ours+ce/ours", "ours+ce/peft"]
RATIO_PAIRS = [tuple(k.split("/")) for k in RATIO_KEYS + FEATURE_KEYS] + [("plain", "floor"),
                                                                          ("ours+compile", "ours")]


def ratios(stats: dict[str, dict]) -> dict[str, float]:
    """Step-time ratios a/b for every pair of RATIO_PAIRS both of whose implementations ran."""
    return {f"{a}/{b}": stats[a]["step_s"] / stats[b]["step_s"] for a, b in RATIO_PAIRS if a in stats and b in stats}


def _ratio_table(results: list[dict], keys: list[str]) -> list[str]:
    keys = [k for k in keys if any(k in r.get("ratios", {}) for r in results)]
    if not keys:
        return []
    lines = ["", "| case | " + " | ".join(keys) + " |", "| --- |" + " --- |" * len(keys)]
    for r in results:
        if "ratios" in r:
            cells = [f"{r['ratios'][k]:.3f}" if k in r["ratios"] else "" for k in keys]
            lines.append(f"| {r['case']} | " + " | ".join(cells) + " |")
    return lines


def fmt_table(results: list[dict]) -> str:
    head = ("| case | impl | step (ms) | throughput | FLOPs/step | TFLOP/s | saved act. (MiB) | resident (MiB) "
            "| peak GPU mem (GiB) | compile (s) |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = [head]
    for r in results:
        if "pending" in r:
            rows.append(f"| {r['case']} | — | {r['pending']} | | | | | | | |")
            continue
        for name, s in r["impls"].items():
            peak = f"{s['peak_GiB']:.2f}" if "peak_GiB" in s else "n/a"
            comp = f"{s['compile_s']:.1f}" if "compile_s" in s else ""
            rows.append(f"| {r['case']} ({r['dtype']}, {r['targets']} targets) | {name} | {1000 * s['step_s']:.1f} "
                        f"| {s['throughput']:.1f} {s['unit']} | {s['flops'] / 1e9:.2f} G | {s['tflops']:.3f} "
                        f"| {s['saved_MiB']:.1f} | {s['resident_MiB']:.1f} | {peak} | {comp} |")
    lines = ["\n".join(rows)] + _ratio_table(results, RATIO_KEYS) + _ratio_table(results, FEATURE_KEYS)
    return "\n".join(lines)


def environment(device: torch.device) -> dict:
    env = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "python": platform.python_version(),
           "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            env["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    import importlib

    for package in ("diffusers", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:  # a missing package fails the cases that use it, not the whole run (the GPU image lacks some)
            env[package] = importlib.import_module(package).__version__
        except ImportError:
            env[package] = None
    return env
