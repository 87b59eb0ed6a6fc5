"""The quick-start demo (what ./demo.sh runs) ends with a LoRA file, a loss curve and the printed path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent


def test_demo_trains_a_lora(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "demo.py"), "--workdir", str(tmp_path),
                             "--steps", "4"], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    lora = tmp_path / "output" / "demo_lora.safetensors"
    assert f"LoRA: {lora}" in result.stdout
    assert (tmp_path / "output" / "demo_lora_loss.png").is_file()
    weights = load_file(str(lora))
    assert any(k.startswith("lora_unet_") for k in weights) and any(k.startswith("lora_te_") for k in weights)
