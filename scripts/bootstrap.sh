#!/usr/bin/env bash
# Create .venv and install fedsqueeze into it when missing or out of date.
# torch==2.13.0 goes in first: on these machines it is a CPU wheel on disk, and
# installing it before the project stops pip from pulling a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
stamp="$VENV/.fedsqueeze-installed"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
    exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
    echo ">> creating virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
echo ">> installing torch==2.13.0 (CPU)"
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
echo ">> installing fedsqueeze and its development tools"
"$VENV/bin/python" -m pip install --quiet -e ".[dev]"
touch "$stamp"
