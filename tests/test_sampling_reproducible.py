"""Sampling by partition (strategies.partitions): the same seed gives the same S_k by
partition and the same curves, whatever node ids Flower draws.

The end-to-end test runs two real Flower simulations (Ray backend, the project's ServerApp
body and ClientApp, the synthetic task) with the same seed: Flower gives their SuperNodes
other random node ids, and the participation sets (mapped to partitions) and the central
losses must still agree round by round.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from conftest import simulate_in_process

from strategies.partitions import partition_reply, sample_partitions

N_CLIENTS = 6
ROUNDS = 4
STRATEGIES = ("rand-mcm", "artemis")


# ----------------------------------------------------------------------------- the draws
def test_draws_follow_partitions_not_node_ids() -> None:
    a = {101: 0, 7: 1, 55: 2, 3: 3, 900: 4, 42: 5}
    b = {11: 0, 12: 1, 13: 2, 14: 3, 15: 4, 16: 5}  # the same partitions on other ids
    for k in range(1, 30):
        sa, pa = sample_partitions(a, 0.5, "bernoulli", 7, k)
        sb, pb = sample_partitions(b, 0.5, "bernoulli", 7, k)
        assert [a[n] for n in sa] == [b[n] for n in sb]
        assert pa == pb == 3.0
        fa, _ = sample_partitions(a, 0.5, "fraction", 7, k)
        fb, _ = sample_partitions(b, 0.5, "fraction", 7, k)
        assert sorted(a[n] for n in fa) == sorted(b[n] for n in fb) and len(fa) == 3


def test_a_partitions_draw_does_not_depend_on_the_others() -> None:
    full = {n: n for n in range(20)}
    part = {n: n for n in range(0, 20, 2)}  # half the partitions connected
    changed = 0
    for k in range(1, 40):
        s_full, _ = sample_partitions(full, 0.5, "bernoulli", 3, k)
        s_part, _ = sample_partitions(part, 0.5, "bernoulli", 3, k)
        if not s_part or len([n for n in s_full if n in part]) == 0:
            changed += 1  # the empty-set redraw of the smaller set: other draws
            continue
        assert [n for n in s_full if n in part] == s_part
    assert changed < 5


def test_seeds_and_rounds_give_other_draws() -> None:
    nodes = {n: n for n in range(20)}
    draws = {tuple(sample_partitions(nodes, 0.5, "bernoulli", s, k)[0]) for s in range(3)
             for k in range(1, 5)}  # fmt: skip
    assert len(draws) == 12
    sizes = [len(sample_partitions(nodes, 0.5, "bernoulli", 1, k)[0]) for k in range(1, 201)]
    assert 8.5 < sum(sizes) / len(sizes) < 11.5  # E|S_k| = pN = 10


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="no clients"):
        sample_partitions({}, 0.5, "bernoulli", 0, 1)
    with pytest.raises(ValueError, match="participation-mode"):
        sample_partitions({1: 0}, 0.5, "poisson", 0, 1)
    with pytest.raises(ValueError, match="partition-id"):
        partition_reply({"num-partitions": 4})
    with pytest.raises(ValueError, match="partition-id must be an integer"):
        partition_reply({"partition-id": "x"})
    reply = partition_reply({"partition-id": 3, "num-partitions": 4})
    assert reply.config_records["fedsqueeze.partition"]["partition-id"] == 3


# ----------------------------------------------------------------------------- end to end
def _simulate(tmp: Path) -> dict[str, Any]:
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp

    from client.app import app as client_app
    from server.app import RunOutcome, run_server

    outcomes: dict[str, RunOutcome] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        for name in STRATEGIES:
            overrides = {
                "strategy": name,
                "num-server-rounds": ROUNDS,
                "task": "synthetic-lsq",
                "task-options": "dim=24,samples_per_client=40",
                "client-lr": 0.02,
                "local-steps": 2,
                "participation": 0.5,
                "seed": 11,
                "device": "cpu",
                "round-timeout": 120.0,
            }
            outcomes[name] = run_server(grid, context, overrides, RunOutcome())

    simulate_in_process(server_app, client_app, N_CLIENTS, tmp)
    return outcomes


def _by_partition(outcome: Any) -> list[list[int]]:
    """S_k of each round as partition ids (the server half's node → partition map)."""
    partition_of = outcome.server.seed_keys
    assert len(partition_of) == N_CLIENTS
    return [sorted(partition_of[c.node_id] for c in r.clients) for r in outcome.records]


@pytest.mark.slow
def test_same_seed_same_participation_and_curves(tmp_path: Path) -> None:
    first = _simulate(tmp_path / "a")
    second = _simulate(tmp_path / "b")
    for name in STRATEGIES:
        a, b = first[name], second[name]
        assert a.status == b.status == "finished"
        # Flower drew other node ids for the same partitions ...
        assert set(a.server.seed_keys) != set(b.server.seed_keys)
        assert sorted(a.server.seed_keys.values()) == list(range(N_CLIENTS))
        # ... and S_k, by partition, is the same round by round, and a real subset
        sets_a, sets_b = _by_partition(a), _by_partition(b)
        assert sets_a == sets_b
        assert len(sets_a) == ROUNDS
        assert any(0 < len(s) < N_CLIENTS for s in sets_a), sets_a
        assert len({tuple(s) for s in sets_a}) > 1, sets_a
        # the same curves and the same measured bytes, bit for bit
        for ra, rb in zip(a.records, b.records, strict=True):
            assert ra.eval_loss == rb.eval_loss, (name, ra.round)
            assert ra.train_loss == rb.train_loss, (name, ra.round)
            assert ra.uplink_bytes == rb.uplink_bytes and ra.downlink_bytes == rb.downlink_bytes
        assert all(math.isfinite(r.eval_loss or math.nan) for r in a.records)
