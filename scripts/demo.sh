#!/usr/bin/env bash
# The main job on embedded defaults (grows as the project grows).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m benchmarks.codecs --quick
