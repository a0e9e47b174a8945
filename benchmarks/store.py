"""Benchmark of the round-history store's write side: `python -m benchmarks.store`.

(a) Appends: rounds of 20 client-rounds recorded through `SqlRecorder.record_round` (the
ServerApp's path: validation, the run's totals, the round, its client-rounds, the nodes'
participation counters), by 1 writer and by 4 at once (threads, one run each), on SQLite
and PostgreSQL; rounds/s, the writer process's CPU per round and, for PostgreSQL running
on this host, its backends' CPU per round (from /proc). Target: >= 1000
rounds/s on PostgreSQL with one writer. Beside each PostgreSQL rate, measured just before
it on the same database: the durable commits/s of a one-row INSERT with one connection
(`durable_commit_rate`), the bound the disk sets at that moment.

(b) Participation: one database holding N client-rounds (default 10 million, 20 per
round, 20 runs, 1,000 nodes), bulk-seeded at schema revision 0002 (COPY on PostgreSQL,
executemany on SQLite) and then upgraded, so migrations 0003 and 0004 backfill the counters
(their time is reported). Then, per repetition, the participation of one page of 100 nodes and
of one node: the grouped query over client_rounds the clients endpoints ran before
(`GROUPED_QUERY`, run here in SQL as the baseline) against `Store.participation`, which
reads the counters; p50/p99 of each and whether both give the same answers.

`--quick` (CI): 200 appended rounds per writer, 100k client-rounds, 10 repetitions.
`--json PATH` writes the records; `--backends sqlite,postgresql`; `--sections
appends,participation`; `--client-rounds N`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from benchmarks.api import (
    POSTGRES_ADMIN_URL,
    postgres_database,
    postgres_reachable,
    sqlite_database,
)
from benchmarks.seeding import analyze, bulk_insert

CLIENTS_PER_ROUND = 20
RUNS = 20
NODES = 1000
PAGE = 100  # node ids per read: a page of GET /clients
TARGET_PG_APPEND_PER_S = 1000.0
BACKENDS = ("sqlite", "postgresql")
SECTIONS = ("appends", "participation")

#: the participation query the clients endpoints ran before the counters (per request,
#: over every client-round of the nodes asked for); {sum} is total on SQLite, sum else
GROUPED_QUERY = (
    "SELECT c.node_id, count(*), sum(CASE WHEN c.outcome = 'ok' THEN 1 ELSE 0 END), "
    "{sum}(c.uplink_bytes), {sum}(c.downlink_bytes), {sum}(c.num_examples), max(r.ended_at) "
    "FROM client_rounds AS c JOIN rounds AS r ON r.id = c.round_id "
    "WHERE c.node_id IN ({ids}) GROUP BY c.node_id"
)


@dataclass
class Sizes:
    append_rounds: int  # per writer
    client_rounds: int
    repeats: int


QUICK = Sizes(append_rounds=200, client_rounds=100_000, repeats=10)
FULL = Sizes(append_rounds=2000, client_rounds=10_000_000, repeats=30)


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


# ---------------------------------------------------------------- (a) appends


def append_round_record(t: int) -> Any:
    from core.records import ClientRoundRecord, RoundRecord

    clients = [
        ClientRoundRecord(node_id=1000 + i, outcome="ok", uplink_bytes=25_000,
                          downlink_bytes=25_000, num_examples=600, local_loss=0.5,
                          duration_s=1.0)
        for i in range(CLIENTS_PER_ROUND)
    ]  # fmt: skip
    total = 25_000 * CLIENTS_PER_ROUND
    return RoundRecord(
        round=t, sampled=CLIENTS_PER_ROUND, replied=CLIENTS_PER_ROUND, failed=0,
        uplink_bytes=total, downlink_bytes=total, predicted_uplink_bytes=total,
        predicted_downlink_bytes=total, train_loss=0.5, eval_loss=0.6, eval_accuracy=0.8,
        phase_seconds={"train": 1.0}, clients=clients,
    )  # fmt: skip


def durable_commit_rate(database_url: str, seconds: float = 1.0) -> float:
    """Commits/s of a one-row INSERT, one connection, on PostgreSQL with the server's
    settings (a durable commit waits for the write-ahead-log flush): the bound a single
    writer meets whatever else it does, measured beside each append rate since it moves
    with the disk's other work."""
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(database_url).set(drivername="postgresql")
    commits = 0
    with psycopg.connect(url.render_as_string(hide_password=False), autocommit=True) as conn:
        conn.execute("CREATE TABLE bench_commit_floor (v int)")
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            conn.execute("INSERT INTO bench_commit_floor VALUES (1)")
            commits += 1
        rate = commits / (time.perf_counter() - t0)
        conn.execute("DROP TABLE bench_commit_floor")
    return rate


