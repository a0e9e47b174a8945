"""Starting a Flower SuperNode on an edge device from its enrolment bundle.

The command is flwr 1.41's ``flower-supernode`` with TLS (the bundle's CA verifies the
SuperLink's certificate), SuperNode authentication (the bundle's private key signs every
Fleet request), and a node config the ClientApp reads::

    partition-id=<i> num-partitions=<n> device="<cpu|cuda|auto>" data-dir="<dir>"

plus any extra ``node_config`` entries of the bundle. The ClientApp runs in a subprocess
of the SuperNode (Flower's default ``subprocess`` isolation); the SuperNode's own runtime
API for it listens on 127.0.0.1 at `clientappio_port` (default 9094: give each SuperNode on
one host its own).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

from client.enroll import Bundle

DEFAULT_CLIENTAPPIO_PORT = 9094
DEVICES = ("auto", "cpu", "cuda")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    if '"' in text or "\n" in text:
        raise ValueError(f"node-config value {text!r} must not contain quotes or newlines")
    return f'"{text}"'


def node_config(bundle: Bundle, device: str, data_dir: Path | None) -> str:
    """The ``--node-config`` string of the SuperNode."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    items: dict[str, Any] = dict(bundle.info.node_config)
    items["partition-id"] = bundle.info.partition_id
    items["num-partitions"] = bundle.info.num_partitions
    items["device"] = device
    if data_dir is not None:
        if not data_dir.is_dir():
            raise FileNotFoundError(f"data directory {data_dir} does not exist")
        items["data-dir"] = str(data_dir.resolve())
    return " ".join(f"{k}={_toml_value(v)}" for k, v in items.items())


def supernode_command(
    bundle: Bundle,
    *,
    device: str = "auto",
    data_dir: Path | None = None,
    clientappio_port: int = DEFAULT_CLIENTAPPIO_PORT,
    superlink: str | None = None,
    max_retries: int | None = None,
    max_wait_time: float | None = None,
) -> list[str]:
    """The ``flower-supernode`` command line for `bundle`."""
    if not 1 <= clientappio_port <= 65535:
        raise ValueError(f"clientappio port must be in 1..65535, got {clientappio_port}")
    exe = Path(sys.executable).parent / "flower-supernode"
    program = str(exe) if exe.is_file() else shutil.which("flower-supernode")
    if program is None:
        raise FileNotFoundError("flower-supernode not found: is flwr installed?")
    cmd = [
        program,
        "--root-certificates",
        str(bundle.ca_cert),
        "--superlink",
        superlink or bundle.info.superlink,
        "--auth-supernode-private-key",
        str(bundle.private_key),
        "--node-config",
        node_config(bundle, device, data_dir),
        "--isolation",
        "subprocess",
        "--host",
        "127.0.0.1",
        "--port",
        str(clientappio_port),
    ]
    if max_retries is not None:
        cmd += ["--max-retries", str(max_retries)]
    if max_wait_time is not None:
        cmd += ["--max-wait-time", str(max_wait_time)]
    return cmd


def supernode_env(flwr_home: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def exec_supernode(cmd: list[str], env: dict[str, str]) -> None:
    """Replace this process by the SuperNode (its PID stays the one the caller knows)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(cmd[0], cmd, env)
