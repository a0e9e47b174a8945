"""The REST service under load, driven by wrk: `python -m benchmarks.api`.

For each backend (SQLite file, PostgreSQL): seed R runs x T rounds x C client-rounds
with bulk inserts (default 100 x 1000 x 20 = 100k rounds, 2M client-rounds, and 200
enrolled clients), start the real service (`fedsqueeze api serve`, uvicorn) and drive each
main read endpoint with wrk (its own process, one thread, keep-alive connections, a Lua
script cycling over 500 seeded paths) at 1, 2, 4, ... connections, each for D seconds
(default 5), until the p99 latency passes 50 ms. Per endpoint: the highest request rate
whose p99 stays <= 50 ms (no errors), its p50/p99, the service's CPU milliseconds per
request; ``GET /health`` measured the same way is the framework's floor. The append rate
of rounds is `benchmarks.store`'s.

`--quick`: 10 x 100 x 20, 1 s per point at 1, 4, 16 connections. `--json PATH` writes the
per-endpoint results and every point of the sweeps. `--baseline-tree DIR` (a checkout of
other code) measures that code's service too, on the same database, endpoint by endpoint
right after this one's, so both see the same machine load.
"""

from __future__ import annotations

import argparse
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
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from benchmarks.seeding import analyze, bulk_insert