def backends_cpu_s(database_url: str) -> dict[int, float] | None:
    """User + system CPU seconds so far of each PostgreSQL client backend connected to the
    database of `database_url`, by pid (from /proc: None unless the server runs on this
    host)."""
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(database_url)
    admin = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid() "
            "AND backend_type = 'client backend'",
            (url.database,),
        ).fetchall()
    out = {}
    for (pid,) in rows:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        out[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def server_cpu_s(before: dict[int, float] | None, after: dict[int, float] | None) -> float | None:
    """The backends' CPU seconds between two `backends_cpu_s` readings (a backend that
    connected in between counts from its start)."""
    if before is None or after is None:
        return None
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


def append_rate(database_url: str, writers: int, rounds: int) -> dict[str, Any]:
    """`writers` threads, each recording `rounds` rounds into its own run through one
    `SqlRecorder` (as one ServerApp process would); rounds/s and CPU ms per round, the
    writer's and (PostgreSQL on this host) the database backends'."""
    from api.store import SqlRecorder
    from core.records import RunInfo

    recorder = SqlRecorder(database_url)
    records = [append_round_record(t) for t in range(1, rounds + 1)]
    run_ids = [
        recorder.start_run(RunInfo("artemis", "sq", "sq", "bench", {}, num_parameters=10))
        for _ in range(writers)
    ]
    recorder.record_round(run_ids[0], append_round_record(0))  # connections warm
    refused_before = recorder.refused_records

    def write(run_id: int) -> None:
        for rec in records:
            recorder.record_round(run_id, rec)

    threads = [threading.Thread(target=write, args=(r,)) for r in run_ids]
    is_pg = recorder.store.engine.dialect.name == "postgresql"
    server0 = backends_cpu_s(database_url) if is_pg else None
    cpu0, t0 = time.process_time(), time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    server = server_cpu_s(server0, backends_cpu_s(database_url) if server0 is not None else None)
    refused = recorder.refused_records - refused_before
    for r in run_ids:
        recorder.finish_run(r, "finished")
    stored = sum(recorder.store.get_run(r).rounds_done for r in run_ids)
    recorder.store.engine.dispose()
    if refused or stored != writers * rounds + 1:
        raise RuntimeError(f"{refused} rounds refused, {stored} stored of {writers * rounds + 1}")
    return {
        "append_rounds_per_s": writers * rounds / wall,
        "cpu_ms_per_round": 1000 * cpu / (writers * rounds),
        "server_cpu_ms_per_round": None if server is None else 1000 * server / (writers * rounds),
        "rounds": writers * rounds,
    }


# ---------------------------------------------------------------- (b) participation


#: the columns `seed_client_rounds` fills (the others keep their defaults)
ROUND_COLUMNS = (
    "id", "run_id", "round", "sampled", "replied", "failed", "uplink_bytes", "downlink_bytes",
    "predicted_uplink_bytes", "predicted_downlink_bytes", "phase_seconds", "started_at",
    "ended_at", "extra",
)  # fmt: skip
ROUND_CLIENT_COLUMNS = (
    "round_id",
    "node_id",
    "outcome",
    "uplink_bytes",
    "downlink_bytes",
    "num_examples",
)


def seed_client_rounds(database_url: str, client_rounds: int) -> dict[str, Any]:
    """Runs, rounds and `client_rounds` client-rounds at revision 0002 in bulk, then the
    upgrade to head (migrations 0003 and 0004 backfill the counters); the seconds of each."""
    from sqlalchemy import insert

    from api.db import make_engine, upgrade
    from api.models import Run

    engine = make_engine(database_url)
    upgrade(engine, "0002")
    is_pg = engine.dialect.name == "postgresql"
    rounds_per_run = max(1, client_rounds // (RUNS * CLIENTS_PER_ROUND))
    start = datetime(2026, 1, 1, tzinfo=UTC)

    def ts(dt: datetime) -> Any:
        return dt if is_pg else dt.replace(tzinfo=None).isoformat(sep=" ")

    t0 = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(insert(Run), [{
            "id": r + 1, "strategy": "artemis", "uplink_compressor": "sq",
            "downlink_compressor": "sq", "task": "bench", "config": {}, "status": "finished",
            "started_at": start, "updated_at": start, "rounds_done": rounds_per_run,
            "sampled_total": 0, "replied_total": 0, "failed_total": 0, "uplink_bytes_total": 0,
            "downlink_bytes_total": 0, "predicted_uplink_bytes_total": 0,
            "predicted_downlink_bytes_total": 0,
        } for r in range(RUNS)])  # fmt: skip
        outcomes = ["ok"] * 15 + ["failed", "dropped", "timeout", "ok", "ok"]
        round_id = 0
        for run in range(1, RUNS + 1):
            round_rows: list[tuple[Any, ...]] = []
            client_rows: list[tuple[Any, ...]] = []
            for t in range(1, rounds_per_run + 1):
                round_id += 1
                began = start + timedelta(seconds=2 * round_id)
                round_rows.append((round_id, run, t, 20, 20, 0, 1, 1, 1, 1, "{}", ts(began),
                                   ts(began + timedelta(seconds=1)), "{}"))  # fmt: skip
                base = round_id * CLIENTS_PER_ROUND
                client_rows.extend(
                    (round_id, 1 + (base + i) % NODES, outcomes[(round_id + i) % 20],
                     20_000 + (base + i) * 7919 % 10_000, 25_000, 600)
                    for i in range(CLIENTS_PER_ROUND)
                )  # fmt: skip
            bulk_insert(conn, "rounds", ROUND_COLUMNS, round_rows)
            bulk_insert(conn, "client_rounds", ROUND_CLIENT_COLUMNS, client_rows)
    seed_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    upgrade(engine)
    backfill_s = time.perf_counter() - t0
    analyze(engine)
    engine.dispose()
    return {
        "client_rounds": round_id * CLIENTS_PER_ROUND,
        "rounds": round_id,
        "seed_s": seed_s,
        "backfill_s": backfill_s,
    }


def grouped_participation(engine: Any, node_ids: Sequence[int]) -> dict[int, tuple[Any, ...]]:
    """`GROUPED_QUERY` for `node_ids`: node id -> (rounds, ok, failed,
    uplink, downlink, examples, last round end), as the clients endpoints answered it."""
    from sqlalchemy import BigInteger, column, text

    from api.models import UInt64, UTCDateTime, u64_to_i64

    big_sum = "total" if engine.dialect.name == "sqlite" else "sum"
    sql = GROUPED_QUERY.format(sum=big_sum, ids=", ".join(str(u64_to_i64(i)) for i in node_ids))
    typed = text(sql).columns(
        column("node_id", UInt64), column("n", BigInteger), column("ok", BigInteger),
        column("up"), column("down"), column("examples"), column("last", UTCDateTime),
    )  # fmt: skip
    with engine.connect() as conn:
        rows = conn.execute(typed).all()
    return {
        int(node): (int(n), int(ok), int(n) - int(ok), int(up), int(down), int(ex), last)
        for node, n, ok, up, down, ex, last in rows
    }


def participation_times(database_url: str, repeats: int) -> list[dict[str, Any]]:
    """p50/p99 of the grouped query and of the counters' read, for a page and a node."""
    from api.db import make_engine
    from api.store import Store

    engine = make_engine(database_url)
    store = Store(engine)
    out = []
    for label, ids in (("page of 100 nodes", list(range(1, PAGE + 1))), ("one node", [7])):
        old = grouped_participation(engine, ids)  # warm both, and compare them
        new = {k: tuple(vars(v).values()) for k, v in store.participation(ids).items()}
        timings: dict[str, list[float]] = {"grouped": [], "counters": []}
        for _ in range(repeats):
            t0 = time.perf_counter()
            grouped_participation(engine, ids)
            timings["grouped"].append(1000 * (time.perf_counter() - t0))
            t0 = time.perf_counter()
            store.participation(ids)
            timings["counters"].append(1000 * (time.perf_counter() - t0))
        p50 = {k: percentile(v, 50) for k, v in timings.items()}
        out.append({
            "read": label, "nodes": len(ids), "repeats": repeats, "identical": old == new,
            "grouped_p50_ms": p50["grouped"], "grouped_p99_ms": percentile(timings["grouped"], 99),
            "counters_p50_ms": p50["counters"],
            "counters_p99_ms": percentile(timings["counters"], 99),
            "speedup_p50": p50["grouped"] / p50["counters"],
        })  # fmt: skip
    engine.dispose()
    return out


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.store", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="CI sizes (see above)")
    parser.add_argument("--json", type=Path, help="write the records to this file")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma separated")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma separated")
    parser.add_argument("--client-rounds", type=int, help="client-rounds seeded for (b)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.client_rounds is not None:
        if args.client_rounds < RUNS * CLIENTS_PER_ROUND:
            parser.error(f"--client-rounds must be >= {RUNS * CLIENTS_PER_ROUND}")
        sizes = Sizes(sizes.append_rounds, args.client_rounds, sizes.repeats)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    for name, chosen, allowed in (("backend", backends, BACKENDS), ("section", sections, SECTIONS)):
        bad = [c for c in chosen if c not in allowed]
        if bad or not chosen:
            parser.error(f"unknown {name} {bad or chosen!r}: choose from {', '.join(allowed)}")

    console = Console(width=150)
    console.print(f"load average at the start: {os.getloadavg()[0]:.1f} ({os.cpu_count()} cores)")
    records: list[dict[str, Any]] = []
    for backend in backends:
        if backend == "postgresql" and not postgres_reachable():
            console.print(f"[yellow]PostgreSQL unreachable at {POSTGRES_ADMIN_URL}: skipped")
            continue
        workdir = Path(tempfile.mkdtemp(prefix=f"fsq-bench-store-{backend}-"))
        try:
            if "appends" in sections:
                for writers in (1, 4):
                    folder = workdir / f"appends-{writers}"
                    db = sqlite_database(folder) if backend == "sqlite" else postgres_database()
                    with db as url:
                        console.print(f"{backend}: {writers} writer(s) ...")
                        floor = durable_commit_rate(url) if backend == "postgresql" else None
                        rate = append_rate(url, writers, sizes.append_rounds)
                    target = (
                        TARGET_PG_APPEND_PER_S if (backend, writers) == ("postgresql", 1) else None
                    )
                    records.append({
                        "section": "appends", "backend": backend, "writers": writers, **rate,
                        "durable_commits_per_s": floor,
                        "client_rounds_per_round": CLIENTS_PER_ROUND,
                        "target_rounds_per_s": target,
                        "meets_target": None if target is None
                        else rate["append_rounds_per_s"] >= target,
                        "load_average": os.getloadavg()[0],
                    })  # fmt: skip
            if "participation" in sections:
                folder = workdir / "participation"
                db = sqlite_database(folder) if backend == "sqlite" else postgres_database()
                with db as url:
                    console.print(f"{backend}: seeding {sizes.client_rounds:,} client-rounds ...")
                    seeded = seed_client_rounds(url, sizes.client_rounds)
                    console.print(
                        f"{backend}: seeded in {seeded['seed_s']:.1f} s, counters backfilled "
                        f"by migrations 0003 and 0004 in {seeded['backfill_s']:.1f} s"
                    )
                    for timing in participation_times(url, sizes.repeats):
                        records.append({
                            "section": "participation", "backend": backend, **seeded, **timing,
                            "load_average": os.getloadavg()[0],
                        })  # fmt: skip
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    appends = Table(title=f"appends: rounds of {CLIENTS_PER_ROUND} client-rounds via SqlRecorder")
    for col in ("backend", "writers", "rounds/s", "CPU ms/round", "server CPU ms", "commits/s",
                "load avg", "target"):  # fmt: skip
        appends.add_column(col, justify="right")
    for r in (r for r in records if r["section"] == "appends"):
        target = r["target_rounds_per_s"]
        verdict = (
            "" if target is None else f">= {target:.0f} {'ok' if r['meets_target'] else 'MISSED'}"
        )
        appends.add_row(
            r["backend"], str(r["writers"]), f"{r['append_rounds_per_s']:.0f}",
            f"{r['cpu_ms_per_round']:.2f}",
            "" if r["server_cpu_ms_per_round"] is None else f"{r['server_cpu_ms_per_round']:.2f}",
            "" if r["durable_commits_per_s"] is None else f"{r['durable_commits_per_s']:.0f}",
            f"{r['load_average']:.1f}", verdict,
        )  # fmt: skip
    reads = Table(title="participation: grouped query (before) vs counters (now), ms")
    for col in ("backend", "client-rounds", "read", "grouped p50 / p99", "counters p50 / p99",
                "speed-up p50", "identical", "backfill s", "load avg"):  # fmt: skip
        reads.add_column(col, justify="right")
    for r in (r for r in records if r["section"] == "participation"):
        reads.add_row(
            r["backend"], f"{r['client_rounds']:,}", r["read"],
            f"{r['grouped_p50_ms']:.2f} / {r['grouped_p99_ms']:.2f}",
            f"{r['counters_p50_ms']:.2f} / {r['counters_p99_ms']:.2f}",
            f"{r['speedup_p50']:.1f}x", str(r["identical"]), f"{r['backfill_s']:.1f}",
            f"{r['load_average']:.1f}",
        )  # fmt: skip
    console.print(appends, reads)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=2, default=str))
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
