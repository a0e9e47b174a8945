"""How often Flower's SuperExec asks for a task to launch: the one tuning we set on it.

In subprocess isolation (what fedsqueeze uses) a SuperNode hands each message to its
SuperExec, which polls the SuperNode's ClientAppIo API for tasks and starts a fresh
``flwr-clientapp`` process per task; the SuperLink's SuperExec does the same for each
run's ServerApp. Between polls SuperExec sleeps ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``
seconds (a documented Flower setting, read by
``flwr.supercore.superexec.run_superexec`` in flwr 1.41 and 1.42: default 1.0 s,
accepted 0.01..60 s), so with the default every message waits 0.5 s on average before
its ClientApp even starts. Every place fedsqueeze starts a SuperNode or SuperLink sets
it to `DEFAULT_TASK_POLL_INTERVAL_S` instead, unless the operator exported their own
value (or, for ``fedsqueeze client start``, passed ``--superexec-poll-interval``).

The cost of a shorter interval is one local request per interval per idle SuperExec
(loopback, a few hundred bytes): at 0.1 s that is ten small requests a second, against
the SuperNode's own idle request to the SuperLink every 3 s.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

TASK_POLL_INTERVAL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
#: the ServerApp polls its replies every 0.1 s too (strategies.flower); below this the
#: saving is a few tens of milliseconds per message for proportionally more polling
DEFAULT_TASK_POLL_INTERVAL_S = 0.1
#: the range flwr's SuperExec accepts (it refuses to start outside it)
MIN_TASK_POLL_INTERVAL_S = 0.01
MAX_TASK_POLL_INTERVAL_S = 60.0


def check_task_poll_interval(seconds: float) -> float:
    """`seconds` if SuperExec accepts it, else ValueError naming the setting."""
    if not (
        math.isfinite(seconds) and MIN_TASK_POLL_INTERVAL_S <= seconds <= MAX_TASK_POLL_INTERVAL_S
    ):
        raise ValueError(
            f"{TASK_POLL_INTERVAL_ENV} (SuperExec's task-poll interval) must be between "
            f"{MIN_TASK_POLL_INTERVAL_S} and {MAX_TASK_POLL_INTERVAL_S} seconds, got {seconds!r}"
        )
    return seconds


def task_poll_env(
    seconds: float | None = None, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """``{FLWR_SUPEREXEC_TASK_POLL_INTERVAL: value}`` for a Flower process's environment.

    The value is `seconds` when given, else the one already in `environ` (default
    ``os.environ``), else `DEFAULT_TASK_POLL_INTERVAL_S`; it is checked either way, so
    a bad value fails here with a clear message rather than inside SuperExec."""
    if seconds is None:
        raw = (os.environ if environ is None else environ).get(TASK_POLL_INTERVAL_ENV)
        if raw is None or not raw.strip():
            seconds = DEFAULT_TASK_POLL_INTERVAL_S
        else:
            try:
                seconds = float(raw)
            except ValueError:
                raise ValueError(
                    f"{TASK_POLL_INTERVAL_ENV} must be a number of seconds, got {raw!r}"
                ) from None
    return {TASK_POLL_INTERVAL_ENV: repr(check_task_poll_interval(float(seconds)))}