REPO_ROOT = Path(__file__).resolve().parent.parent
POSTGRES_ADMIN_URL = os.environ.get(
    "FSQ_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)

NODES = 200  # the node ids the seeded client-rounds draw from


@dataclass
class Sizes:
    runs: int
    rounds: int
    clients: int
    duration_s: float
    connections: tuple[int, ...]


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


ROUND_COLUMNS = (
    "id", "run_id", "round", "sampled", "replied", "failed", "uplink_bytes", "downlink_bytes",
    "predicted_uplink_bytes", "predicted_downlink_bytes", "train_loss", "eval_loss",
    "eval_accuracy", "phase_seconds", "started_at", "ended_at", "extra",
)  # fmt: skip
CLIENT_ROUND_COLUMNS = (
    "round_id", "node_id", "outcome", "uplink_bytes", "downlink_bytes", "num_examples",
    "local_loss", "duration_s", "error",
)  # fmt: skip


def seed(database_url: str, sizes: Sizes, progress: Any) -> dict[str, Any]:
    """Bulk-insert the runs, rounds and client-rounds at revision 0002, then upgrade to head
    (the participation counters backfilled); return counts and seconds."""
    from sqlalchemy import insert, text

    from api.db import make_engine, upgrade
    from api.models import Client, Run

    rng = random.Random(0)
    engine = make_engine(database_url)
    # seeded at revision 0002 (before the participation counters), then upgraded: migration
    # 0003 backfills the counters from the client-rounds as it would for a user's store
    upgrade(engine, "0002")
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
        bulk_insert(conn, "rounds", ROUND_COLUMNS, round_rows)
        bulk_insert(conn, "client_rounds", CLIENT_ROUND_COLUMNS, client_rows)
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
                nodes = rng.sample(range(1, NODES + 1), sizes.clients)
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
        # the nodes of the client-rounds above, enrolled (GET /clients reads their totals)
        conn.execute(
            insert(Client),
            [
                {"id": n, "name": f"node-{n}", "public_key_pem": "(benchmark)", "node_id": n,
                 "status": "active", "enrolled_at": start}
                for n in range(1, NODES + 1)
            ],
        )  # fmt: skip
        if is_pg:
            for table in ("runs", "rounds", "client_rounds", "clients"):
                conn.execute(
                    text(
                        f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                        f"(SELECT max(id) FROM {table}))"
                    )
                )
    upgrade(engine)
    analyze(engine)
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
def service(
    database_url: str, home: Path, workers: int, root: Path = REPO_ROOT
) -> Iterator[tuple[str, int]]:
    """The service of the code under `root` on a free port: yields its URL and pid."""
    import httpx

    port = free_port()
    home.mkdir(parents=True, exist_ok=True)
    log = (home / "api.log").open("ab")
    env = os.environ | {
        "FEDSQUEEZE_HOME": str(home),
        "DATABASE_URL": database_url,
        "PYTHONPATH": str(root),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "api", "serve", "--port", str(port),
         "--database-url", database_url, "--log-level", "warning", "--workers", str(workers)],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
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
        yield url, proc.pid
    finally:
        log.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# ---------------------------------------------------------------- wrk

#: name -> what one request of it reads (the table's rows, the docs)
ENDPOINTS = {
    "health": "GET /health (no database: the framework's floor)",
    "run_summary": "GET /runs/{id}",
    "rounds_page_100": "GET /runs/{id}/rounds?limit=100&offset=k",
    "series": "GET /runs/{id}/series",
    "series_304": "GET /runs/{id}/series with If-None-Match (304)",
    "round_detail": "GET /runs/{id}/rounds/{n} (the round's clients)",
    "runs_list": "GET /runs?limit=50&strategy=s",
    "clients_list": "GET /clients?limit=100 (with participation)",
}
#: a request rate counts only while its p99 latency stays within this
P99_LIMIT_MS = 50.0

WRK_SCRIPT = """
local paths = {%(paths)s}
local etags = {%(etags)s}
local i = 0
request = function()
  i = i %% #paths + 1
  if #etags > 0 then
    return wrk.format("GET", paths[i], {["If-None-Match"] = etags[i]})
  end
  return wrk.format("GET", paths[i])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %%d, "duration_us": %%d, "errors": %%d, "p50_us": %%d, '
    .. '"p90_us": %%d, "p99_us": %%d, "max_us": %%d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def paths_for(endpoint: str, sizes: Sizes, count: int = 500) -> list[str]:
    """`count` request paths of `endpoint` over random runs, pages and rounds (seeded)."""
    rng = random.Random(endpoint)
    out = []
    for _ in range(count):
        run_id = rng.randint(1, sizes.runs)
        if endpoint == "health":
            out.append("/health")
        elif endpoint == "run_summary":
            out.append(f"/runs/{run_id}")
        elif endpoint == "rounds_page_100":
            offset = 100 * rng.randrange(max(1, sizes.rounds // 100))
            out.append(f"/runs/{run_id}/rounds?limit=100&offset={offset}")
        elif endpoint in ("series", "series_304"):
            out.append(f"/runs/{run_id}/series")
        elif endpoint == "round_detail":
            out.append(f"/runs/{run_id}/rounds/{rng.randint(1, sizes.rounds)}")
        elif endpoint == "runs_list":
            out.append(f"/runs?limit=50&strategy={rng.choice(['artemis', 'mcm'])}")
        elif endpoint == "clients_list":
            out.append("/clients?limit=100")
        else:
            raise ValueError(f"unknown endpoint {endpoint!r}")
    return out


def wrk_script(url: str, endpoint: str, sizes: Sizes) -> str:
    """The Lua script of one endpoint; for ``series_304`` each path with the ETag the
    service sent for it (an old service that sends none gets 200s: see `expected`)."""
    import httpx

    paths = paths_for(endpoint, sizes)
    etags: list[str] = []
    if endpoint == "series_304":
        with httpx.Client(base_url=url, timeout=600) as client:
            known = {p: client.get(p).headers.get("etag", '"none"') for p in set(paths)}
        etags = [known[p] for p in paths]

    def lua(items: list[str]) -> str:
        return ", ".join(json.dumps(x) for x in items)

    return WRK_SCRIPT % {"paths": lua(paths), "etags": lua(etags)}


def run_wrk(url: str, script: Path, connections: int, duration_s: float) -> dict[str, Any]:
    """One wrk run (1 thread, `connections` keep-alive connections, closed loop)."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration_s))}s", "--timeout",
           "10s", "-s", str(script), url]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 60, check=True)
    line = next((x for x in out.stdout.splitlines() if x.startswith("WRK_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result: {out.stdout[-2000:]} {out.stderr[-2000:]}")
    raw = json.loads(line.removeprefix("WRK_JSON "))
    seconds = raw["duration_us"] / 1e6
    return {
        "connections": connections,
        "requests": raw["requests"],
        "errors": raw["errors"],
        "rate_rps": raw["requests"] / seconds if seconds > 0 else 0.0,
        "p50_ms": raw["p50_us"] / 1000,
        "p90_ms": raw["p90_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "max_ms": raw["max_us"] / 1000,
        "seconds": seconds,
    }


def service_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of the service and its worker processes so far."""
    import psutil

    proc = psutil.Process(pid)
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def sweep(
    url: str, pid: int, endpoint: str, sizes: Sizes, workdir: Path, progress: Any
) -> list[dict[str, Any]]:
    """wrk at 1, 2, 4, ... connections until the p99 passes the limit (more connections
    only queue longer), no request finished within a point, or the list ends; one record
    per point, with the service's CPU milliseconds per request beside the wall-clock rate."""
    import httpx

    script = workdir / f"{endpoint}.lua"
    script.write_text(wrk_script(url, endpoint, sizes))
    first = paths_for(endpoint, sizes, 1)[0]
    status = httpx.get(url + first, timeout=600).status_code
    if status != 200:
        raise RuntimeError(f"{endpoint}: GET {first} answered {status}")
    points = []
    for c in sizes.connections:
        cpu0 = service_cpu_s(pid)
        point = run_wrk(url, script, c, sizes.duration_s)
        cpu = service_cpu_s(pid) - cpu0
        point["service_cpu_ms_per_request"] = (
            1000 * cpu / point["requests"] if point["requests"] else None
        )
        point["load_average_1m"] = os.getloadavg()[0]
        points.append(point)
        progress.console.print(
            f"  {endpoint} c={c} {point['rate_rps']:.0f} req/s p50 {point['p50_ms']:.1f}"
            f" ms p99 {point['p99_ms']:.1f} ms errors {point['errors']}"
        )
        if point["p99_ms"] > P99_LIMIT_MS or not point["requests"]:
            break
    return points


def summary(points: list[dict[str, Any]]) -> dict[str, Any]:
    """An endpoint's result: the highest-rate point whose p99 is within the limit and that
    had answers and no errors (rate_rps None when even one connection missed: then p50/p99 are those
    of one connection)."""
    ok = [p for p in points if p["requests"] and not p["errors"] and p["p99_ms"] <= P99_LIMIT_MS]
    best = max(ok, key=lambda p: p["rate_rps"]) if ok else None
    shown = best or points[0]
    return {
        "connections": best["connections"] if best else None,
        "rate_rps": best["rate_rps"] if best else None,
        "p50_ms": shown["p50_ms"],
        "p99_ms": shown["p99_ms"],
        "p99_limit_ms": P99_LIMIT_MS,
        "meets_limit": best is not None,
        "rate_rps_1_connection": points[0]["rate_rps"],
        "service_cpu_ms_per_request": shown["service_cpu_ms_per_request"],
        "load_average_1m": shown["load_average_1m"],
    }


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.api", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--quick", action="store_true", help="10 runs x 100 rounds, 1 s per point, 1/4/16 conns"
    )
    parser.add_argument("--json", type=Path, help="write the records to this file")
    parser.add_argument("--backends", default="sqlite,postgresql", help="comma separated")
    parser.add_argument(
        "--endpoints", default=",".join(ENDPOINTS), help=f"comma separated: {', '.join(ENDPOINTS)}"
    )
    parser.add_argument("--duration", type=float, help="seconds of wrk per point")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    parser.add_argument(
        "--baseline-tree",
        type=Path,
        help="a checkout of other code (e.g. `git archive COMMIT | tar -x -C DIR`): its "
        "service is started on the same database and measured right after this one's, "
        "endpoint by endpoint (code = baseline)",
    )
    args = parser.parse_args(argv)

    sizes = (
        Sizes(10, 100, 20, 1.0, (1, 4, 16))
        if args.quick
        else Sizes(100, 1000, 20, 5.0, (1, 2, 4, 8, 16, 32, 64))
    )
    if args.duration:
        sizes.duration_s = args.duration
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in backends:
        if b not in ("sqlite", "postgresql"):
            parser.error(f"unknown backend {b!r}: use sqlite and/or postgresql")
    endpoints = [e.strip() for e in args.endpoints.split(",") if e.strip()]
    for e in endpoints:
        if e not in ENDPOINTS:
            parser.error(f"unknown endpoint {e!r}: use {', '.join(ENDPOINTS)}")
    if shutil.which("wrk") is None:
        parser.error("wrk is not installed (Debian: apt-get install wrk)")
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    trees = {"current": REPO_ROOT}
    if args.baseline_tree is not None:
        if not (args.baseline_tree / "api" / "app.py").is_file():
            parser.error(f"--baseline-tree {args.baseline_tree} holds no api/app.py")
        trees["baseline"] = args.baseline_tree.resolve()
    console = Console(width=max(120, shutil.get_terminal_size().columns))
    context = {
        "runs": sizes.runs,
        "rounds_per_run": sizes.rounds,
        "client_rounds_per_round": sizes.clients,
        "duration_s": sizes.duration_s,
        "workers": args.workers,
    }
    records: list[dict[str, Any]] = []
    points: list[dict[str, Any]] = []
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
                with contextlib.ExitStack() as stack:
                    served = {
                        code: stack.enter_context(
                            service(database_url, workdir / code, args.workers, root)
                        )
                        for code, root in trees.items()
                    }
                    progress = stack.enter_context(Progress(console=console, transient=True))
                    for endpoint in endpoints:
                        # the trees one after the other per endpoint: the same machine load
                        for code, (url, pid) in served.items():
                            swept = sweep(url, pid, endpoint, sizes, workdir / code, progress)
                            common = {"backend": backend, "endpoint": endpoint, "code": code,
                                      "loadgen": "wrk"}  # fmt: skip
                            points += [common | p for p in swept]
                            records.append(common | summary(swept) | context | seeded)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    table = Table(
        title=f"REST reads under wrk: the highest rate with p99 <= {P99_LIMIT_MS:.0f} ms "
        f"({sizes.runs} runs x {sizes.rounds} rounds x {sizes.clients} client-rounds, "
        f"{sizes.duration_s:.0f} s per point, {args.workers} worker(s))"
    )
    for col in ("backend", "endpoint", "code", "conns", "req/s", "p50 ms", "p99 ms",
                "CPU ms/req", "1 conn req/s", "load avg"):  # fmt: skip
        table.add_column(col, justify="right")
    for r in records:
        table.add_row(
            r["backend"], r["endpoint"], r["code"],
            str(r["connections"]) if r["meets_limit"] else "-",
            f"{r['rate_rps']:.0f}" if r["meets_limit"] else "MISSED",
            f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}",
            f"{r['service_cpu_ms_per_request']:.2f}" if r["service_cpu_ms_per_request"] else "",
            f"{r['rate_rps_1_connection']:.0f}", f"{r['load_average_1m']:.1f}",
        )  # fmt: skip
    console.print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"results": records, "points": points}, indent=2))
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
