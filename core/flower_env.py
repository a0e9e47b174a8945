"""The environment and executables of the Flower processes fedsqueeze starts.

Flower's SuperLink and SuperNode start further console scripts by name
(`flower-superexec`, `flwr-simulation`, `flwr-clientapp`), so they must be on the PATH
of the child even when the virtual environment was never activated
(`.venv/bin/fedsqueeze ...`, `make demo`, CI). Every launcher, the server's and the
device's (`client.supernode`) alike, builds its child environment here, so the rule lives
in one place, and stops what it started with `terminate_then_kill`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import psutil


def flower_executable(name: str) -> str:
    """A console script of this environment (beside the running Python), else on PATH."""
    beside = Path(sys.executable).with_name(name)
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(
            f"`{name}` not found: install flwr in this environment (pip install 'flwr[simulation]')"
        )
    return found


def flower_env(
    flwr_home: Path | str | None = None, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """os.environ plus: this interpreter's bin dir first on PATH, FLWR_HOME (when given),
    no runtime dependency installation (the app's dependencies are installed already),
    unbuffered Python output (logs arrive line by line), then `extra`."""
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    path = env.get("PATH", "")
    if bin_dir not in path.split(os.pathsep):
        env["PATH"] = bin_dir + (os.pathsep + path if path else "")
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def terminate_then_kill(procs: Sequence[psutil.Process], timeout: float = 10.0) -> None:
    """SIGTERM each of `procs` (processes we started, or theirs), wait up to `timeout`
    seconds, then SIGKILL whatever is left and reap it. Vanished processes are skipped."""
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(list(procs), timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)
