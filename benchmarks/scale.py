"""Scale benchmark: the server half's cost per round as N, p and d grow (issue 11).

The server half alone (`strategies.server_half` and what it drives: `strategies.sampling`,
`strategies.catchup`, `strategies.aggregation`, `strategies.memory_store`,
`strategies.encoding`), without Flower, over the grid

    N ∈ {10, 100, 1000, 10000} clients × p ∈ {0.01, 0.1, 1} × d ∈ {2·10^4, 10^6, 10^7}
      × pp-variant ∈ {pp1, pp2},  strategy artemis (the default preset; more with
      --strategies)

plus one real Flower simulation (1000 clients, p = 0.01, synthetic-lsq; none in --quick).

Clients' uplinks. Producing pN encoded replies per round at d = 10^7 costs far more than the
server's work, so each worker process (one per d) first makes a small pool of real uplink
payloads (`POOL_SIZE` real client halves, `strategies.client_half.client_uplink` with the
preset's real compressor, on random g_i) and every reply of every round carries one of them.
The server decodes and validates each reply as it would a real client's (size, codec, d
values, all finite; `strategies.validation`) and compares its state digest: the digest a
client in step would send is the one the server expects (`ServerHalf.pending`), which the
benchmark copies into the reply (computing it client-side would need every client's h_i).

What is timed (wall and CPU seconds of this process, all threads) is the server's work per
round and nothing else: `set_members` (the N counted clients), `sample_clients` (S_k),
`downlink_for` for each i ∈ S_k (catch-up log or snapshot, the digests it expects),
`receive` for each reply (decode, validation, digest check, memory updates) and
`finish_round` (aggregation PP1/PP2, memory updates, the model step and the encoded
broadcast of the next round, the store's flush to disk). Building the reply objects from the
pool is not timed.

Per case (one record): clients, participation, d, pp_variant, strategy, rounds, participants
(mean |S_k|), round_s and round_s_cpu (mean over rounds 2..R; round 1, when every client
joins, is first_round_s), ns_per_coord (round_s / (|S_k|·d): flat when the cost is
O(pN·d)), the phases' shares, peak_rss_mb (the worker's VmHWM, reset through
/proc/self/clear_refs before the case; `benchmarks.memory`) and peak_extra_mb above the
resident memory before it, ram_vectors (peak_extra / 4d: flat in N when the server's RAM is
O(d)), store_on_disk and disk_bytes (allocated bytes of the case's store-dir after the run),
skipped_reason (a case whose RAM, disk or time need exceeds the machine's or the budget's).

Rounds: as many as fit a work budget of `WORK_PER_CASE` participant-coordinates
(R·|S_k|·d), between `MIN_ROUNDS` and `MAX_ROUNDS`; big cases run fewer rounds.

    python -m benchmarks.scale                  # the full grid (≈ 30 min on 2 cores)
    python -m benchmarks.scale --quick          # d = 2·10^4, N ≤ 100 and one spilled store
    python -m benchmarks.scale --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

#: real uplink payloads made per (d, strategy) and reused by every reply
POOL_SIZE = 4
MIN_ROUNDS = 3
MAX_ROUNDS = 10
#: participant-coordinates (R·|S_k|·d) one case may cost, full grid / quick
WORK_PER_CASE = 6 * 10**8
QUICK_WORK_PER_CASE = 10**7
#: a case whose rounds cost more than this per round (pN·d) is skipped for time
MAX_WORK_PER_ROUND = 2 * 10**8
#: share of the free RAM / disk a case may plan to use (the machine is shared)
RAM_SHARE = 0.5
DISK_SHARE = 0.5
#: d-vectors of float32 the server half holds or makes at once besides its stores (w, h,
#: ĝ, the running sum, the optimiser, the decoded reply and its temporaries, the snapshot)
SERVER_VECTORS = 16

FULL_GRID: dict[str, tuple[Any, ...]] = {
    "clients": (10, 100, 1000, 10000),
    "participation": (0.01, 0.1, 1.0),
    "d": (2 * 10**4, 10**6, 10**7),
    "pp_variant": ("pp1", "pp2"),
}
QUICK_GRID: dict[str, tuple[Any, ...]] = {
    "clients": (10, 100),
    "participation": (0.1, 1.0),
    "d": (2 * 10**4,),
    "pp_variant": ("pp1", "pp2"),
}
#: besides the quick grid: N·d·4 beyond the store's RAM budget, so the memories spill to disk
QUICK_EXTRA = ((10000, 0.01, 2 * 10**4),)

#: the skipped_reason of cases a worker process did not finish (a failure, not a skip)
WORKER_FAILED = "worker process ended before this case"

#: the one real Flower simulation of the full run
FLOWER_RUN: dict[str, Any] = {"clients": 1000, "participation": 0.01, "rounds": 5}


@dataclass(frozen=True)
class Case:
    clients: int
    participation: float
    d: int
    pp_variant: str
    strategy: str
    rounds: int
    skipped_reason: str = ""

    @property
    def expected_participants(self) -> float:
        return self.clients * self.participation


# ----------------------------------------------------------------------------- planning
def store_ram_budget() -> int:
    """The RAM budget of the server's per-client store (`strategies.memory_store`)."""
    import inspect

    from strategies.memory_store import TensorStore

    default = inspect.signature(TensorStore).parameters["ram_budget_bytes"].default
    return int(default)


