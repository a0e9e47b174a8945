"""The package installs and its command line answers."""

import subprocess
import sys


def test_cli_help_lists_commands() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "server.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "fedsqueeze" in out.stdout or "Usage" in out.stdout
