"""Benchmark of the round-history store and REST service: `python -m benchmarks.api`.

For each backend (SQLite file, PostgreSQL): seed R runs x T rounds x C client-rounds
with bulk inserts (default 100 x 1000 x 20 = 100k rounds, 2M client-rounds), start the
real service (`fedsqueeze api serve`, uvicorn) and drive it with K concurrent clients
(default 8) for D seconds (default 30) on a mix of the main read endpoints; report
p50/p99 latency per endpoint, with ``GET /health`` as the in-run baseline (the
framework's floor); then the same with 1 client (the service time without queueing).
Then the append rate of rounds (C client-rounds each): through `SqlRecorder` (the
ServerApp's path, one transaction per round) with one writer and with four at once, and
over HTTP.

Targets: p99 <= 50 ms for a run summary and a page of 100 rounds; append >= 500 rounds/s.
`--quick`: 10 x 100 x 20, 5 s of load. `--json PATH` writes the records.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
POSTGRES_ADMIN_URL = os.environ.get(
    "FSQ_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)
TARGET_P99_MS = {"run_summary": 50.0, "rounds_page_100": 50.0}
TARGET_APPEND_PER_S = 500.0


@dataclass
class Sizes:
    runs: int
    rounds: int
    clients: int
    duration_s: float
    concurrency: int
    append_rounds: int


# ---------------------------------------------------------------- databases


@contextlib.contextmanager
def sqlite_database(workdir: Path) -> Iterator[str]:
    yield f"sqlite:///{workdir / 'bench.db'}"


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    import psycopg
    from sqlalchemy.engine import make_url

    conninfo = POSTGRES_ADMIN_URL
    name = f"fsq_bench_{secrets.token_hex(5)}"
    with psycopg.connect(conninfo, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(POSTGRES_ADMIN_URL).set(drivername="postgresql+psycopg", database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def postgres_reachable() -> bool:
    try:
        import psycopg

        with psycopg.connect(POSTGRES_ADMIN_URL, connect_timeout=3):
            return True
    except Exception:
        return False


# ---------------------------------------------------------------- seeding


def seed(database_url: str, sizes: Sizes, progress: Any) -> dict[str, Any]:
    """Bulk-insert the runs, rounds and client-rounds; return counts and seconds."""
    from sqlalchemy import insert, text

    from api.db import make_engine, upgrade
    from api.models import Run

    rng = random.Random(0)
    engine = make_engine(database_url)
    upgrade(engine)
    t0 = time.perf_counter()
    start = datetime(2026, 1, 1, tzinfo=UTC)
    run_rows: list[dict[str, Any]] = []
    round_rows: list[tuple[Any, ...]] = []
    client_rows: list[tuple[Any, ...]] = []
    round_id = 0
    task = progress.add_task("seeding", total=sizes.runs)
    is_pg = engine.dialect.name == "postgresql"

    def ts(dt: datetime) -> Any:
        return dt if is_pg else dt.replace(tzinfo=None).isoformat(sep=" ")

    def flush_rounds(conn: Any) -> None:
        if not round_rows:
            return
        cols = ("id, run_id, round, sampled, replied, failed, uplink_bytes, downlink_bytes, "
                "predicted_uplink_bytes, predicted_downlink_bytes, train_loss, eval_loss, "
                "eval_accuracy, phase_seconds, started_at, ended_at, extra")  # fmt: skip
        ccols = ("round_id, node_id, outcome, uplink_bytes, downlink_bytes, num_examples, "
                 "local_loss, duration_s, error")  # fmt: skip
        raw = conn.connection.driver_connection
        if is_pg:
            with raw.cursor() as cur:
                with cur.copy(f"COPY rounds ({cols}) FROM STDIN") as copy:
                    for row in round_rows:
                        copy.write_row(row)
                with cur.copy(f"COPY client_rounds ({ccols}) FROM STDIN") as copy:
                    for row in client_rows:
                        copy.write_row(row)
        else:
            cur = raw.cursor()
            cur.executemany(
                f"INSERT INTO rounds ({cols}) VALUES ({','.join('?' * 17)})", round_rows
            )
            cur.executemany(
                f"INSERT INTO client_rounds ({ccols}) VALUES ({','.join('?' * 9)})", client_rows
            )
            cur.close()
        round_rows.clear()
        client_rows.clear()

    phases = json.dumps({"configure": 0.01, "train": 1.2, "aggregate": 0.03, "evaluate": 0.2})
    with engine.begin() as conn:
        for r in range(sizes.runs):
            run_id = r + 1
            up_total = down_total = 0
            best: tuple[float, int] | None = None
            t_start = start + timedelta(hours=r)
            for t in range(1, sizes.rounds + 1):
                round_id += 1
                ups = [rng.randint(20_000, 30_000) for _ in range(sizes.clients)]
                downs = [rng.randint(20_000, 30_000) for _ in range(sizes.clients)]
                acc = min(0.99, 0.1 + 0.8 * t / sizes.rounds + rng.uniform(-0.02, 0.02))
                if best is None or acc > best[0]:
                    best = (acc, t)
                up_total += sum(ups)
                down_total += sum(downs)
                began = t_start + timedelta(seconds=2 * t)
                round_rows.append((
                    round_id, run_id, t, sizes.clients, sizes.clients, 0, sum(ups), sum(downs),
                    sum(ups), sum(downs), 2.0 / t, 2.1 / t, acc, phases, ts(began),
                    ts(began + timedelta(seconds=1.5)), "{}",
                ))  # fmt: skip
                nodes = rng.sample(range(1, 201), sizes.clients)
                for i in range(sizes.clients):
                    client_rows.append(
                        (round_id, nodes[i], "ok", ups[i], downs[i], 600, 1.0 / t, 1.1, None)
                    )
            run_rows.append({
                "id": run_id, "strategy": ("artemis", "mcm", "fedavg", "diana")[r % 4],
                "uplink_compressor": "sq:s=1", "downlink_compressor": "sq:s=1",
                "task": "fashion_mnist", "config": {"num-server-rounds": sizes.rounds},
                "num_parameters": 206_922, "status": "finished", "started_at": t_start,
                "ended_at": t_start + timedelta(seconds=2 * sizes.rounds + 2),
                "updated_at": t_start + timedelta(seconds=2 * sizes.rounds + 2),
                "rounds_done": sizes.rounds, "last_round": sizes.rounds,
                "sampled_total": sizes.clients * sizes.rounds,
                "replied_total": sizes.clients * sizes.rounds, "failed_total": 0,
                "uplink_bytes_total": up_total, "downlink_bytes_total": down_total,
                "predicted_uplink_bytes_total": up_total,
                "predicted_downlink_bytes_total": down_total,
                "best_eval_accuracy": best[0] if best else None,
                "best_eval_round": best[1] if best else None,
            })  # fmt: skip
            if len(round_rows) >= 20_000 or r == sizes.runs - 1:
                conn.execute(insert(Run), run_rows)
                run_rows.clear()
                flush_rounds(conn)
            progress.advance(task)
        if is_pg:
            for table in ("runs", "rounds", "client_rounds"):
                conn.execute(
                    text(
                        f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                        f"(SELECT max(id) FROM {table}))"
                    )
                )
    with engine.connect() as conn:
        if is_pg:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE"))
        else:
            conn.execute(text("ANALYZE"))
            conn.commit()
    engine.dispose()
    progress.remove_task(task)
    return {
        "seed_seconds": time.perf_counter() - t0,
        "rounds": sizes.runs * sizes.rounds,
        "client_rounds": sizes.runs * sizes.rounds * sizes.clients,
    }


# ---------------------------------------------------------------- service and load


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def service(database_url: str, home: Path, workers: int) -> Iterator[str]:
    import httpx

    port = free_port()
    log = (home / "api.log").open("ab")
    env = os.environ | {"FEDSQUEEZE_HOME": str(home), "DATABASE_URL": database_url}
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "api", "serve", "--port", str(port),
         "--database-url", database_url, "--log-level", "warning", "--workers", str(workers)],
        cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"service exited; see {home / 'api.log'}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("service did not become ready in 60 s")
            time.sleep(0.2)
        yield url
    finally:
        log.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass
class Samples:
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0


ENDPOINTS = ("health", "run_summary", "rounds_page_100", "round_detail", "runs_list", "series")


def request_for(endpoint: str, rng: random.Random, sizes: Sizes) -> tuple[str, dict[str, Any]]:
    run_id = rng.randint(1, sizes.runs)
    if endpoint == "health":
        return "/health", {}
    if endpoint == "run_summary":
        return f"/runs/{run_id}", {}
    if endpoint == "rounds_page_100":
        offset = rng.randrange(0, max(1, sizes.rounds - 100) + 1)
        return f"/runs/{run_id}/rounds", {"limit": 100, "offset": offset}
    if endpoint == "round_detail":
        return f"/runs/{run_id}/rounds/{rng.randint(1, sizes.rounds)}", {}
    if endpoint == "runs_list":
        return "/runs", {"limit": 50, "strategy": rng.choice(["artemis", "mcm"])}
    return f"/runs/{run_id}/series", {}


async def load(url: str, sizes: Sizes, concurrency: int, duration_s: float) -> dict[str, Samples]:
    import httpx

    samples = {e: Samples() for e in ENDPOINTS}
    deadline = time.perf_counter() + duration_s

    async def worker(k: int) -> None:
        rng = random.Random(k)
        limits = httpx.Limits(max_connections=1)
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
            i = k
            while time.perf_counter() < deadline:
                endpoint = ENDPOINTS[i % len(ENDPOINTS)]
                i += 1
                path, params = request_for(endpoint, rng, sizes)
                t0 = time.perf_counter()
                try:
                    response = await client.get(path, params=params)
                    ok = response.status_code == 200
                    response.read()
                except httpx.HTTPError:
                    ok = False
                elapsed = (time.perf_counter() - t0) * 1000
                if ok:
                    samples[endpoint].latencies_ms.append(elapsed)
                else:
                    samples[endpoint].errors += 1

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return samples


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


# ---------------------------------------------------------------- append rate


def append_rates(database_url: str, url: str, sizes: Sizes) -> dict[str, float]:
    import httpx

    from api.store import SqlRecorder, open_store
    from core.records import ClientRoundRecord, RoundRecord, RunInfo

    def record(t: int) -> RoundRecord:
        clients = [
            ClientRoundRecord(node_id=1000 + i, outcome="ok", uplink_bytes=25_000,
                              downlink_bytes=25_000, num_examples=600, local_loss=0.5,
                              duration_s=1.0)
            for i in range(sizes.clients)
        ]  # fmt: skip
        return RoundRecord(
            round=t, sampled=sizes.clients, replied=sizes.clients, failed=0,
            uplink_bytes=25_000 * sizes.clients, downlink_bytes=25_000 * sizes.clients,
            predicted_uplink_bytes=25_000 * sizes.clients,
            predicted_downlink_bytes=25_000 * sizes.clients, train_loss=0.5, eval_loss=0.6,
            eval_accuracy=0.8, phase_seconds={"train": 1.0}, clients=clients,
        )  # fmt: skip

    recorder = SqlRecorder(database_url)
    run_id = recorder.start_run(RunInfo("artemis", "sq", "sq", "bench", {}, num_parameters=10))
    records = [record(t) for t in range(1, sizes.append_rounds + 1)]
    t0 = time.perf_counter()
    for rec in records:
        recorder.record_round(run_id, rec)
    sql_rate = len(records) / (time.perf_counter() - t0)
    recorder.finish_run(run_id, "finished")

    # four ServerApps recording at once (threads, one run each, one connection each)
    import threading

    writers = 4
    per_writer = max(50, sizes.append_rounds // writers)
    run_ids = [
        recorder.start_run(RunInfo("mcm", "sq", "sq", "bench", {}, num_parameters=10))
        for _ in range(writers)
    ]

    def write(run: int) -> None:
        for rec in records[:per_writer]:
            recorder.record_round(run, rec)

    threads = [threading.Thread(target=write, args=(r,)) for r in run_ids]
    t0 = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    parallel_rate = writers * per_writer / (time.perf_counter() - t0)
    for r in run_ids:
        recorder.finish_run(r, "finished")

    _, token = open_store(database_url).create_token("bench")
    n_http = max(50, sizes.append_rounds // 4)
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as client:
        run = client.post(
            "/runs", json={"strategy": "artemis", "uplink_compressor": "sq",
                           "downlink_compressor": "sq", "task": "bench"},
        ).json()  # fmt: skip
        bodies = []
        for t in range(1, n_http + 1):
            rec = record(t)
            body = {k: v for k, v in rec.__dict__.items() if k not in ("clients", "started_at",
                                                                       "ended_at")}  # fmt: skip
            body["clients"] = [c.__dict__ for c in rec.clients]
            bodies.append(body)
        t0 = time.perf_counter()
        for body in bodies:
            client.post(f"/runs/{run['id']}/rounds", json=body).raise_for_status()
        http_rate = n_http / (time.perf_counter() - t0)
    return {
        "append_rounds_per_s": sql_rate,
        "append_rounds_per_s_4_writers": parallel_rate,
        "http_append_rounds_per_s": http_rate,
    }


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.api", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="10 runs x 100 rounds, 5 s of load")
    parser.add_argument("--json", type=Path, help="write the records to this file")
    parser.add_argument("--backends", default="sqlite,postgresql", help="comma separated")
    parser.add_argument("--duration", type=float, help="seconds of load per backend")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent clients")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    args = parser.parse_args(argv)

    sizes = (
        Sizes(10, 100, 20, 5.0, args.concurrency, 300)
        if args.quick
        else Sizes(100, 1000, 20, 30.0, args.concurrency, 2000)
    )
    if args.duration:
        sizes.duration_s = args.duration
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in backends:
        if b not in ("sqlite", "postgresql"):
            parser.error(f"unknown backend {b!r}: use sqlite and/or postgresql")
    console = Console()
    records: list[dict[str, Any]] = []
    for backend in backends:
        if backend == "postgresql" and not postgres_reachable():
            console.print(f"[yellow]PostgreSQL unreachable at {POSTGRES_ADMIN_URL}: skipped")
            continue
        workdir = Path(tempfile.mkdtemp(prefix=f"fsq-bench-{backend}-"))
        try:
            db = sqlite_database(workdir) if backend == "sqlite" else postgres_database()
            with db as database_url:
                with Progress(console=console, transient=True) as progress:
                    seeded = seed(database_url, sizes, progress)
                console.print(
                    f"{backend}: seeded {sizes.runs} runs, {seeded['rounds']:,} rounds, "
                    f"{seeded['client_rounds']:,} client-rounds in {seeded['seed_seconds']:.1f} s"
                )
                with service(database_url, workdir, args.workers) as url:
                    console.print(
                        f"{backend}: {sizes.concurrency} clients for {sizes.duration_s:.0f} s ..."
                    )
                    samples = asyncio.run(load(url, sizes, sizes.concurrency, sizes.duration_s))
                    solo_s = min(10.0, sizes.duration_s / 3)
                    console.print(f"{backend}: 1 client for {solo_s:.0f} s (service time) ...")
                    solo = asyncio.run(load(url, sizes, 1, solo_s))
                    console.print(f"{backend}: append rate ...")
                    rates = append_rates(database_url, url, sizes)
            for clients, phase in ((sizes.concurrency, samples), (1, solo)):
                base_p50 = percentile(phase["health"].latencies_ms, 50)
                for endpoint, sample in phase.items():
                    p50 = percentile(sample.latencies_ms, 50)
                    p99 = percentile(sample.latencies_ms, 99)
                    target = TARGET_P99_MS.get(endpoint) if clients == sizes.concurrency else None
                    records.append({
                        "backend": backend, "endpoint": endpoint, "concurrency": clients,
                        "p50_ms": p50, "p99_ms": p99,
                        "requests": len(sample.latencies_ms) + sample.errors,
                        "errors": sample.errors,
                        "p50_vs_health": p50 / base_p50 if base_p50 else None,
                        "target_p99_ms": target,
                        "meets_target": None if target is None else p99 <= target,
                    })  # fmt: skip
            records.append({
                "backend": backend, **rates, "target_append_rounds_per_s": TARGET_APPEND_PER_S,
                "meets_target": rates["append_rounds_per_s"] >= TARGET_APPEND_PER_S,
                "client_rounds_per_round": sizes.clients, **seeded,
                "runs": sizes.runs, "rounds_per_run": sizes.rounds,
                "concurrency": sizes.concurrency, "duration_s": sizes.duration_s,
                "workers": args.workers,
            })  # fmt: skip
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    table = Table(title=f"REST read latency ({sizes.concurrency} clients, {sizes.runs} runs x "
                        f"{sizes.rounds} rounds x {sizes.clients} client-rounds)")  # fmt: skip
    for col in ("backend", "endpoint", "clients", "requests", "errors", "p50 ms", "p99 ms",
                "p50 / health", "target p99"):  # fmt: skip
        table.add_column(col, justify="right")
    for r in records:
        if "endpoint" not in r:
            continue
        target = r["target_p99_ms"]
        verdict = (
            "" if target is None else f"<= {target:.0f} {'ok' if r['meets_target'] else 'MISSED'}"
        )
        table.add_row(
            r["backend"], r["endpoint"], str(r["concurrency"]), str(r["requests"]),
            str(r["errors"]),
            f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}",
            f"{r['p50_vs_health']:.1f}x" if r["p50_vs_health"] else "", verdict,
        )  # fmt: skip
    console.print(table)
    rates_table = Table(title=f"append rate (rounds of {sizes.clients} client-rounds)")
    for col in ("backend", "SqlRecorder rounds/s", "4 writers rounds/s", "HTTP rounds/s", "target"):
        rates_table.add_column(col, justify="right")
    for r in records:
        if "append_rounds_per_s" in r:
            rates_table.add_row(
                r["backend"], f"{r['append_rounds_per_s']:.0f}",
                f"{r['append_rounds_per_s_4_writers']:.0f}",
                f"{r['http_append_rounds_per_s']:.0f}",
                f">= {TARGET_APPEND_PER_S:.0f} {'ok' if r['meets_target'] else 'MISSED'}",
            )  # fmt: skip
    console.print(rates_table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=2, default=str))
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