def plan(
    grid: dict[str, tuple[Any, ...]],
    extra: Iterable[tuple[int, float, int]],
    strategies: Sequence[str],
    work_per_case: int,
    free_ram: int,
    free_disk: int,
) -> list[Case]:
    """Every case of the grid, with its rounds, or the reason it is skipped."""
    budget = store_ram_budget()
    points = [(n, p, d) for d in grid["d"] for n in grid["clients"] for p in grid["participation"]]
    points += [pt for pt in extra if pt not in points]
    cases = []
    for n, p, d in points:
        for variant in grid["pp_variant"]:
            for strategy in strategies:
                pn = max(1.0, n * p)
                rounds = int(min(MAX_ROUNDS, max(MIN_ROUNDS, work_per_case // (pn * d))))
                store = n * d * 4  # every client's h_i (PP1 and PP2 keep them)
                ram = SERVER_VECTORS * 4 * d + (store if store <= budget else budget)
                seen = n * (1 - (1 - p) ** rounds) + 1  # distinct clients whose row is written
                reason = ""
                if pn * d > MAX_WORK_PER_ROUND:
                    reason = (
                        f"time: pN·d = {pn * d:.0e} per round exceeds the budget's "
                        f"{MAX_WORK_PER_ROUND:.0e}"
                    )
                elif ram > RAM_SHARE * free_ram:
                    reason = f"RAM: needs ~{ram / 1e9:.1f} GB, {free_ram / 1e9:.1f} GB available"
                elif store > budget and store > DISK_SHARE * free_disk:
                    reason = (
                        f"disk: the store of N·d·4 = {store / 1e9:.0f} GB exceeds "
                        f"{DISK_SHARE:.0%} of the {free_disk / 1e9:.0f} GB free"
                    )
                elif store > budget and seen * d * 4 > DISK_SHARE * free_disk:
                    reason = f"disk: writes ~{seen * d * 4 / 1e9:.0f} GB in {rounds} rounds"
                cases.append(Case(n, p, d, variant, strategy, 0 if reason else rounds, reason))
    return cases


# ----------------------------------------------------------------------------- one case
def uplink_pool(d: int, strategy: str, size: int = POOL_SIZE) -> list[tuple[bytes, int]]:
    """`size` real uplink payloads (payload, predicted bytes): a fresh client's uplink
    Δ̂_i = C_up(g_i − h_i) (`client_uplink`) for random g_i, by the preset's compressor."""
    import torch

    from strategies.client_half import client_uplink, initial_client_state
    from strategies.registry import get_preset
    from strategies.settings import resolve_settings

    settings = resolve_settings(get_preset(strategy), d, seed=0)
    state = initial_client_state(torch.zeros(d), settings)
    generator = torch.Generator().manual_seed(d)
    pool = []
    for j in range(size):
        g = torch.empty(d).normal_(generator=generator)
        wire, _ = client_uplink(settings, state, g, seed=j)
        pool.append((wire.payload, wire.predicted_nbytes))
    return pool


def allocated_bytes(folder: Path) -> tuple[int, int]:
    """(allocated, apparent) bytes of the files under `folder` (the store's file is sparse)."""
    allocated = apparent = 0
    for path in folder.rglob("*"):
        if path.is_file():
            st = path.stat()
            allocated += st.st_blocks * 512
            apparent += st.st_size
    return allocated, apparent


def run_case(case: Case, pool: Sequence[tuple[bytes, int]], store_dir: Path) -> dict[str, Any]:
    """`case.rounds` rounds of the server half alone, replies from `pool`; one record."""
    import numpy as np
    import torch

    from benchmarks.memory import PeakMemory
    from strategies.messages import Uplink
    from strategies.registry import get_preset, make_server
    from strategies.sampling import sample_clients
    from strategies.settings import resolve_settings

    settings = resolve_settings(
        get_preset(case.strategy),
        case.d,
        participation=case.participation,
        pp_variant=case.pp_variant,
        seed=0,
    )
    nodes = list(range(case.clients))
    rng = np.random.default_rng(0)
    phases = {"members": 0.0, "sample": 0.0, "downlink": 0.0, "receive": 0.0, "finish": 0.0}
    walls: list[float] = []
    cpus: list[float] = []
    participants: list[int] = []
    down_bytes = up_bytes = 0
    outcomes: dict[str, int] = {}
    peak = PeakMemory()
    server = make_server(settings, torch.zeros(case.d), store_dir, case.clients)

    def timed(phase: str, fn: Any, *args: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args)
        phases[phase] += time.perf_counter() - t0
        return out

    for k in range(1, case.rounds + 1):
        wall0, cpu0 = time.perf_counter(), time.process_time()
        server.begin_round(k)
        timed("members", server.set_members, nodes)
        sampled, expected = timed(
            "sample",
            sample_clients,
            nodes,
            settings.participation,
            settings.participation_mode,
            rng,
        )
        t0 = time.perf_counter()
        for i in sampled:
            down_bytes += server.downlink_for(k, i).nbytes
        phases["downlink"] += time.perf_counter() - t0
        wall1, cpu1 = time.perf_counter(), time.process_time()
        replies = []  # not timed: what the clients would send (see the module docstring)
        for j, i in enumerate(sampled):
            payload, predicted = pool[j % len(pool)]
            digest = server.pending[i].expected_digest  # a client in step sends this digest
            replies.append((i, Uplink(k, "ok", payload, predicted, digest, 0.0, 1)))
            up_bytes += len(payload)
        wall2, cpu2 = time.perf_counter(), time.process_time()
        for i, uplink in replies:
            outcome = server.receive(k, i, uplink)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
        phases["receive"] += time.perf_counter() - wall2
        del replies
        timed("finish", server.finish_round, k, expected)
        wall3, cpu3 = time.perf_counter(), time.process_time()
        walls.append((wall1 - wall0) + (wall3 - wall2))
        cpus.append((cpu1 - cpu0) + (cpu3 - cpu2))
        participants.append(len(sampled))
    on_disk = bool(server.h_store is not None and server.h_store.on_disk)
    peak_bytes, extra_bytes = peak.peak_bytes(), peak.extra_bytes()
    server.close()
    disk, apparent = allocated_bytes(store_dir)
    warm_walls, warm_cpus = walls[1:] or walls, cpus[1:] or cpus
    round_s = sum(warm_walls) / len(warm_walls)
    mean_participants = sum(participants[1:] or participants) / len(participants[1:] or [1])
    total_phase = sum(phases.values()) or 1.0
    return {
        **asdict(case),
        "participants": mean_participants,
        "participants_total": sum(participants),
        "round_s": round_s,
        "round_s_cpu": sum(warm_cpus) / len(warm_cpus),
        "first_round_s": walls[0],
        "ns_per_coord": 1e9 * round_s / (mean_participants * case.d),
        "phase_share": {name: t / total_phase for name, t in phases.items()},
        "peak_rss_mb": peak_bytes / 2**20,
        "peak_extra_mb": extra_bytes / 2**20,
        "ram_vectors": extra_bytes / (4 * case.d),
        "memory_method": peak.method,
        "store_on_disk": on_disk,
        "disk_bytes": disk,
        "disk_apparent_bytes": apparent,
        "disk_vectors": disk / (4 * case.d),
        "uplink_bytes": up_bytes,
        "downlink_bytes": down_bytes,
        "outcomes": outcomes,
        "load_average_1min": os.getloadavg()[0],
    }


def worker(spec_path: Path, out_path: Path) -> int:
    """Run the cases of one d (and strategy) in this process: the pool once, then each case
    with its own store-dir, appending one JSON line per case to `out_path`."""
    spec = json.loads(spec_path.read_text())
    cases = [Case(**c) for c in spec["cases"]]
    work = Path(spec["work_dir"])
    pools: dict[tuple[int, str], list[tuple[bytes, int]]] = {}
    for case in cases:
        key = (case.d, case.strategy)
        if key not in pools:
            pools[key] = uplink_pool(*key)
        store = work / f"store-{case.clients}-{case.participation}-{case.d}-{case.pp_variant}"
        store.mkdir(parents=True, exist_ok=True)
        try:
            record = run_case(case, pools[key], store)
        finally:
            shutil.rmtree(store, ignore_errors=True)
        with out_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
    return 0


def run_cases(cases: Sequence[Case], work: Path, timeout_s: float, progress: Any) -> list[dict]:
    """The non-skipped cases, one worker process per (d, strategy); skipped ones as records."""
    records: list[dict[str, Any]] = []
    groups: dict[tuple[int, str], list[Case]] = {}
    for case in cases:
        if case.skipped_reason:
            records.append({**asdict(case), "skipped": True})
        else:
            groups.setdefault((case.d, case.strategy), []).append(case)
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for (d, strategy), group in groups.items():
        spec = work / f"cases-{d}-{strategy}.json"
        out = work / f"records-{d}-{strategy}.jsonl"
        spec.write_text(json.dumps({"cases": [asdict(c) for c in group], "work_dir": str(work)}))
        out.unlink(missing_ok=True)
        progress(f"d = {d:.0e}, {strategy}: {len(group)} cases in a worker process")
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.scale", "--worker", str(spec), str(out)],
            cwd=root,
            env=env,
        )
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        done = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
        records.extend({**r, "skipped": False} for r in done)
        for case in group[len(done) :]:
            reason = f"{WORKER_FAILED} (exit code {proc.returncode}; timeout {timeout_s:.0f} s)"
            records.append({**asdict(case), "rounds": 0, "skipped_reason": reason, "skipped": True})
    order = {_key(asdict(c)): j for j, c in enumerate(cases)}
    return sorted(records, key=lambda r: order[_key(r)])


def _key(record: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(record[f] for f in ("clients", "participation", "d", "pp_variant", "strategy"))


# ----------------------------------------------------------------------------- growth
def fit_exponent(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """The slope of log y against log x (least squares), None with < 2 distinct x."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x > 0 and y > 0]
    if len({x for x, _ in pts}) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sxx


def growth(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Fitted exponents per pp-variant: round_s_cpu (CPU time: on a shared machine wall time
    measures the queue for the cores) against the work |S_k|·d (1 when the cost is O(pN·d));
    at the smallest p, round_s_cpu against N for each d (0 when no per-round cost grows with
    the idle clients); peak extra RAM against d (1: O(d)) and against N (0)."""
    done = [r for r in records if not r.get("skipped")]
    out: dict[str, Any] = {}
    for variant in sorted({r["pp_variant"] for r in done}):
        rs = [r for r in done if r["pp_variant"] == variant]
        work = [(r["participants"] * r["d"], r["round_s_cpu"]) for r in rs]
        big = [(w, t) for w, t in work if w >= 10**7] or work
        fits: dict[str, Any] = {
            "round_s_cpu_vs_work": fit_exponent([w for w, _ in big], [t for _, t in big]),
        }
        p_min = min(r["participation"] for r in rs)
        for d in sorted({r["d"] for r in rs}):
            sub = [r for r in rs if r["d"] == d and r["participation"] == p_min]
            fits[f"round_s_cpu_vs_N_at_p{p_min:g}_d{d:.0e}"] = fit_exponent(
                [r["clients"] for r in sub], [r["round_s_cpu"] for r in sub]
            )
            fits[f"peak_extra_vs_N_at_p{p_min:g}_d{d:.0e}"] = fit_exponent(
                [r["clients"] for r in sub], [max(r["peak_extra_mb"], 1e-3) for r in sub]
            )
        n_min = min(r["clients"] for r in rs)
        sub = [r for r in rs if r["clients"] == n_min and r["participation"] == p_min]
        fits[f"peak_extra_vs_d_at_N{n_min}_p{p_min:g}"] = fit_exponent(
            [r["d"] for r in sub], [max(r["peak_extra_mb"], 1e-3) for r in sub]
        )
        out[variant] = fits
    return out


# ----------------------------------------------------------------------------- Flower
def flower_simulation(work: Path, config: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """One real Flower simulation (synthetic-lsq, artemis): round seconds and the server
    process's peak RSS, as `server.simulate` measures them."""
    from rich.console import Console

    from server.app_dir import check_overrides, read_app
    from server.simulate import run_simulations
    from server.simulation_run import RunSpec

    app = read_app(None)
    overrides = check_overrides(
        app.run_config,
        {
            "strategy": "artemis",
            "task": "synthetic-lsq",
            "num-server-rounds": config["rounds"],
            "num-partitions": config["clients"],
            "participation": config["participation"],
            "seed": 0,
            "device": "cpu",
        },
    )
    spec = RunSpec(
        label="flower", overrides=overrides, num_supernodes=config["clients"], timeout_s=timeout_s
    )
    t0 = time.perf_counter()
    (result,) = run_simulations(
        app,
        [spec],
        flwr_home=work / "flwr-home",
        console=Console(stderr=True),
        show_progress=False,
        database_url=f"sqlite:///{work / 'flower.db'}",
    )
    times = [r.seconds for r in result.rounds if r.seconds is not None]
    warm = times[1:] or times
    return {
        **config,
        "strategy": "artemis",
        "task": "synthetic-lsq",
        "status": result.status,
        "rounds_recorded": len(result.rounds),
        "round_s": sum(warm) / len(warm) if warm else None,
        "first_round_s": times[0] if times else None,
        "server_peak_rss_mb": result.server_peak_rss_mb,
        "wall_s": time.perf_counter() - t0,
        "load_average_1min": os.getloadavg()[0],
    }


# ----------------------------------------------------------------------------- output
def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(records: Sequence[dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for name in (
        "strategy", "N", "p", "d", "pp", "R", "|S_k|", "s/round", "cpu s", "ns/(|S_k|·d)",
        "peak RSS MB", "+RAM MB", "RAM/4d", "disk MB", "skipped",
    ):  # fmt: skip
        table.add_column(
            name, justify="right" if name not in ("strategy", "pp", "skipped") else "left"
        )
    for r in records:
        if r.get("skipped"):
            table.add_row(
                r["strategy"], str(r["clients"]), f"{r['participation']:g}", f"{r['d']:.0e}",
                r["pp_variant"],
                *["-"] * 9, r["skipped_reason"],
            )  # fmt: skip
            continue
        table.add_row(
            r["strategy"],
            str(r["clients"]),
            f"{r['participation']:g}",
            f"{r['d']:.0e}",
            r["pp_variant"],
            str(r["rounds"]),
            f"{r['participants']:.1f}",
            _fmt(r["round_s"], ".4f"),
            _fmt(r["round_s_cpu"], ".4f"),
            _fmt(r["ns_per_coord"], ".1f"),
            _fmt(r["peak_rss_mb"], ".0f"),
            _fmt(r["peak_extra_mb"], ".1f"),
            _fmt(r["ram_vectors"], ".1f"),
            _fmt(r["disk_bytes"] / 1e6, ".1f"),
            "",
        )
    Console(width=max(150, shutil.get_terminal_size().columns)).print(table)


def select_grid(base: dict[str, tuple[Any, ...]], args: argparse.Namespace) -> dict[str, Any]:
    """`base` with the axes given on the command line (--clients, --participation, --d,
    --pp-variant) replaced; ValueError naming the bad value otherwise."""
    grid = dict(base)
    for axis in ("clients", "participation", "d", "pp_variant"):
        text = getattr(args, axis)
        if text is None:
            continue
        flag = "--" + axis.replace("_", "-")
        values: list[Any] = []
        for item in filter(None, (v.strip() for v in text.split(","))):
            if axis == "pp_variant":
                if item not in FULL_GRID["pp_variant"]:
                    raise ValueError(f"{flag}: {item!r} is not one of pp1, pp2")
                values.append(item)
                continue
            try:
                number = float(item)
            except ValueError:
                raise ValueError(f"{flag}: {item!r} is not a number") from None
            if axis == "participation":
                if not 0 < number <= 1:
                    raise ValueError(f"{flag}: {item} is not in (0, 1]")
                values.append(number)
            elif number < 1 or not number.is_integer():  # inf and nan too
                raise ValueError(f"{flag}: {item} is not a positive integer")
            else:
                values.append(int(number))
        if not values:
            raise ValueError(f"{flag}: no values given")
        grid[axis] = tuple(values)
    return grid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.scale",
        description="The server half's cost per round, RAM and disk as the number of clients "
        "N, the participation p and the model size d grow; plus one Flower simulation.",
    )
    parser.add_argument("--quick", action="store_true", help="a small grid, no Flower run")
    parser.add_argument("--json", type=Path, help="write the records and the fits here")
    parser.add_argument(
        "--strategies", default="artemis", help="comma-separated presets (default artemis)"
    )
    parser.add_argument("--no-flower", action="store_true", help="skip the Flower simulation")
    parser.add_argument(
        "--work-dir", type=Path, help="where the stores go (default: a temporary directory)"
    )
    parser.add_argument(
        "--timeout", type=float, default=1500.0, help="seconds per worker process (per d)"
    )
    for axis, kind in (("clients", "N"), ("participation", "p"), ("d", "d"), ("pp-variant", "")):
        parser.add_argument(
            f"--{axis}",
            metavar="LIST",
            help=f"comma-separated values of the grid's {axis}"
            + (f" ({kind})" if kind else "")
            + " instead of the full (or quick) grid's",
        )
    parser.add_argument("--worker", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(*args.worker)

    from rich.console import Console

    from strategies.registry import PRESETS

    console = Console(stderr=True)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in strategies if s not in PRESETS]
    if not strategies or unknown:
        console.print(f"[red]error:[/] unknown strategies {unknown}: use {', '.join(PRESETS)}")
        return 2
    if args.timeout <= 0:
        console.print("[red]error:[/] --timeout must be > 0")
        return 2
    base = QUICK_GRID if args.quick else FULL_GRID
    try:
        grid = select_grid(base, args)
    except ValueError as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2
    import psutil

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="fedsqueeze-bench-scale-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    cases = plan(
        grid,
        QUICK_EXTRA if args.quick and grid == base else (),  # not when the grid was narrowed
        strategies,
        QUICK_WORK_PER_CASE if args.quick else WORK_PER_CASE,
        int(psutil.virtual_memory().available),
        shutil.disk_usage(work).free,
    )
    load = os.getloadavg()
    console.print(
        f"Scale benchmark: {len(cases)} cases ({sum(bool(c.skipped_reason) for c in cases)} "
        f"skipped), load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}, work dir {work}"
    )
    t0 = time.perf_counter()
    try:
        records = run_cases(cases, work, args.timeout, console.print)
        flower = None
        if not args.quick and not args.no_flower:
            console.print(f"Flower simulation: {FLOWER_RUN}")
            flower = flower_simulation(work, FLOWER_RUN, args.timeout)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    fits = growth(records)
    print_table(
        records,
        f"Server half per round ({', '.join(strategies)}); load average {load[0]:.1f} at the "
        f"start, {os.getloadavg()[0]:.1f} at the end; {time.perf_counter() - t0:.0f} s",
    )
    console.print("fitted exponents:", json.dumps(fits, indent=1))
    if flower is not None:
        console.print("Flower simulation:", json.dumps(flower, indent=1))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        result = {"records": records, "fits": fits, "flower": flower, "quick": args.quick}
        args.json.write_text(json.dumps(result, indent=2), encoding="utf-8")
        console.print(f"wrote {args.json}")
    failed = [r for r in records if r["skipped_reason"].startswith(WORKER_FAILED)]
    return 1 if failed or (flower is not None and flower["status"] != "finished:completed") else 0


if __name__ == "__main__":
    sys.exit(main())
