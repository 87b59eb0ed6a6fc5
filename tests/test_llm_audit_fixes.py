"""Rough edges of the LLM journey found by an audit (each test fails without its fix)."""

from __future__ import annotations

import os
import stat

from networks import lora


def _tiny_network(target_modules: str | None = None):
    from library.tiny_llm import tiny_llama

    model = tiny_llama(64).eval()
    args = {"target_modules": target_modules} if target_modules else {}
    network = lora.create_network(1.0, 4, 4.0, None, None, model, **args)
    network.apply_to(None, model, apply_text_encoder=False)
    return model, network


# --- #7: the trainer's adapter_model.safetensors gets the umask's permissions, not 0600 -------------------


def test_the_peft_adapter_weights_follow_the_umask(tmp_path):
    from networks.peft_export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, write_peft_adapter

    model, network = _tiny_network()
    old = os.umask(0o022)
    try:
        folder = write_peft_adapter(network, model, tmp_path / "adapter", "base")
    finally:
        os.umask(old)
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o644, name
