"""Faster reply polling for Flower's deployment grid.

In flwr 1.42 the deployment grid (``flwr.superlink.grid.http_grid.HttpGrid``) implements
``send_and_receive`` as: push the messages, then ``pull_messages`` in a loop with a fixed
``time.sleep(3)`` between attempts. A round whose replies arrive 0.2 s after the push so
waits about 3 s. The grid's public ``push_messages`` / ``pull_messages`` calls (abstract
in ``flwr.serverapp.Grid``, implemented by both the deployment ``HttpGrid`` and the
simulation ``InMemoryGrid``) allow polling on one's own schedule; `FastPollGrid` wraps any
grid and does exactly that, with an interval that starts small and grows geometrically:

    t_k = min(initial * growth**k, maximum),    k = 0, 1, 2, ...

so a reply that is ready after time T is pulled at most about max(t_k) after T, while a
long round costs few requests (the number of pulls grows like log(T) until the maximum
is reached, then linearly at rate 1/maximum).

A strategy uses it by passing ``FastPollGrid(grid)`` where it would pass ``grid``
(``strategy.start(grid=FastPollGrid(grid), ...)``); everything else is delegated.

`PollStats` measures the waiting: the wall time spent in ``send_and_receive``, the time
asleep between pulls, and the *poll lag*: for each call, the time from the newest reply's
creation (``reply.metadata.created_at``, stamped by the client when it built the reply)
to the moment the call returned. The lag is what polling adds on top of the clients'
own work; with 3 s sleeps it averages about 1.5 s per round.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.supercore.run import Run

DEFAULT_INITIAL_INTERVAL_S = 0.02
DEFAULT_MAX_INTERVAL_S = 0.25
DEFAULT_GROWTH = 1.5


@dataclass
class PollStats:
    """Accumulated over all `send_and_receive` calls of one grid."""

    calls: int = 0
    pulls: int = 0
    wall_s: float = 0.0  # inside send_and_receive
    sleep_s: float = 0.0  # asleep between pulls
    lag_s: float = 0.0  # newest reply created -> call returned (summed over calls)
    lags: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, float]:
        return {
            "poll_calls": float(self.calls),
            "poll_pulls": float(self.pulls),
            "poll_wall_s": self.wall_s,
            "poll_sleep_s": self.sleep_s,
            "poll_lag_s": self.lag_s,
        }


def poll_intervals(initial: float, maximum: float, growth: float) -> Iterable[float]:
    """The sleep schedule t_k = min(initial * growth**k, maximum)."""
    if initial <= 0 or maximum < initial or growth < 1:
        raise ValueError(
            f"bad poll schedule: need 0 < initial <= maximum and growth >= 1, got "
            f"initial={initial}, maximum={maximum}, growth={growth}"
        )
    interval = initial
    while True:
        yield interval
        interval = min(interval * growth, maximum)


class FastPollGrid(Grid):
    """A `Grid` that delegates to `inner` but polls for replies on a fast schedule."""

    def __init__(
        self,
        inner: Grid,
        initial_interval: float = DEFAULT_INITIAL_INTERVAL_S,
        max_interval: float = DEFAULT_MAX_INTERVAL_S,
        growth: float = DEFAULT_GROWTH,
    ) -> None:
        next(iter(poll_intervals(initial_interval, max_interval, growth)))  # validate
        self.inner = inner
        self.initial_interval = initial_interval
        self.max_interval = max_interval
        self.growth = growth
        self.stats = PollStats()

    # ---- delegated
    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    # ---- the point of this class
    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push `messages`, then pull replies on the t_k schedule until all are in or
        `timeout` seconds have passed (None: no limit)."""
        start = time.time()
        stats = self.stats
        stats.calls += 1
        pending = {mid for mid in self.inner.push_messages(messages) if mid}
        replies: list[Message] = []
        deadline = None if timeout is None else start + timeout
        schedule = iter(poll_intervals(self.initial_interval, self.max_interval, self.growth))
        while pending:
            got = list(self.inner.pull_messages(pending))
            stats.pulls += 1
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending:
                break
            now = time.time()
            if deadline is not None and now >= deadline:
                break
            pause = next(schedule)
            if deadline is not None:
                pause = min(pause, max(deadline - now, 0.0))
            time.sleep(pause)
            stats.sleep_s += pause
        end = time.time()
        stats.wall_s += end - start
        created = [m.metadata.created_at for m in replies if m.metadata.created_at]
        if created:
            lag = max(0.0, end - max(created))
            stats.lag_s += lag
            stats.lags.append(lag)
        return replies
