"""Peak resident memory of this process over a stretch of code (Linux: the kernel's VmHWM).

    peak = PeakMemory()          # resets the high-water mark (echo 5 > /proc/self/clear_refs)
    ...the code to measure...
    peak.extra_bytes()           # VmHWM now − VmRSS at the reset: what the code added
    peak.peak_bytes()            # VmHWM now: the whole process's peak since the reset

Where /proc/self/clear_refs cannot be written (not Linux, or not allowed) it falls back to
``ru_maxrss`` (the process's peak since it started, a lower bound of the growth), and
`method` says which was used.
"""

from __future__ import annotations

import re
import resource
from pathlib import Path

_STATUS = Path("/proc/self/status")


def _status_kb(field: str) -> int:
    return int(re.findall(rf"{field}:\s+(\d+)", _STATUS.read_text())[0]) * 1024


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """The peak resident memory from construction on (see the module docstring)."""

    def __init__(self) -> None:
        self.method = "ru_maxrss"
        self.rss_before = 0
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM ← VmRSS
            self.rss_before = _status_kb("VmRSS")
            self.method = "vmhwm"
        except (OSError, IndexError):
            self.rss_before = _maxrss_bytes()

    def peak_bytes(self) -> int:
        """The process's peak resident bytes since the reset (ru_maxrss: since it started)."""
        return _status_kb("VmHWM") if self.method == "vmhwm" else _maxrss_bytes()

    def extra_bytes(self) -> int:
        """Peak resident bytes above the resident bytes at the reset (never negative)."""
        return max(0, self.peak_bytes() - self.rss_before)
