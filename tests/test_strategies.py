"""Strategy plumbing: consistency protocol, payload validation, catch-up, the memory store,
sampling, run-config validation and the message formats (fast, no Flower engine)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict

from benchmarks.memory import PeakMemory
from compression import LONG_LIVED_MIN_NUMEL, decode, kernels_from, parse_compressor
from core.runconfig import DEFAULTS, load_config, parse_delay, parse_failure, parse_options
from strategies.client_half import client_uplink, initial_client_state
from strategies.consistency import DIGEST_BYTES, state_digest, tensor_digest
from strategies.flower import (
    downlink_from_record,
    downlink_to_record,
    uplink_from_record,
    uplink_to_record,
)
from strategies.local import run_local
from strategies.memory_store import TensorStore
from strategies.messages import Uplink
from strategies.registry import ALGORITHMS, get_preset, make_server, settings_from_config
from strategies.sampling import sample_clients
from strategies.settings import resolve_settings
from strategies.validation import all_finite
from tasks.synthetic import make_lsq_task

N, D = 5, 12


def _eq(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    assert a is not None and b is not None
    return torch.equal(a, b)


def _grad():
    task = make_lsq_task(num_partitions=N, dim=D, samples_per_client=30, seed=1)
    A = [task.A(i).float() for i in range(N)]
    b = [task.b(i).float() for i in range(N)]
    return lambda i, w: (A[i].T @ (A[i] @ w - b[i]) / A[i].shape[0], 0.0)


def _settings(name: str = "artemis", **kw):
    kw.setdefault("pp_variant", "pp1")
    kw.setdefault("seed", 4)
    return resolve_settings(get_preset(name), D, **kw)


# ----------------------------------------------------------------------------- consistency
@pytest.mark.parametrize("name", ["artemis", "rand-mcm", "mcm", "diana"])
def test_lost_reply_rolls_both_sides_back(name: str) -> None:
    grad = _grad()
    seen = {}

    def check(k: int, run) -> None:
        if k == 4:  # after the round that follows the loss
            state = run.pending[2]
            seen["client_h"] = state.up_memory.clone()
            seen["server_h"] = run.server.client_memory(2).clone()
            if name == "rand-mcm":
                seen["client_H"] = state.down_memory.clone()
                seen["server_H"] = run.server.client_down_memory(2).clone()

    run = run_local(
        _settings(name), torch.zeros(D), grad, N, 5, lose_reply=lambda k, i: (k, i) == (3, 2),
        on_round=check,
    )  # fmt: skip
    h3, h4 = run.history[2], run.history[3]
    assert h3.accepted == N - 1
    assert h4.accepted == N and h4.digest_checks == N
    assert sum(h.digest_mismatches + h.resyncs for h in run.history) == 0
    assert torch.equal(seen["client_h"], seen["server_h"])
    if name == "rand-mcm":
        assert torch.equal(seen["client_H"], seen["server_H"])


def test_without_rollback_the_digest_catches_divergence_and_resyncs() -> None:
    grad = _grad()
    # an uncompressed uplink, so that the lost update is surely non-zero (s = 1 quantization
    # of a short vector can round every coordinate to 0)
    run = run_local(
        _settings("artemis", uplink="identity"),
        torch.zeros(D),
        grad,
        N,
        7,
        lose_reply=lambda k, i: (k, i) == (3, 2),
        revert_lost_state=False,
    )
    assert (
        run.history[3].digest_mismatches == 1
    )  # round 4: the client kept an h_i the server never acknowledged
    assert run.history[3].resyncs == 1
    assert run.history[4].resets_sent == 1  # round 5: both sides reset, snapshot sent
    assert run.history[4].snapshots >= 1
    later = run.history[5:]
    assert all(h.accepted == N and h.digest_mismatches == 0 for h in later)
    state = run.pending[2]
    assert state is not None and _eq(state.up_memory, run.server.client_memory(2))


def test_client_that_lost_its_state_asks_for_a_resync() -> None:
    grad = _grad()
    settings = _settings("mcm")
    w0 = torch.zeros(D)

    def wipe(k: int, run) -> None:
        if k == 2:
            run.committed[3] = initial_client_state(w0, settings)
            run.pending[3] = None

    run = run_local(settings, w0, grad, N, 6, on_round=wipe)
    assert run.history[2].resyncs == 1 and run.history[2].accepted == N - 1
    assert run.history[3].resets_sent == 1 and run.history[3].accepted == N
    assert sum(h.digest_mismatches for h in run.history) == 0
    state = run.pending[3]
    assert state is not None and _eq(state.up_memory, run.server.client_memory(3))


# ----------------------------------------------------------------------------- validation
def _one_round_server():
    settings = _settings("diana")
    server = make_server(settings, torch.zeros(D))
    server.begin_round(1)
    messages = {i: server.downlink_for(1, i) for i in range(3)}
    return settings, server, messages


def _good_uplink(settings, k: int = 1) -> Uplink:
    c = parse_compressor(settings.uplink)
    payload = c.compress(torch.ones(D), seed=1).to_bytes()
    # the digest of a fresh client's state: h_i = 0, no downlink memory, w = w_0 = 0
    digest = state_digest(torch.zeros(D), None, torch.zeros(D))
    return Uplink(k, "ok", payload, 0, digest, 1.0, 10)


@pytest.mark.parametrize(
    "corrupt",
    ["garbage", "wrong-size", "bad-digest", "wrong-round", "too-large", "non-finite", "empty"],
)
def test_bad_uplinks_are_dropped_and_the_round_goes_on(corrupt: str) -> None:
    settings, server, _ = _one_round_server()
    bad = _good_uplink(settings)
    if corrupt == "garbage":
        bad.payload = b"\x00\x01garbage-bytes"
    elif corrupt == "wrong-size":
        bad.payload = parse_compressor("identity").compress(torch.ones(D + 1), seed=0).to_bytes()
    elif corrupt == "bad-digest":
        bad.digest = bad.digest[:-1]
    elif corrupt == "wrong-round":
        bad.round = 7
    elif corrupt == "too-large":
        bad.payload = b"x" * (server.max_uplink_bytes + 1)
    elif corrupt == "non-finite":
        x = np.full(D, np.inf, dtype=np.float32)
        bad.payload = parse_compressor("identity").compress(torch.ones(D), seed=0).to_bytes()
        bad.payload = bad.payload[: -4 * D] + x.tobytes()
    elif corrupt == "empty":
        bad.payload = b""
    assert server.receive(1, 0, bad) == "dropped"
    assert server.receive(1, 1, _good_uplink(settings)) == "ok"
    assert server.receive(1, 2, None, "crashed") == "failed"
    stats = server.finish_round(1, 3.0)
    assert stats.dropped == 1 and stats.rejected == 1 and stats.accepted == 1
    assert server.books[0].acked_round == 0 and server.books[1].acked_round == 1
    assert torch.isfinite(server.w).all() and not torch.equal(server.w, torch.zeros(D))


def test_reply_from_a_node_that_was_not_sampled_is_dropped() -> None:
    settings, server, _ = _one_round_server()
    assert server.receive(1, 99, _good_uplink(settings)) == "dropped"


# ----------------------------------------------------------------------------- catch-up
def test_idle_client_gets_missed_messages_or_a_snapshot_whichever_is_smaller() -> None:
    settings = _settings("artemis", pp_variant="pp2")
    server: Any = make_server(settings, torch.zeros(D))
    grad = _grad()
    for k in range(1, 9):  # only client 0 participates
        server.begin_round(k)
        server.downlink_for(k, 0)
        from strategies.client_half import client_uplink

        wire, _ = client_uplink(settings, initial_client_state(torch.zeros(D), settings),
                                grad(0, server.w)[0], 1)  # fmt: skip
        server.pending[0].expected_digest = b"x" * DIGEST_BYTES  # the digest is not tested here
        server.receive(k, 0, Uplink(k, "ok", wire.payload, 0, b"x" * DIGEST_BYTES, 0.0, 1))
        server.finish_round(k, 1.0)
    server.begin_round(9)
    stale = server.downlink_for(9, 1)  # missed 8 broadcasts
    snapshot_bytes = server.snapshot_nbytes
    log_bytes = sum(w.nbytes for _, w in server.log._entries)
    assert stale.kind == "snapshot" or log_bytes < snapshot_bytes
    assert stale.nbytes <= snapshot_bytes
    assert stale.target_version == 8
    # a client one round behind replays the single missed message
    server.books[2] = type(server.books[0])(acked_round=0, version=7)
    near = server.downlink_for(9, 2)
    assert near.kind == "log" and len(near.payloads) == 1 and near.base_version == 7


# ----------------------------------------------------------------------------- store
def test_tensor_store_spills_to_disk_and_keeps_values(tmp_path) -> None:
    store = TensorStore(8, ram_budget_bytes=8 * 4 * 3, cache_rows=2, directory=tmp_path)
    values = {i: torch.arange(8, dtype=torch.float32) * i for i in range(10)}
    for i, v in values.items():
        store.set(i, v)
    assert store.on_disk and len(store) == 10
    assert (tmp_path / "memories.f32").exists()
    for i, v in values.items():
        assert torch.equal(store.get(i), v)
    store.set(3, torch.full((8,), 7.0))
    store.flush()
    assert torch.equal(store.get(3), torch.full((8,), 7.0))
    assert torch.equal(store.get(123), torch.zeros(8))  # unseen client: zero memory
    store.close()


def test_tensor_store_on_disk_keeps_only_its_cache_resident(tmp_path) -> None:
    """Rows written to disk leave the process's resident memory (positioned I/O: the pages of
    a shared memory map stay resident once touched) and the cache is bounded in bytes."""
    d = 2**20  # 4 MiB rows
    store = TensorStore(d, ram_budget_bytes=0, cache_bytes=3 * 4 * d, directory=tmp_path)
    assert store.cache_rows == 3
    peak = PeakMemory()
    for i in range(40):  # 160 MiB of rows
        store.set(i, torch.full((d,), float(i)))
    store.flush()
    if peak.method == "vmhwm":
        assert peak.extra_bytes() < 16 * 4 * d, peak.extra_bytes() / 2**20
    assert store.on_disk and len(store._cache) <= 3
    assert (tmp_path / "memories.f32").stat().st_blocks * 512 >= 40 * 4 * d
    for i in (0, 17, 39):
        assert torch.equal(store.get(i), torch.full((d,), float(i)))
    keys, rows = store.export()
    assert keys == list(range(40)) and torch.equal(rows[17], torch.full((d,), 17.0))
    del rows
    store.close()


@pytest.mark.parametrize("budget", [2**20, 0])  # in RAM, on disk
def test_tensor_store_modify_in_place_and_digests(tmp_path, budget: int) -> None:
    """`modify` changes the stored vector itself (on disk through the cache, whose evicted
    rows' tensors are reused for other rows), `digest` is `tensor_digest` of the current
    vector whether it was given (`set_digest`), forgotten by a change, or never set."""
    d = 8
    w0 = torch.arange(d, dtype=torch.float32)
    store = TensorStore(
        d, ram_budget_bytes=budget, cache_rows=1, directory=tmp_path, expected_clients=4, initial=w0
    )
    assert store.on_disk == (budget == 0)
    assert store.digest(5) == tensor_digest(w0) and 5 not in store
    for i in range(4):  # a new key starts at `initial`
        row = store.modify(i)
        assert torch.equal(row, w0)
        row += float(i)
        if i % 2:
            store.set_digest(i, tensor_digest(row))
    for i in range(4):  # each row read back through a one-row cache
        assert torch.equal(store.get(i), w0 + i)
        assert torch.equal(store.view(i), w0 + i)
        assert store.digest(i) == tensor_digest(w0 + i)
    store.modify(1).mul_(2)  # the digest given before no longer holds
    assert store.digest(1) == tensor_digest((w0 + 1) * 2)
    store.set(2, torch.ones(d))
    assert store.digest(2) == tensor_digest(torch.ones(d))
    with pytest.raises(ValueError, match="values for client 7"):
        store.set(7, torch.ones(d + 1))
    with pytest.raises(KeyError):
        store.set_digest(9, b"x" * 16)
    keys, rows = store.export()
    assert keys == [0, 1, 2, 3] and torch.equal(rows[1], (w0 + 1) * 2)
    del rows
    store.close()


def test_all_finite_agrees_with_isfinite() -> None:
    """The one-sum check gives isfinite's verdict, also where the sum of finite values
    overflows."""
    big = torch.full((4,), 3e38)  # finite, sum overflows to inf
    cases = [torch.zeros(0), torch.randn(1000), big, -big]
    for bad in (math.inf, -math.inf, math.nan):
        x = torch.randn(1000)
        x[517] = bad
        cases += [x, torch.cat([big, x])]
    for x in cases:
        assert all_finite(x) == bool(torch.isfinite(x).all())


def test_a_round_holds_a_running_sum_not_one_vector_per_reply() -> None:
    """The server takes each accepted reply into a running sum: O(d) memory per round, not
    the pN decoded replies (O(pN·d)) it held before."""
    d, n = 2**19, 20
    settings = resolve_settings(get_preset("biqsgd"), d, participation=1.0, seed=0)
    server = make_server(settings, torch.zeros(d))
    server.begin_round(1)
    server.set_members(range(n))
    for i in range(n):
        server.downlink_for(1, i)
    state = initial_client_state(torch.zeros(d), settings)
    wire, _ = client_uplink(settings, state, torch.randn(d), seed=0)
    with kernels_from(LONG_LIVED_MIN_NUMEL):  # numba's one-time load (~100 MB) comes first
        decode(wire.payload).dense()
    peak = PeakMemory()
    for i in range(n):
        digest = server.pending[i].expected_digest
        uplink = Uplink(1, "ok", wire.payload, wire.predicted_nbytes, digest, 0.0, 1)
        assert server.receive(1, i, uplink) == "ok"
    if peak.method == "vmhwm":
        assert peak.extra_bytes() < 8 * 4 * d, peak.extra_bytes() / 2**20
    server.finish_round(1, float(n))
    assert server.version == 1


def test_counted_members_follow_joins_leaves_and_replaced_books() -> None:
    server = make_server(_settings("artemis", pp_variant="pp2", participation=0.5), torch.zeros(D))
    server.begin_round(1)
    server.set_members(range(6))
    assert server.members() == list(range(6)) and server.stats.members == 6
    assert server.expected_participants() == 3.0
    server.begin_round(2)
    server.set_members([1, 2, 7])
    assert server.members() == [1, 2, 7]
    assert (server.stats.joined, server.stats.left, server.stats.members) == (1, 4, 3)
    server.downlink_for(2, 9)  # sampled without `set_members` naming it: it joins
    assert server.members() == [1, 2, 7, 9] and server.expected_participants() == 2.0
    books = {node: dataclasses.replace(book) for node, book in server.books.items()}
    books[3].counted = True
    server.books = books  # as `strategies.checkpoint.restore` replaces them
    assert server.members() == [1, 2, 3, 7, 9]


def test_pp2_new_clients_join_a_zero_h_without_work_per_client() -> None:
    server = make_server(_settings("artemis", pp_variant="pp2", participation=0.5), torch.zeros(D))
    h0 = server.h_global
    server.begin_round(1)
    server.set_members(range(50))
    assert server.h_global is h0  # h = +0, h_j = 0: nothing to add, no O(d) per client
    server.h_global = torch.full((D,), 2.0)
    server.set_members(range(51))  # a non-zero h is rescaled: (pN·h + 0)/(pN)'
    assert torch.allclose(server.h_global, torch.full((D,), 2.0 * 25 / 25.5))


def test_server_memories_use_the_store() -> None:
    settings = _settings("artemis", participation=1.0)
    server = make_server(settings, torch.zeros(D))
    assert isinstance(server.h_store, TensorStore) and server.h_global is None
    # PP2 keeps the h_i too, to correct h by a client's share (reset, leave, join)
    pp2 = make_server(_settings("artemis", pp_variant="pp2"), torch.zeros(D))
    assert isinstance(pp2.h_store, TensorStore) and pp2.h_global is not None
    assert make_server(_settings("biqsgd"), torch.zeros(D)).h_store is None
    server.close()


# ----------------------------------------------------------------------------- sampling
def test_bernoulli_sampling_is_never_empty_and_fraction_has_fixed_size() -> None:
    rng = np.random.default_rng(0)
    nodes = list(range(20))
    sizes = []
    for _ in range(200):
        s, expected = sample_clients(nodes, 0.02, "bernoulli", rng)
        assert s and expected == pytest.approx(0.4)
        sizes.append(len(s))
    assert 1 <= np.mean(sizes) <= 2
    s, expected = sample_clients(nodes, 0.25, "fraction", rng)
    assert len(s) == 5 and expected == 5.0
    with pytest.raises(ValueError, match="no clients"):
        sample_clients([], 0.5, "bernoulli", rng)


# ----------------------------------------------------------------------------- settings
def test_presets_fill_defaults() -> None:
    s = _settings("artemis")
    omega = parse_compressor(s.uplink).omega(D)
    assert s.up_memory_rate == pytest.approx(1 / (2 * (omega + 1)))
    assert s.down_memory_rate == 0 and not s.down_ef
    mcm = _settings("mcm")
    assert mcm.down_memory_rate > 0
    ds = _settings("doublesqueeze")
    # 1-bit scaled sign both ways (biased: a contraction as it is, no scaling)
    assert ds.up_ef and ds.down_ef and ds.uplink.startswith("scaled_sign")
    assert ds.up_scale == 1 and ds.down_scale == 1
    assert ds.up_ef_rate == 1 and ds.down_ef_rate == 1
    # with an unbiased compressor EF damps the residual by min(1, 1/ω) ...
    ds_q = _settings("doublesqueeze", uplink="qsgd:s=1", downlink="qsgd:s=1")
    omega_q = parse_compressor("qsgd:s=1").omega(D)
    assert ds_q.up_scale == 1 and ds_q.down_scale == 1
    assert ds_q.up_ef_rate == pytest.approx(min(1, 1 / omega_q))
    # ... or, as an option, scales its output by 1/(ω+1)
    ds_s = _settings("doublesqueeze", uplink="qsgd:s=1", downlink="qsgd:s=1", ef_scaled=True)
    assert ds_s.up_scale == pytest.approx(1 / (omega_q + 1)) and ds_s.up_scale < 1
    assert ds_s.down_scale == pytest.approx(1 / (omega_q + 1)) and ds_s.down_ef_rate == 1
    assert _settings("sgd").uplink == "identity"


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"strategy": "adam"}, "unknown strategy"),
        ({"participation": 0.0}, "participation"),
        ({"participation": 1.5}, "participation"),
        ({"pp-variant": "pp3"}, "pp-variant"),
        ({"num-server-rounds": 0}, "num-server-rounds"),
        ({"num-server-rounds": "many"}, "num-server-rounds"),
        ({"local-steps": 1.5}, "local-steps"),
        ({"device": "tpu"}, "device"),
        ({"colour": "blue"}, "unknown run-config key"),
        ({"task-options": "dim"}, "task-options"),
        ({"test-fail": "x"}, "test-fail"),
        ({"client-lr": math.inf}, "client-lr"),
        ({"max-staleness": -1}, "max-staleness"),
        ({"max-staleness": 1.5}, "max-staleness"),
        ({"strategy": "flwr-fedavg", "max-staleness": 2}, "max-staleness"),
        ({"test-delay": "1:2"}, "test-delay"),
        ({"test-delay": "1:2:-5"}, "test-delay"),
    ],
)
def test_bad_run_config_is_refused_with_a_clear_error(overrides, match) -> None:
    with pytest.raises(ValueError, match=match):
        load_config({}, overrides, algorithms=ALGORITHMS)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"strategy": "sgd", "downlink": "qsgd:s=1"}, "uncompressed"),
        ({"strategy": "artemis", "uplink": "qsgd:s=-3"}, "compressor"),
        ({"strategy": "artemis", "uplink": "nonsense"}, "compressor"),
        ({"strategy": "mcm", "down-memory-rate": 0.0}, "down-memory-rate"),
        ({"strategy": "qsgd", "down-ef": "on"}, "down-ef"),
        ({"strategy": "signsgd-mv", "up-memory-rate": 0.1}, "signsgd"),
        ({"strategy": "artemis", "up-ef": "maybe"}, "up-ef"),
        ({"strategy": "artemis", "up-memory-rate": 2.0}, "memory-rate"),
    ],
)
def test_bad_algorithm_settings_are_refused(overrides, match) -> None:
    config = load_config({}, overrides, algorithms=ALGORITHMS)
    with pytest.raises(ValueError, match=match):
        settings_from_config(config.values, D)


def test_config_defaults_match_pyproject() -> None:
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    table = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert table == DEFAULTS


def test_option_parsing() -> None:
    assert parse_options("dim=50, noise=0.1,name=x") == {"dim": 50, "noise": 0.1, "name": "x"}
    assert parse_failure("3:2") == (3, 2) and parse_failure("") is None
    assert parse_delay("3:2:40") == (3, 2, 40.0) and parse_delay("") is None


# ----------------------------------------------------------------------------- formats
def test_downlink_and_uplink_records_round_trip() -> None:
    settings, _server, messages = _one_round_server()
    down = messages[0]
    back = downlink_from_record(downlink_to_record(down, "s1"))
    assert back == down
    up = _good_uplink(settings)
    up2, duration = uplink_from_record(uplink_to_record(up, 0.5))
    assert up2 == up and duration == 0.5
    with pytest.raises(ValueError, match="lacks"):
        downlink_from_record(ConfigRecord({"kind": "log"}))
    with pytest.raises(ValueError, match="status"):
        uplink_from_record(ConfigRecord({"status": "weird"}))


def test_client_state_survives_in_context_state() -> None:
    from client.app import _load_state, _save_state

    context = Context(run_id=1, node_id=2, node_config={}, state=RecordDict(), run_config={})
    settings = _settings("mcm")
    state = initial_client_state(torch.arange(D, dtype=torch.float32), settings)
    state.stamp, state.version = 4, 3
    _save_state(context, "k.committed", state)
    back = _load_state(context, "k.committed", torch.device("cpu"))
    assert back is not None and back.stamp == 4 and back.version == 3
    assert _eq(back.model, state.model) and back.up_residual is None
    _save_state(context, "k.committed", None)
    assert _load_state(context, "k.committed", torch.device("cpu")) is None
