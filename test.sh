#!/usr/bin/env bash
# Run the whole test suite (sets up .venv first if needed). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
bash tools/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# One pytest worker per core, at most 4 (each loads torch and the tiny models); `./test.sh -n 0` runs in one process.
workers=$(nproc 2>/dev/null || echo 1)
workers=$(( workers > 4 ? 4 : workers ))
exec .venv/bin/python -m pytest -q -n "$workers" "$@"
