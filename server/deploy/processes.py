"""Background processes with PID files: start detached, report, stop by PID (and only them).

A PID file holds JSON: the PID, the process's start time (as psutil reports it) and its
command line. `stop` ends a process only when all three still match, so a recycled PID is
never signalled. The process's descendants (Flower's SuperExec and the app processes it
spawns) are collected before the parent is asked to stop and are ended the same way if
they outlive it.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from server.flower_env import terminate_then_kill


@dataclass(frozen=True)
class ProcessRecord:
    """What a PID file says about a process we started."""

    name: str
    pid: int
    create_time: float
    cmdline: list[str]
    log_file: str

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2)

    @classmethod
    def read(cls, path: Path) -> ProcessRecord | None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(
                name=str(data["name"]),
                pid=int(data["pid"]),
                create_time=float(data["create_time"]),
                cmdline=[str(c) for c in data["cmdline"]],
                log_file=str(data.get("log_file", "")),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def process(self) -> psutil.Process | None:
        """The live process this record describes, or None if it is gone (or the PID was
        reused by another process)."""
        try:
            proc = psutil.Process(self.pid)
            if abs(proc.create_time() - self.create_time) > 0.5:
                return None
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None

    def alive(self) -> bool:
        return self.process() is not None


def start_background(
    name: str,
    cmd: Sequence[str],
    *,
    pid_file: Path,
    log_file: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> ProcessRecord:
    """Start `cmd` in its own session, stdout/stderr appended to `log_file`; write `pid_file`."""
    existing = ProcessRecord.read(pid_file)
    if existing is not None and existing.alive():
        raise RuntimeError(f"{name} is already running (PID {existing.pid}, see {pid_file})")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        os.chmod(log_file, 0o600)
        proc = subprocess.Popen(
            list(cmd),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            cwd=str(cwd) if cwd else None,
            start_new_session=True,
        )
    try:
        create_time = psutil.Process(proc.pid).create_time()
    except psutil.NoSuchProcess:
        create_time = time.time()
    record = ProcessRecord(name, proc.pid, create_time, list(cmd), str(log_file))
    pid_file.write_text(record.to_json(), encoding="utf-8")
    return record


def stop_process(record: ProcessRecord, timeout: float = 10.0) -> bool:
    """End the recorded process and its descendants: SIGTERM, then SIGKILL after `timeout`.

    Returns True if something was running. Only processes that are the recorded one (same
    PID and start time) or its descendants are signalled.
    """
    proc = record.process()
    if proc is None:
        return False
    try:
        children = proc.children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    terminate_then_kill([proc, *children], timeout)
    return True


def stop_pid_file(pid_file: Path, timeout: float = 10.0) -> bool:
    """Stop the process recorded in `pid_file` (if any) and remove the file."""
    record = ProcessRecord.read(pid_file)
    if record is None:
        pid_file.unlink(missing_ok=True)
        return False
    stopped = stop_process(record, timeout=timeout)
    pid_file.unlink(missing_ok=True)
    return stopped


def tail(path: Path, lines: int = 20) -> str:
    """The last `lines` lines of a log file ('' if missing)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
