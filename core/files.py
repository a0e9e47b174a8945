"""Writing files whose mode matters: private ones (keys, tokens, configs with secrets) 0600
from the moment they exist, public ones (certificates, public keys) 0644.

Shared by the server's deployment (TLS material, PID files, tokens) and the device's
enrolment bundles (its node key).
"""

from __future__ import annotations

import os
from pathlib import Path


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` with mode 0600 from the start (no window with wider rights)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_public(path: Path, data: bytes) -> None:
    """Write a public file (certificate, public key) with mode 0644."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(0o644)
