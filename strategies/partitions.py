"""Sampling by data partition: which partition each Flower node serves, and S_k drawn from it.

Flower names nodes by random ids: a new simulation (or a SuperNode that registers anew)
gets other ids for the same partitions. Draws keyed by node id therefore land on other
partitions from run to run, and the same seed gives other curves. Here the draws are keyed
by what a node *is*, its partition id (``partition-id`` in its node config, the key the
ClientApp loads its data by):

1. `PartitionMap.discover` asks every node the map does not know yet for its partition id
   (a Flower ``query`` message, answered by `partition_reply` without loading any data;
   once per node and run, before its first train message);
2. `sample_partitions` draws S_k from (seed, k, partition id) alone: under "bernoulli" the
   client of partition i joins when u_{k,i} < p with u_{k,i} uniform from the seed
   ``derive_seed(seed, k, i, 4, attempt)`` (attempt 0, 1, ... while S_k is empty); under
   "fraction" a uniform sample of max(1, round(pN)) partitions from ``derive_seed(seed, k,
   0, 5)``. The same seed gives the same S_k by partition whatever the node ids are, and
   one partition's draw does not depend on which other partitions are connected.

The server half derives its per-client compression seeds from the same key
(`strategies.common.ServerHalf.seed_keys`), so the whole run is a function of the seed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from strategies.encoding import derive_seed
from strategies.sampling import expected_participants

log = logging.getLogger("flwr.fedsqueeze.strategy")

#: the ConfigRecord of a partition query's reply (``partition-id``: int)
PARTITION_KEY = "fedsqueeze.partition"
#: the query's action name (``@app.query("partition")`` on the ClientApp)
PARTITION_ACTION = "partition"

_BERNOULLI_TAG = 4
_FRACTION_TAG = 5


def partition_reply(node_config: Mapping[str, object]) -> RecordDict:
    """The client's answer: its ``partition-id`` from the node config.

    Raises:
        ValueError: the node config has no integer ``partition-id`` (the SuperNode was
            started without ``--node-config 'partition-id=I ...'``).
    """
    pid = node_config.get("partition-id")
    if isinstance(pid, bool) or not isinstance(pid, int | float | str):
        raise ValueError(
            "node config lacks 'partition-id': start the SuperNode with "
            "--node-config 'partition-id=I num-partitions=N'"
        )
    try:
        value = int(pid)
    except ValueError:
        raise ValueError(f"node config partition-id must be an integer, got {pid!r}") from None
    if value < 0:
        raise ValueError(f"node config partition-id must be >= 0, got {value}")
    return RecordDict({PARTITION_KEY: ConfigRecord({"partition-id": value})})


def partition_from_reply(reply: Message) -> int:
    """The partition id a query reply names; ValueError if it names none."""
    if reply.has_error():
        raise ValueError(f"partition query failed: {reply.error.reason}")
    records = reply.content.config_records
    if PARTITION_KEY not in records or "partition-id" not in records[PARTITION_KEY]:
        raise ValueError(f"partition query reply has no {PARTITION_KEY!r} record")
    value = records[PARTITION_KEY]["partition-id"]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"partition query reply holds partition-id {value!r}")
    return value


class PartitionMap:
    """node id → partition id, learned by asking each node once."""

    def __init__(self) -> None:
        self.of: dict[int, int] = {}

    def discover(
        self, grid: Grid, nodes: Iterable[int], timeout: float, poll_interval: float
    ) -> list[int]:
        """Ask every node of `nodes` not yet known for its partition; return the nodes whose
        partition is known after this call (a node that did not answer is left out, logged,
        and asked again next time)."""
        nodes = sorted(int(n) for n in nodes)
        unknown = [n for n in nodes if n not in self.of]
        if unknown:
            messages = [
                Message(
                    content=RecordDict(),
                    dst_node_id=node,
                    message_type=f"{MessageType.QUERY}.{PARTITION_ACTION}",
                )
                for node in unknown
            ]
            ids = set(grid.push_messages(messages))
            deadline = time.monotonic() + timeout
            while ids:
                for reply in grid.pull_messages(ids):
                    ids.discard(reply.metadata.reply_to_message_id)
                    node = int(reply.metadata.src_node_id)
                    try:
                        self.of[node] = partition_from_reply(reply)
                    except ValueError as exc:
                        log.warning("node %d: %s; it is not sampled", node, exc)
                if not ids or time.monotonic() >= deadline:
                    break
                time.sleep(poll_interval)
            missing = [n for n in unknown if n not in self.of]
            if missing:
                log.warning(
                    "%d node(s) did not name their partition in %.0f s (%s): not sampled "
                    "this round", len(missing), timeout, missing[:5],
                )  # fmt: skip
            duplicated = _duplicates({n: self.of[n] for n in nodes if n in self.of})
            if duplicated:
                log.warning("several nodes serve partition(s) %s", duplicated)
        return [n for n in nodes if n in self.of]


def _duplicates(mapping: Mapping[int, int]) -> list[int]:
    seen: dict[int, int] = {}
    for pid in mapping.values():
        seen[pid] = seen.get(pid, 0) + 1
    return sorted(pid for pid, count in seen.items() if count > 1)


def sample_partitions(
    partition_of: Mapping[int, int],
    participation: float,
    mode: str,
    seed: int,
    k: int,
) -> tuple[list[int], float]:
    """Draw S_k among the nodes of `partition_of` (node → partition) by partition id.

    Returns (S_k as node ids in partition order, pN) with pN as `expected_participants`.
    """
    if not partition_of:
        raise ValueError("no clients to sample from")
    order = sorted(partition_of, key=lambda node: (partition_of[node], node))
    expected = expected_participants(len(order), participation, mode)
    if mode == "fraction":
        rng = np.random.default_rng(derive_seed(seed, k, 0, _FRACTION_TAG))
        picked = rng.choice(len(order), size=int(expected), replace=False)
        return [order[i] for i in sorted(picked.tolist())], expected
    attempt = 0
    while True:
        sampled = [
            node for node in order if _uniform(seed, k, partition_of[node], attempt) < participation
        ]
        if sampled:
            return sampled, expected
        attempt += 1


def _uniform(seed: int, k: int, partition: int, attempt: int) -> float:
    """u_{k,i} ~ U[0, 1) from (seed, k, partition, attempt) alone."""
    return float(
        np.random.default_rng(derive_seed(seed, k, partition, _BERNOULLI_TAG, attempt)).random()
    )
