"""Following a run's log: ``flwr log RUN --stream`` into a file, counting the rounds.

Each line is stripped of terminal colours and redacted before it is written or kept; the
rounds the log announces (``[ROUND n/N]``) count as progress when no store is readable.
"""

from __future__ import annotations

import re
import subprocess
import threading
from collections import deque
from pathlib import Path

from core.secrets import redact_text
from server.flwr_connection import CONNECTION_NAME
from server.local_superlink import LocalSuperLink, executable

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_ROUND_LINE = re.compile(r"\[ROUND (\d+)(?:/(\d+))?\]")


class LogFollower:
    """``flwr log RUN --stream`` in the background: lines go to a file, rounds are counted."""

    def __init__(self, superlink: LocalSuperLink, run_id: int, log_path: Path) -> None:
        self.log_path = log_path
        self.latest_round = 0
        self.tail: deque[str] = deque(maxlen=60)
        self._lock = threading.Lock()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [executable("flwr"), "log", str(run_id), CONNECTION_NAME, "--stream"],
            env=superlink.env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        with self.log_path.open("a", encoding="utf-8") as out:
            for raw in self.process.stdout:
                line = redact_text(_ANSI.sub("", raw.rstrip("\n")))
                out.write(line + "\n")
                out.flush()
                with self._lock:
                    self.tail.append(line)
                    match = _ROUND_LINE.search(line)
                    if match:
                        self.latest_round = max(self.latest_round, int(match.group(1)) - 1)

    def done(self) -> bool:
        return self.process.poll() is not None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._thread.join(timeout=5)

    def tail_text(self, lines: int = 25) -> str:
        with self._lock:
            return "\n".join(list(self.tail)[-lines:])
