"""Where fedsqueeze keeps its files on a machine (server, device or laptop alike)."""

from __future__ import annotations

import os
from pathlib import Path


def fedsqueeze_home() -> Path:
    """``$FEDSQUEEZE_HOME`` or ``~/.fedsqueeze`` (not created here)."""
    env = os.environ.get("FEDSQUEEZE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".fedsqueeze"
