"""Network modules for --network_module (kohya's contract, see networks/lora.py)."""
