"""Sampling the peak resident memory of a simulated run's server process."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any


class ServerMemorySampler:
    """Peak resident memory of the run's server process (``flwr-simulation``).

    In Flower's simulation engine the ServerApp runs inside the ``flwr-simulation`` process
    that the SuperLink's SuperExec spawns per run (the ClientApps run in Ray workers). On
    Linux the kernel's high-water mark VmHWM is read; elsewhere RSS is sampled.
    """

    def __init__(self, superlink_pid: int | None, interval: float = 0.25) -> None:
        self.superlink_pid = superlink_pid
        self.interval = interval
        self.peak_bytes = 0
        self._seen_before: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        for proc in self._servers():
            self._seen_before.add(proc.pid)  # processes of earlier runs do not count

    def _servers(self) -> list[Any]:
        import psutil

        if self.superlink_pid is None:
            return []
        try:
            children = psutil.Process(self.superlink_pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        found = []
        for proc in children:
            with contextlib.suppress(psutil.Error):
                if any("flwr-simulation" in part for part in proc.cmdline()):
                    found.append(proc)
        return found

    @staticmethod
    def _peak_of(proc: Any) -> int:
        status = Path(f"/proc/{proc.pid}/status")
        with contextlib.suppress(OSError, ValueError):
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        with contextlib.suppress(Exception):
            return int(proc.memory_info().rss)
        return 0

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        for proc in self._servers():
            if proc.pid not in self._seen_before:
                self.peak_bytes = max(self.peak_bytes, self._peak_of(proc))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    @property
    def peak_mb(self) -> float | None:
        return self.peak_bytes / 2**20 if self.peak_bytes else None
