"""Where a ClientApp's time goes, logged for the deployment benchmark.

Each train message in deployment runs in a fresh ``flwr-clientapp`` process (Flower's
subprocess isolation), so a message's cost on the device is: the process start-up
(interpreter, imports, Flower's connection to its SuperNode), the task set-up (model and
data partition), the local training, and the rest of the handler (decoding the downlink,
the algorithm's client half, encoding the uplink, saving the state). `HandlerTiming`
measures the last three with ``time.perf_counter`` and takes the process's start from the
kernel (`process_start_time`, to 10 ms). Beside the wall times it keeps what a loaded
machine does not stretch: the process's CPU time before the handler (``startup_cpu_s``:
interpreter, Flower, imports) and in it (``handler_cpu_s``), and how many modules the
handler imported on first use (``imports``: each is paid again by every message). `log`
writes one DEBUG line (shown with ``FLWR_LOG_LEVEL=DEBUG``, which the SuperNode's log then
carries, stamped in wall-clock time like Flower's own lines):

    fedsqueeze-timing run=7 round=3 pid=4242 process_start=1764662400.120 handler_start=...
    setup_s=0.052 train_s=0.004 handler_s=0.071 handler_end=... startup_cpu_s=3.41
    handler_cpu_s=0.065 imports=2

`parse_timing_lines` reads them back (``benchmarks.deploy``).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

TAG = "fedsqueeze-timing"
_FIELD = re.compile(r"(\w+)=(\S+)")


@dataclass
class HandlerTiming:
    """Wall-clock stamps (UNIX seconds) and durations (seconds) of one train handler."""

    handler_start: float = field(default_factory=time.time)
    _t0: float = field(default_factory=time.perf_counter)
    #: the process's CPU time (user + system, all threads) when the handler started
    startup_cpu_s: float = field(default_factory=time.process_time)
    _modules0: int = field(default_factory=lambda: len(sys.modules))
    setup_s: float = 0.0
    train_s: float = 0.0

    @contextmanager
    def setup(self) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.setup_s += time.perf_counter() - t

    @contextmanager
    def training(self) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.train_s += time.perf_counter() - t

    def log(self, logger: logging.Logger, run_id: int, server_round: int) -> None:
        """One DEBUG line with this handler's figures (nothing is computed below DEBUG)."""
        if not logger.isEnabledFor(logging.DEBUG):
            return
        handler_s = time.perf_counter() - self._t0
        handler_cpu_s = time.process_time() - self.startup_cpu_s
        logger.debug(
            "%s run=%d round=%d pid=%d process_start=%.3f handler_start=%.3f setup_s=%.4f "
            "train_s=%.4f handler_s=%.4f handler_end=%.3f startup_cpu_s=%.3f "
            "handler_cpu_s=%.4f imports=%d",
            TAG, run_id, server_round, os.getpid(), process_start_time(), self.handler_start,
            self.setup_s, self.train_s, handler_s, self.handler_start + handler_s,
            self.startup_cpu_s, handler_cpu_s, len(sys.modules) - self._modules0,
        )  # fmt: skip


def process_start_time() -> float:
    """When this process started, in UNIX seconds, to the kernel's clock tick (10 ms).

    Linux: the start in ticks since boot (``/proc/self/stat``, field 22) against the boot
    clock now, so the figure is as exact as the tick (psutil's ``create_time`` adds the
    boot time, which ``/proc/stat`` gives in whole seconds: up to 1 s off). Elsewhere
    psutil's figure."""
    try:
        with open("/proc/self/stat", encoding="ascii") as fh:
            after_name = fh.read().rsplit(")", 1)[1].split()
        ticks = int(after_name[19])  # fields from the 3rd on: field 22 is index 19
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - age
    except (OSError, IndexError, ValueError, AttributeError):
        import psutil  # not at import: the ClientApp's start-up should not pay for it

        return float(psutil.Process(os.getpid()).create_time())


def parse_timing_lines(text: str, run_id: int) -> list[dict[str, float]]:
    """Every `HandlerTiming.log` line of run `run_id` in `text` as a dict of its numeric
    fields (the run id itself, a 64-bit integer, is compared exactly and left out)."""
    out: list[dict[str, float]] = []
    for line in text.splitlines():
        at = line.find(TAG + " ")
        if at < 0:
            continue
        fields = dict(_FIELD.findall(line[at + len(TAG) :]))
        if fields.pop("run", None) != str(run_id):
            continue
        out.append({k: float(v) for k, v in fields.items()})
    return out
