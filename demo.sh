#!/usr/bin/env bash
# Quick start: set up .venv if needed, build a tiny SD model and data set, train a LoRA on it.
set -euo pipefail
cd "$(dirname "$0")"
bash tools/setup_env.sh
exec .venv/bin/python tools/demo.py "$@"
