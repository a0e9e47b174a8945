"""Starting a Flower SuperNode on an edge device from its enrolment bundle.

The command is flwr 1.42's ``flower-supernode`` with TLS (the bundle's CA verifies the
SuperLink's certificate), SuperNode authentication (the bundle's private key signs every
Fleet request), and a node config the ClientApp reads::

    partition-id=<i> num-partitions=<n> device="<cpu|cuda|auto>" data-dir="<dir>"

plus any extra ``node_config`` entries of the bundle. The ClientApp runs in a subprocess
of the SuperNode (Flower's default ``subprocess`` isolation); the SuperNode's own runtime
API for it listens on 127.0.0.1 at `clientappio_port` (default 9094: give each SuperNode on
one host its own).
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from client.enroll import Bundle
from core.flower_env import flower_env, flower_executable, terminate_then_kill
from core.superexec import task_poll_env

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
    program = flower_executable("flower-supernode")
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


def supernode_env(
    flwr_home: Path | None = None, superexec_poll_interval: float | None = None
) -> dict[str, str]:
    """The SuperNode's environment: it starts `flwr-clientapp` by name (core.flower_env),
    and its SuperExec polls for tasks every `superexec_poll_interval` seconds (default:
    ``$FLWR_SUPEREXEC_TASK_POLL_INTERVAL``, else 0.1 s; see core.superexec)."""
    return flower_env(flwr_home, task_poll_env(superexec_poll_interval))


#: what flower-supernode prints when the SuperLink refuses to activate its key
ACTIVATION_REFUSED = "Failed to activate SuperNode"
#: flwr 1.42 marks a node offline 2 heartbeats (2 x 30 s) after its last one; until then a
#: restarted SuperNode with the same key is refused as "already online"
DEFAULT_REJOIN_WAIT_S = 75.0


def _forwarder(proc: subprocess.Popen[str]) -> Callable[[int, Any], None]:
    def forward(signum: int, _frame: Any) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)

    return forward


def _pump(proc: subprocess.Popen[str], seen: list[str], out: Callable[[str], None]) -> None:
    """Pass the SuperNode's output on, keeping the lines that matter for a retry."""
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.rstrip("\n")
        if ACTIVATION_REFUSED in line:
            seen.append(line)
        out(line)


def _wait_and_reap(proc: subprocess.Popen[str]) -> int:
    """Wait for the SuperNode; then end the helpers it started (its SuperExec and any
    ClientApp) if they outlive it, so that nothing is left behind."""
    import psutil

    family: dict[int, psutil.Process] = {}
    while proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(proc.pid).children(recursive=True):
                family.setdefault(child.pid, child)
        time.sleep(0.5)
    terminate_then_kill([p for p in family.values() if p.is_running()], 10.0)
    return int(proc.returncode)


def run_supernode(
    cmd: list[str],
    env: dict[str, str],
    *,
    rejoin_wait: float = DEFAULT_REJOIN_WAIT_S,
    retry_every: float = 10.0,
    out: Callable[[str], None] = lambda line: print(line, flush=True),
) -> int:
    """Run the SuperNode in the foreground, its output passed to `out`; return its exit code.

    A SuperNode that crashed stays "online" at the SuperLink until two missed heartbeats
    (up to 60 s in flwr 1.42), and a new SuperNode with the same key is refused until then.
    So when the SuperLink refuses the activation, the start is retried every `retry_every`
    seconds for up to `rejoin_wait` seconds before giving up (a key that is not enrolled,
    or was disabled or removed, is refused the same way: after `rejoin_wait` it fails with
    a message saying both possibilities). SIGTERM and SIGINT are passed on to the SuperNode.
    """
    deadline = time.monotonic() + max(rejoin_wait, 0.0)
    attempt = 0
    while True:
        attempt += 1
        # its own session: a terminal's Ctrl-C reaches it once, through the handler below
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        handler = _forwarder(proc)
        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
        seen: list[str] = []
        reader = threading.Thread(target=_pump, args=(proc, seen, out), daemon=True)
        reader.start()
        try:
            code = _wait_and_reap(proc)
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)
        reader.join(timeout=2)
        refused = any(ACTIVATION_REFUSED in line for line in seen)
        if not refused:
            return code
        if time.monotonic() + retry_every > deadline:
            out(
                "fedsqueeze: the SuperLink refused this node's key: either it is not "
                "enrolled (or was disabled or removed), or the node crashed less than about "
                "60 s ago and the SuperLink still counts it as online"
                + (f" (gave up after {attempt} attempts)" if attempt > 1 else "")
            )
            return code or 1
        out(
            f"fedsqueeze: activation refused; retrying in {retry_every:.0f} s (a crashed "
            "node is released by the SuperLink within about 60 s)"
        )
        time.sleep(retry_every)
