"""Background processes with PID files: start detached, report, stop by PID (and only them).

A PID file holds JSON: the PID, the process's start time (as psutil reports it) and its
command line. A PID whose start time differs is a recycled PID: the file is stale and the
process is left alone. A PID with the recorded start time but another command line is
refused (`ForeignProcessError`): `stop` never signals it. The process's descendants
(Flower's SuperExec and the app processes it spawns) are collected before the parent is
asked to stop and are ended the same way if they outlive it.

Processes start with umask 077, so every file they create (Flower's state database and
its -wal/-shm, nginx's logs and temporary files) is private to the invoking user.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from core.files import write_private
from core.flower_env import terminate_then_kill

#: how often (0.1 s apart) a command line that does not match is read again
CMDLINE_RETRIES = 20


class ForeignProcessError(RuntimeError):
    """A PID file names a live process that is not the one we started (other command line)."""


def cmdline_matches(recorded: Sequence[str], actual: Sequence[str]) -> bool:
    """Whether `actual` (psutil's command line of a live process) is the process started
    with `recorded`.

    The recorded arguments, joined by spaces, must end the actual ones: a console script
    runs as ``python /path/script args...`` (the interpreter is prepended), and nginx
    rewrites its title to ``nginx: master process <argv joined by spaces>``.
    """
    if not recorded or not actual:
        return False
    return " ".join(actual).endswith(" ".join(recorded))


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
        reused by a process started later).

        Raises:
            ForeignProcessError: the PID and start time match but the command line does
                not: the file names a process we did not start.
        """
        try:
            proc = psutil.Process(self.pid)
            if abs(proc.create_time() - self.create_time) > 0.5:
                return None
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            actual = proc.cmdline()
            # a process rewriting its title (nginx) shows an empty or partial command line
            # for an instant: read again before calling it foreign
            for _ in range(CMDLINE_RETRIES):
                if cmdline_matches(self.cmdline, actual):
                    break
                time.sleep(0.1)
                actual = proc.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None
        if not cmdline_matches(self.cmdline, actual):
            raise ForeignProcessError(
                f"PID {self.pid} of the {self.name} PID file runs {shlex.join(actual)[:120]!r}, "
                f"not the {self.name} we started: not touching it (remove the PID file if "
                "that process is not ours)"
            )
        return proc

    def alive(self) -> bool:
        """True when our process runs (raises ForeignProcessError as `process`)."""
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
    log_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    pid_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
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
            umask=0o077,
        )
    try:
        create_time = psutil.Process(proc.pid).create_time()
    except psutil.NoSuchProcess:
        create_time = time.time()
    record = ProcessRecord(name, proc.pid, create_time, list(cmd), str(log_file))
    write_private(pid_file, record.to_json().encode("utf-8"))
    return record


def stop_process(record: ProcessRecord, timeout: float = 10.0) -> bool:
    """End the recorded process and its descendants: SIGTERM, then SIGKILL after `timeout`.

    Returns True if something was running. Only processes that are the recorded one (same
    PID, start time and command line) or its descendants are signalled; a PID file naming
    another command line raises ForeignProcessError and nothing is signalled.
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


def tail(path: Path, lines: int = 20) -> str:
    """The last `lines` lines of a log file ('' if missing)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
