"""SDXL LoRA training under the name sd-scripts users type: train_network.py with --model_type sdxl.

    accelerate launch sdxl_train_network.py --config_file train.toml --dataset_config data.toml

Everything else (arguments, TOML files, outputs) is train_network.py's; see its --help.
"""

from __future__ import annotations

import sys

import train_network


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(args):
        if arg == "--model_type" or arg.startswith("--model_type="):
            value = arg.partition("=")[2] or (args[i + 1] if i + 1 < len(args) else "")
            if value != "sdxl":
                print(f"error: sdxl_train_network.py trains SDXL; remove --model_type {value} or run "
                      "train_network.py.", file=sys.stderr)
                return 2
    # On the command line, so it beats a model_type in a --config_file TOML (CLI > TOML).
    return train_network.main(["--model_type", "sdxl", *args])


if __name__ == "__main__":
    sys.exit(main())
