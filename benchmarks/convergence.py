"""Convergence benchmark: bytes, rounds and seconds each strategy needs to reach FedAvg's accuracy.

Workload (issue 10): Fashion-MNIST with the small CNN of tasks/fashion_mnist.py, N = 20
clients with Dirichlet(0.5) label skew, participation p = 1 and p = 0.5, K = 10 local SGD
steps (batch 32, η = 0.05) per round; every strategy of the registry
(``strategies.registry.ALGORITHMS``: our eleven presets and ``flwr-fedavg``, Flower's own
FedAvg with float32 arrays, the baseline), each with several seeds (default 3). The seed
sets the Dirichlet split, the model's initial weights, S_k (by partition, see
``strategies.partitions``) and the compressors' draws: the same seed gives the same curves.

Measured per strategy × p, from what the ServerApp recorded each round:

* FedAvg's plateau accuracy (same p): the mean, over the last ``PLATEAU_WINDOW`` rounds, of
  flwr-fedavg's accuracy curve averaged over the seeds; the target is 99 % of it;
* for each strategy, on its seed-averaged accuracy curve: the first round at which it reaches
  the target (rounds_to_target), the measured bytes (uplink + downlink, catch-up traffic
  included, averaged over seeds) summed up to that round (bytes_to_target), the wall time
  from the start of round 1 to the end of that round (wall_s_to_target), and
  bytes_ratio_vs_fedavg = bytes_to_target / FedAvg's own bytes_to_target; "not reached"
  (null) when the curve never gets there;
* final_accuracy (mean over seeds of the last round's accuracy) and its standard deviation
  over seeds, the per-seed rounds to target, and the store run ids of every run.

Server optimisers (issue 13): ``--server-opts sgd,adam,amsgrad`` runs every strategy once
per server optimiser (run-config ``server-opt``; default sgd alone, the runs above), with
the step size γ of ``--server-lr`` per optimiser, strategy or strategy:optimiser (else
``server-lr`` = client-lr); several γ separated by "/" make a sweep. Combinations the project
refuses are skipped and listed (flwr-fedavg takes no server optimiser; adam, amsgrad and
yogi mean nothing on signsgd-mv's and signum-mv's 1-bit broadcast). Each record is one
strategy × server optimiser × γ × p, all measured against the same FedAvg target; the
optimiser and γ are in the stored run's config and name.

Every run is a real run of the project's ServerApp body (``server.app.run_server``) and
ClientApp in Flower's simulation engine (Ray backend), recorded in the round-history store
(``--database-url``, else ``$DATABASE_URL``, else the default store) like any other run, so
the REST service and dashboard list them.

Budget (measured on this 2-core machine, before choosing the constants below)
------------------------------------------------------------------------------
* Starting a Flower simulation costs 20-28 s (the SuperLink's flwr-simulation process, Ray,
  the client actors importing torch, the data): ``benchmarks.rounds`` pays it per run. With
  12 strategies × 2 participations × 3 seeds = 72 runs that alone would be 24-34 min, so
  this benchmark hosts all its runs in ONE in-process Flower simulation (``flwr.simulation.
  run_simulation``, as tests/test_simulation.py does), one store run after the other on the
  same simulated SuperNodes (client state is kept per run session). Sampling by partition
  makes that sound: the node ids do not matter. Before the first run every client is
  started (a partition query), so no run's seconds include the engine's start.
* One round (20 clients × K = 10 steps, p = 1) took 0.7-1.5 s of training and messaging
  at low load, plus 0.5-2.7 s of central evaluation on the full 10k test set. Evaluation
  therefore runs every round on a fixed subset, the first ``test_examples`` = 2000 test
  images (accuracy in steps of 0.0005; the same images for every run).
* With that subset, a p = 1 round cost 2-2.7 CPU-seconds summed over the benchmark's
  processes (server, Ray, the two client actors; rand-mcm, the dearest), i.e. about 1-1.4 s
  of wall time on two idle cores; a p = 0.5 round about 60 % of it. 72 runs × 30 rounds ×
  ~1 s ≈ 35 min: ``rounds`` = 30. (Measured while the machine ran at load 13-15, where a
  10-round run took 43-91 s: the full benchmark then takes about four times longer.)
* 30 rounds are not enough for every method to settle ("hundreds of rounds" would take
  hours here: at 30 rounds FedAvg is still gaining about a point per few rounds), so the
  JSON carries a plateau check for FedAvg: ``fedavg_plateau_gain`` = its mean accuracy over
  the last ``PLATEAU_WINDOW`` rounds minus that over the window before; a gain under
  ``PLATEAU_TOLERANCE`` counts as a plateau (``fedavg_plateaued``). When it is False the
  target is 99 % of FedAvg's accuracy at the end of the budget, not of a true plateau, and
  the table says so. A strategy slower than FedAvg per round then needs to reach the target
  within these 30 rounds to count as "reached", which is stricter than at a real plateau.
* FedAvg is ``flwr-fedavg``: Flower's own FedAvg, unchanged, so it samples a fixed fraction
  of round(pN) nodes with Flower's (unseeded) sampler and weights clients by examples; its
  p = 0.5 curves are therefore not reproducible run to run, unlike every preset's.

    python -m benchmarks.convergence                    # the full workload (~35 min unloaded)
    python -m benchmarks.convergence --quick            # a few rounds, 1 seed (CI, < 2 min)
    python -m benchmarks.convergence --json out.json --seeds 3 --database-url sqlite:///c.db
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

BASELINE = "flwr-fedavg"
#: the issue's target: these reach FedAvg's target with ≤ 1/16 of its bytes (rand-mcm is
#: MCM's variant for partial participation)
TARGET_BYTES_RATIO = 1 / 16
TARGET_STRATEGIES: dict[float, tuple[str, ...]] = {
    1.0: ("artemis", "mcm"),
    0.5: ("artemis", "rand-mcm"),
}
#: the target accuracy is this fraction of FedAvg's plateau accuracy
TARGET_FRACTION = 0.99
#: rounds averaged for the plateau accuracy, and compared with the window before it
PLATEAU_WINDOW = 10
#: FedAvg counts as settled when the last window gains less than this over the one before
PLATEAU_TOLERANCE = 0.005
QUICK_STRATEGIES = (BASELINE, "artemis", "rand-mcm")


@dataclass(frozen=True)
class Workload:
    clients: int = 20
    participations: tuple[float, ...] = (1.0, 0.5)
    #: rounds per run: chosen from the measured cost of a round so that 12 strategies × 2
    #: participations × 3 seeds fit in about 35 min unloaded (see the module docstring)
    rounds: int = 30
    local_steps: int = 10
    batch_size: int = 32
    client_lr: float = 0.05
    #: central evaluation every round on the first 2000 test images (the full 10k set
    #: cost 0.5-2.7 s per round, as much as the round itself)
    test_examples: int = 2000
    dirichlet_alpha: float = 0.5
    seeds: int = 3


FULL = Workload()
QUICK = Workload(clients=6, rounds=3, local_steps=2, test_examples=500, seeds=1)


# ----------------------------------------------------------------------------- one run
@dataclass
class RunCurve:
    """What one stored run did, round by round (from its RoundRecords)."""

    strategy: str
    participation: float
    seed: int
    status: str
    run_id: int | None
    accuracy: list[float | None] = field(default_factory=list)
    bytes: list[int] = field(default_factory=list)  # uplink + downlink of each round
    uplink: list[int] = field(default_factory=list)
    downlink: list[int] = field(default_factory=list)
    #: seconds from the start of round 1 to the end of each round
    elapsed: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    error: str = ""
    #: the server optimiser (run-config ``server-opt``) and its step size γ (``server-lr``,
    #: resolved: client-lr when not set; None for flwr-fedavg, which has no such step)
    server_opt: str = "sgd"
    server_lr: float | None = None

    @property
    def final_accuracy(self) -> float | None:
        return next((a for a in reversed(self.accuracy) if a is not None), None)


def curve_from_records(
    strategy: str, participation: float, seed: int, status: str, run_id: int | None,
    records: Sequence[Any], wall_s: float,
) -> RunCurve:  # fmt: skip
    curve = RunCurve(strategy, participation, seed, status, run_id, wall_s=wall_s)
    start = records[0].started_at if records else None
    for r in records:
        curve.accuracy.append(r.eval_accuracy)
        curve.uplink.append(int(r.uplink_bytes))
        curve.downlink.append(int(r.downlink_bytes))
        curve.bytes.append(int(r.uplink_bytes) + int(r.downlink_bytes))
        curve.elapsed.append((r.ended_at - start).total_seconds() if start is not None else 0.0)
    return curve


# ----------------------------------------------------------------------------- summary
def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _mean_curve(curves: Sequence[RunCurve], attr: str) -> list[float]:
    """Round-by-round mean over seeds, as long as every seed has the round."""
    series = [getattr(c, attr) for c in curves]
    n = min(len(s) for s in series)
    out = []
    for i in range(n):
        values = [s[i] for s in series]
        if any(v is None for v in values):
            break
        out.append(_mean(values))
    return out


def first_reaching(accuracy: Sequence[float], target: float) -> int | None:
    """Index of the first round whose accuracy is ≥ target (None: never)."""
    return next((i for i, a in enumerate(accuracy) if a >= target), None)


def plateau(accuracy: Sequence[float], window: int = PLATEAU_WINDOW) -> tuple[float, float | None]:
    """(mean of the last `window` rounds, its gain over the window before; None if short)."""
    window = max(1, min(window, len(accuracy) // 2 or 1))
    last = _mean(accuracy[-window:])
    before = accuracy[-2 * window : -window]
    return last, (last - _mean(before)) if len(before) == window else None


def summarize(
    curves: Sequence[RunCurve], tolerance: float = PLATEAU_TOLERANCE
) -> list[dict[str, Any]]:
    """One record per strategy × server optimiser × γ × participation; ratios against
    flwr-fedavg at the same p (the same target for every optimiser)."""
    groups: dict[tuple[float, str, str, float | None], list[RunCurve]] = {}
    for c in curves:
        groups.setdefault((c.participation, c.strategy, c.server_opt, c.server_lr), []).append(c)
    records: list[dict[str, Any]] = []
    for p in sorted({c.participation for c in curves}, reverse=True):
        base = [
            c
            for (gp, strategy, _, _), group in groups.items()
            if gp == p and strategy == BASELINE
            for c in group
            if c.status == "finished"
        ]
        base_acc = _mean_curve(base, "accuracy") if base else []
        target: float | None = None
        plateau_acc: float | None = None
        gain: float | None = None
        base_bytes: float | None = None
        if base_acc:
            plateau_acc, gain = plateau(base_acc)
            target = TARGET_FRACTION * plateau_acc
            i = first_reaching(base_acc, target)
            if i is not None:
                base_bytes = sum(_mean_curve(base, "bytes")[: i + 1])
        for (gp, strategy, opt, lr), group in groups.items():
            if gp != p:
                continue
            record = _record(strategy, p, group, target, plateau_acc, gain, base_bytes, tolerance)
            records.append({"strategy": strategy, "server_opt": opt, "server_lr": lr, **record})
    return records


def _record(
    strategy: str, p: float, group: list[RunCurve], target: float | None,
    plateau_acc: float | None, gain: float | None, base_bytes: float | None, tolerance: float,
) -> dict[str, Any]:  # fmt: skip
    done = [c for c in group if c.status == "finished" and c.accuracy]
    finals = [c.final_accuracy for c in done if c.final_accuracy is not None]
    record: dict[str, Any] = {
        "strategy": strategy,
        "participation": p,
        "seed_count": len(done),
        "seeds": sorted(c.seed for c in done),
        "failed_seeds": sorted(c.seed for c in group if c not in done),
        "rounds": max((len(c.accuracy) for c in done), default=0),
        "fedavg_plateau_accuracy": plateau_acc,
        "fedavg_plateau_gain": gain,
        "fedavg_plateaued": None if gain is None else gain < tolerance,
        "target_accuracy": target,
        "reached": False,
        "rounds_to_target": None,
        "bytes_to_target": None,
        "uplink_bytes_to_target": None,
        "downlink_bytes_to_target": None,
        "wall_s_to_target": None,
        "bytes_ratio_vs_fedavg": None,
        "rounds_to_target_per_seed": [],
        "final_accuracy": _mean(finals) if finals else None,
        "final_accuracy_std": statistics.stdev(finals)
        if len(finals) > 1
        else 0.0
        if finals
        else None,
        "total_bytes": _mean([sum(c.bytes) for c in done]) if done else None,
        "wall_s": _mean([c.wall_s for c in done]) if done else None,
        "run_ids": [c.run_id for c in group],
    }
    if not done or target is None:
        return record
    accuracy = _mean_curve(done, "accuracy")
    record["rounds_to_target_per_seed"] = [
        None if (j := first_reaching([a or 0.0 for a in c.accuracy], target)) is None else j + 1
        for c in done
    ]
    i = first_reaching(accuracy, target)
    if i is None:
        return record
    record.update(
        reached=True,
        rounds_to_target=i + 1,
        bytes_to_target=sum(_mean_curve(done, "bytes")[: i + 1]),
        uplink_bytes_to_target=sum(_mean_curve(done, "uplink")[: i + 1]),
        downlink_bytes_to_target=sum(_mean_curve(done, "downlink")[: i + 1]),
        wall_s_to_target=_mean_curve(done, "elapsed")[i],
    )
    if base_bytes:
        record["bytes_ratio_vs_fedavg"] = record["bytes_to_target"] / base_bytes
    goal = TARGET_STRATEGIES.get(p, ())
    if strategy in goal:
        ratio = record["bytes_ratio_vs_fedavg"]
        record["target_met"] = ratio is not None and ratio <= TARGET_BYTES_RATIO
    return record


# ----------------------------------------------------------------------------- output
def figure_runs(records: Sequence[dict[str, Any]]) -> dict[str, list[int]]:
    """The stored runs the bytes-to-accuracy figure draws, per participation ("p=1",
    "p=0.5"): the first seed's run of every strategy. The one place where the figure is
    made from the store (``server.plot``) takes its run ids from here."""
    out: dict[str, list[int]] = {}
    for r in records:
        ids = [i for i in r["run_ids"] if i is not None]
        if ids:
            out.setdefault(f"p={r['participation']:g}", []).append(ids[0])
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "not reached"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def run_label(strategy: str, server_opt: str, server_lr: float | None, with_opt: bool) -> str:
    """The strategy, with its server optimiser and γ when the benchmark varies them."""
    if not with_opt or strategy == BASELINE:
        return strategy
    return f"{strategy} {server_opt}" + ("" if server_lr is None else f" γ={server_lr:g}")


def varies_server_opt(records: Sequence[dict[str, Any]], client_lr: float) -> bool:
    """True when some record uses another server optimiser than sgd or a γ other than the
    default (client-lr): the table then shows both (with sgd alone it is today's table)."""
    return any(
        r.get("server_opt", "sgd") != "sgd" or r.get("server_lr") not in (None, client_lr)
        for r in records
    )


def print_table(records: list[dict[str, Any]], console: Any, client_lr: float = 0.05) -> None:
    from rich.table import Table

    with_opt = varies_server_opt(records, client_lr)
    for p in sorted({r["participation"] for r in records}, reverse=True):
        rows = [r for r in records if r["participation"] == p]
        base = next((r for r in rows if r["strategy"] == BASELINE), None)
        settled = (
            ""
            if base is None
            else ("" if base["fedavg_plateaued"] else " (FedAvg still rising: not a plateau)")
        )
        title = (
            f"p = {p:g}: target {_fmt(rows[0]['target_accuracy'], '.4f')} = "
            f"{TARGET_FRACTION:.0%} of FedAvg's last-{PLATEAU_WINDOW}-round accuracy{settled}"
        )
        table = Table(title=title)
        columns = ["strategy", *(["server-opt", "γ"] if with_opt else [])]
        for name in (*columns, "seeds", "rounds→target", "bytes→target", "× FedAvg",
                     "s→target", "final acc", "± std", "target ≤ 1/16"):  # fmt: skip
            table.add_column(name, justify="left" if name in columns else "right")
        for r in rows:
            met = r.get("target_met")
            opt_cells = (
                [
                    "-" if r["strategy"] == BASELINE else r.get("server_opt", "sgd"),
                    _fmt(r.get("server_lr"), "g"),
                ]
                if with_opt
                else []
            )
            table.add_row(
                r["strategy"],
                *opt_cells,
                str(r["seed_count"]),
                "not reached" if r["rounds_to_target"] is None else str(r["rounds_to_target"]),
                _fmt_bytes(r["bytes_to_target"]),
                _fmt(r["bytes_ratio_vs_fedavg"], ".4f"),
                _fmt(r["wall_s_to_target"], ".1f"),
                _fmt(r["final_accuracy"], ".4f"),
                _fmt(r["final_accuracy_std"], ".4f"),
                "" if met is None else ("[green]met[/]" if met else "[red]missed[/]"),
            )
        console.print(table)


# ----------------------------------------------------------------------------- the runs
@dataclass(frozen=True)
class Plan:
    strategy: str
    participation: float
    seed: int
    #: run-config ``server-opt``, and ``server-lr`` when set (None: the default, client-lr)
    server_opt: str = "sgd"
    server_lr: float | None = None

    def gamma(self, workload: Workload) -> float | None:
        """The server step size γ the run takes (None for flwr-fedavg, which has none)."""
        if self.strategy == BASELINE:
            return None
        return workload.client_lr if self.server_lr is None else self.server_lr


def refusal(strategy: str, server_opt: str) -> str | None:
    """Why the project refuses this strategy × server optimiser (None: it runs): flwr-fedavg
    takes no server optimiser, and adam/amsgrad/yogi mean nothing on a 1-bit sign broadcast
    (signsgd-mv, signum-mv); the reason is the run config's own check."""
    from strategies.registry import settings_from_config

    if server_opt == "sgd":
        return None
    if strategy == BASELINE:
        return "flwr-fedavg is Flower's own FedAvg and takes no server optimiser"
    try:  # the same check the ServerApp makes before a run starts (the size d is irrelevant)
        settings_from_config({"strategy": strategy, "server-opt": server_opt}, dim=1000)
    except ValueError as exc:
        return str(exc)
    return None


def server_lrs_for(
    strategy: str, server_opt: str, server_lrs: Mapping[str, Sequence[float]]
) -> Sequence[float | None]:
    """The γ values to run for strategy × optimiser: ``--server-lr`` keyed by
    "strategy:optimiser", else by the strategy, else by the optimiser; else the default
    (None). Several values are a sweep: one run each."""
    if strategy == BASELINE:
        return [None]
    for key in (f"{strategy}:{server_opt}", strategy, server_opt):
        if key in server_lrs:
            return list(server_lrs[key])
    return [None]


def plan_runs(
    strategies: Sequence[str],
    workload: Workload,
    first_seed: int,
    server_opts: Sequence[str] = ("sgd",),
    server_lrs: Mapping[str, Sequence[float]] | None = None,
) -> list[Plan]:
    """Seeds outermost; within a seed, FedAvg and the strategies with a target (artemis,
    mcm, rand-mcm) at every p first, then the others; each strategy with every server
    optimiser (and γ of ``server_lrs``) in turn, refused combinations left out (`refusal`).
    FedAvg runs once (sgd). The JSON is rewritten after every run, so a benchmark stopped
    early still answers the issue's question first."""
    order = [BASELINE, *[s for s in dict.fromkeys(strategies) if s != BASELINE]]
    targeted = {s for goal in TARGET_STRATEGIES.values() for s in goal}
    first = [s for s in order if s == BASELINE or s in targeted]
    rest = [s for s in order if s not in first]
    opts = list(dict.fromkeys(server_opts))
    return [
        Plan(s, p, first_seed + i, opt, lr)
        for i in range(workload.seeds)
        for block in (first, rest)
        for p in workload.participations
        for s in block
        for opt in (["sgd"] if s == BASELINE else opts)
        if refusal(s, opt) is None
        for lr in server_lrs_for(s, opt, server_lrs or {})
    ]


def refused_runs(strategies: Sequence[str], server_opts: Sequence[str]) -> list[dict[str, str]]:
    """The strategy × optimiser combinations `plan_runs` leaves out, with the reason."""
    return [
        {"strategy": s, "server_opt": opt, "reason": reason}
        for s in dict.fromkeys(strategies)
        if s != BASELINE
        for opt in dict.fromkeys(server_opts)
        if (reason := refusal(s, opt)) is not None
    ]


def run_overrides(plan: Plan, workload: Workload, data_dir: str) -> dict[str, Any]:
    # server-opt and server-lr only when set: the default runs' configs stay as they were
    opt: dict[str, Any] = {} if plan.server_opt == "sgd" else {"server-opt": plan.server_opt}
    name = f"convergence {plan.strategy} p={plan.participation:g} seed={plan.seed}"
    if plan.server_opt != "sgd":
        name += f" server-opt={plan.server_opt}"
    if plan.server_lr is not None:
        opt["server-lr"] = plan.server_lr
        name += f" server-lr={plan.server_lr:g}"
    return {
        "strategy": plan.strategy,
        "task": "fashion-mnist",
        "task-options": f"test_examples={workload.test_examples}" if workload.test_examples else "",
        "data-dir": data_dir,
        "num-server-rounds": workload.rounds,
        "num-partitions": workload.clients,
        "dirichlet-alpha": workload.dirichlet_alpha,
        "participation": plan.participation,
        "local-steps": workload.local_steps,
        "batch-size": workload.batch_size,
        "client-lr": workload.client_lr,
        **opt,
        "seed": plan.seed,
        "device": "cpu",
        "eval-every": 1,
        "checkpoint-dir": "off",  # nothing here resumes; a checkpoint per round costs time
        "run-name": name,
    }


def run_all(
    plans: Sequence[Plan],
    workload: Workload,
    data_dir: str,
    database_url: str,
    on_run: Callable[[RunCurve, int], None],
    round_timeout: float,
) -> list[RunCurve]:
    """Every plan as one store run of the real ServerApp body, in one Flower simulation."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from client.app import app as client_app
    from server.app import RunOutcome, open_recorder, run_server
    from strategies.flower import wait_for_nodes
    from strategies.partitions import PartitionMap

    curves: list[RunCurve] = []
    server_app = ServerApp()
    # Ctrl-C reaches this thread, not the ServerApp's: it tells the ServerApp to stop
    # after its current run (run_server records that run to its end)
    stop = threading.Event()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        recorder = open_recorder(database_url)
        # warm-up: start every simulated client (Ray actors importing torch, ~20 s here) by
        # asking each its partition, so the first run's seconds are not the engine's start
        nodes = wait_for_nodes(grid, workload.clients, round_timeout)
        PartitionMap().discover(grid, nodes, round_timeout, 0.1)
        for i, plan in enumerate(plans, 1):
            if stop.is_set():
                break
            overrides = {**run_overrides(plan, workload, data_dir), "round-timeout": round_timeout}
            outcome = RunOutcome()
            started = time.perf_counter()
            error = ""
            try:
                run_server(grid, context, overrides, outcome, recorder=recorder)
            except Exception as exc:  # one failed run must not end the benchmark
                error = f"{type(exc).__name__}: {exc}"
            curve = curve_from_records(
                plan.strategy,
                plan.participation,
                plan.seed,
                outcome.status if not error else "failed",
                outcome.run_id,
                outcome.records,
                time.perf_counter() - started,
            )
            curve.error = error
            curve.server_opt = plan.server_opt
            curve.server_lr = plan.gamma(workload)
            curves.append(curve)
            on_run(curve, i)

    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=workload.clients,
            backend_config={
                "client_resources": {"num_cpus": 1},
                "init_args": {"num_cpus": 2, "include_dashboard": False},
            },
        )
    except KeyboardInterrupt:
        stop.set()
        raise
    return curves


def parse_server_lrs(
    items: Sequence[str], strategies: Sequence[str], server_opts: Sequence[str]
) -> dict[str, list[float]]:
    """``--server-lr`` values ("KEY=GAMMA[/GAMMA...]") → {key: [γ, ...]}; ValueError naming
    the bad item (an unknown key, a γ that is not a number > 0)."""
    from strategies.registry import ALGORITHMS

    out: dict[str, list[float]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        strategy, _, opt = key.partition(":")
        ok = (
            (key in server_opts or key in ALGORITHMS)
            if not opt
            else (strategy in ALGORITHMS and opt in server_opts)
        )
        if not sep or not ok or strategy == BASELINE:
            raise ValueError(
                f"--server-lr {item!r}: want KEY=GAMMA[/GAMMA...], KEY an optimiser "
                f"({', '.join(server_opts)}), a strategy other than {BASELINE}, or "
                "strategy:optimiser"
            )
        try:
            gammas = [float(v) for v in values.split("/")]
        except ValueError:
            raise ValueError(f"--server-lr {item!r}: GAMMA must be a number") from None
        if not all(math.isfinite(g) and g > 0 for g in gammas):
            raise ValueError(f"--server-lr {item!r}: GAMMA must be > 0")
        out[key] = list(dict.fromkeys(gammas))
    return out


def _positive(kind: type, name: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be > 0, got {text!r}")
        return value

    return parse


def main(argv: list[str] | None = None) -> int:
    from core.runconfig import SERVER_OPTS
    from strategies.registry import ALGORITHMS

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.convergence",
        description="Bytes, rounds and seconds each strategy needs to reach 99%% of FedAvg's "
        "plateau accuracy on Fashion-MNIST (20 clients, Dirichlet 0.5, p = 1 and 0.5).",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a few rounds, 1 seed, 6 clients, 3 strategies (CI smoke test)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        help="write one record per strategy × p here "
        "(rewritten after every run, so a stopped benchmark leaves its results)",
    )
    parser.add_argument(
        "--seeds",
        type=_positive(int, "--seeds"),
        help=f"seeds per strategy × p (default {FULL.seeds}; quick {QUICK.seeds})",
    )
    parser.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed, +1, ...")
    parser.add_argument(
        "--rounds",
        type=_positive(int, "--rounds"),
        help=f"rounds per run (default {FULL.rounds}; quick {QUICK.rounds})",
    )
    parser.add_argument(
        "--strategies",
        help="comma-separated (default: every strategy of the "
        f"registry; quick: {','.join(QUICK_STRATEGIES)}); {BASELINE} always runs",
    )
    parser.add_argument("--participations", help="comma-separated p values (default 1,0.5)")
    parser.add_argument(
        "--server-opts",
        default="sgd",
        help="comma-separated server optimisers, each strategy runs once with each "
        f"({', '.join(SERVER_OPTS)}; default sgd); combinations the project refuses "
        f"(any but sgd on {BASELINE}, adam/amsgrad/yogi on signsgd-mv and signum-mv) are "
        "skipped and listed",
    )
    parser.add_argument(
        "--server-lr",
        action="append",
        default=[],
        metavar="KEY=GAMMA[/GAMMA...]",
        help="server step size γ (run-config server-lr) per optimiser, strategy or "
        "strategy:optimiser (the most specific key wins), e.g. adam=0.003 signsgd-mv=0.001 "
        "artemis:amsgrad=0.01; several values separated by / are a sweep (one run each); "
        "repeatable; default: client-lr",
    )
    parser.add_argument(
        "--database-url",
        default=None,
        help="the round-history store the runs are recorded in (default: "
        "$DATABASE_URL, else the default store)",
    )
    parser.add_argument(
        "--figure",
        type=Path,
        help="write the bytes-to-accuracy figures here, one per p (convergence-p1.svg, "
        "convergence-p0.5.svg; `fedsqueeze plot` on the stored runs of figure_runs)",
    )
    parser.add_argument("--data-dir", default="", help="Fashion-MNIST IDX directory")
    parser.add_argument("--round-timeout", type=_positive(float, "--round-timeout"), default=600.0)
    parser.add_argument("--verbose", action="store_true", help="keep Flower's per-round log")
    args = parser.parse_args(argv)

    from rich.console import Console

    from tasks.fashion_mnist import FashionMnistDataMissing, check_data_dir

    console = Console(stderr=True, width=max(120, shutil.get_terminal_size().columns))
    workload = QUICK if args.quick else FULL
    if args.seeds is not None:
        workload = replace(workload, seeds=args.seeds)
    if args.rounds is not None:
        workload = replace(workload, rounds=args.rounds)
    if args.participations:
        try:
            ps = tuple(float(x) for x in args.participations.split(",") if x.strip())
        except ValueError:
            parser.error(f"--participations must be numbers, got {args.participations!r}")
        if not ps or not all(0 < p <= 1 for p in ps):
            parser.error(f"--participations must be in (0, 1], got {args.participations!r}")
        workload = replace(workload, participations=ps)
    if args.strategies:
        strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
        unknown = [s for s in strategies if s not in ALGORITHMS]
        if unknown:
            parser.error(f"unknown strategy {unknown[0]!r}: use some of {', '.join(ALGORITHMS)}")
    else:
        strategies = list(QUICK_STRATEGIES if args.quick else ALGORITHMS)
    if workload.rounds < 2:
        parser.error("--rounds must be >= 2")
    server_opts = [o.strip() for o in args.server_opts.split(",") if o.strip()]
    if not server_opts or any(o not in SERVER_OPTS for o in server_opts):
        parser.error(
            f"--server-opts must be some of {', '.join(SERVER_OPTS)}, got {args.server_opts!r}"
        )
    try:
        server_lrs = parse_server_lrs(args.server_lr, strategies, SERVER_OPTS)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        check_data_dir(args.data_dir or None)
    except FashionMnistDataMissing as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2
    database_url = (
        args.database_url if args.database_url is not None else os.environ.get("DATABASE_URL", "")
    )
    if not args.verbose:
        import logging

        # the ServerApp runs in this process: its per-round INFO lines would bury the
        # progress lines (Flower's own logger is reset by run_simulation; ours is not)
        logging.getLogger("flwr.fedsqueeze").setLevel(logging.WARNING)

    plans = plan_runs(strategies, workload, args.first_seed, server_opts, server_lrs)
    refused = refused_runs(strategies, server_opts)
    with_opt = server_opts != ["sgd"] or bool(server_lrs)
    for skip in refused:
        console.print(
            f"[yellow]skipped:[/] {skip['strategy']} with server-opt={skip['server_opt']}: "
            f"refused ({skip['reason']})",
            highlight=False,
        )
    console.print(
        f"Convergence benchmark: {workload.clients} clients, p in "
        f"{', '.join(f'{p:g}' for p in workload.participations)}, {workload.rounds} rounds of "
        f"K={workload.local_steps} local steps, {workload.seeds} seed(s), {len(plans)} runs "
        f"in one Flower simulation; store: {database_url or 'the default store'}"
    )
    t0 = time.perf_counter()
    results: list[RunCurve] = []

    def on_run(curve: RunCurve, i: int) -> None:
        results.append(curve)
        status = "" if curve.status == "finished" else f" [red]{curve.status}[/] {curve.error}"
        console.print(
            f"[{i}/{len(plans)}] "
            f"{run_label(curve.strategy, curve.server_opt, curve.server_lr, with_opt):<13} "
            f"p={curve.participation:<4g} "
            f"seed={curve.seed} rounds={len(curve.accuracy)} "
            f"final acc={_fmt(curve.final_accuracy, '.4f')} run {curve.wall_s:.1f} s, "
            f"elapsed {time.perf_counter() - t0:.0f} s{status}",
            highlight=False,
        )
        if args.json is not None:
            write_json(
                args.json, summarize(results), workload, database_url, done=False, refused=refused
            )

    # the ServerApp runs in this process: the store URL reaches it as an argument, and the
    # FLWR_HOME of the simulation is a throw-away directory
    home = Path(tempfile.mkdtemp(prefix="fedsqueeze-bench-convergence-"))
    old_home = os.environ.get("FLWR_HOME")
    os.environ["FLWR_HOME"] = str(home)
    try:
        run_all(plans, workload, args.data_dir, database_url, on_run, args.round_timeout)
    except KeyboardInterrupt:
        console.print(
            f"[yellow]interrupted[/] after {len(results)} of {len(plans)} runs; the run under "
            "way is finished and recorded, then the process ends"
        )
        return 130
    finally:
        if old_home is None:
            os.environ.pop("FLWR_HOME", None)
        else:
            os.environ["FLWR_HOME"] = old_home
        shutil.rmtree(home, ignore_errors=True)
    total = time.perf_counter() - t0
    records = summarize(results)
    print_table(records, console, workload.client_lr)
    for r in records:
        if "target_met" in r and not r["target_met"]:
            console.print(
                f"[red]missed:[/] "
                f"{run_label(r['strategy'], r['server_opt'], r['server_lr'], with_opt)} "
                f"at p={r['participation']:g}: "
                + (
                    "target accuracy not reached"
                    if not r["reached"]
                    else f"{r['bytes_ratio_vs_fedavg']:.4f} of FedAvg's bytes > 1/16"
                )
            )
    if refused:
        console.print(
            "refused (not run): "
            + ", ".join(f"{skip['strategy']} × {skip['server_opt']}" for skip in refused),
            highlight=False,
        )
    console.print(f"{len(results)} runs in {total:.0f} s")
    for label, ids in figure_runs(records).items():
        console.print(f"figure runs {label}: {' '.join(map(str, ids))}")
        if args.figure is not None and ids:
            out = write_figure(args.figure, label, ids, database_url)
            console.print(f"wrote {out}")
    if args.json is not None:
        write_json(
            args.json, records, workload, database_url, done=True, total_s=total,
            refused=refused,
        )  # fmt: skip
        console.print(f"wrote {args.json}")
    return 0 if len(results) == len(plans) and all(c.status == "finished" for c in results) else 1


def write_figure(folder: Path, label: str, run_ids: Sequence[int], database_url: str) -> Path:
    """Accuracy against cumulative measured bytes (log scale) for the runs of one p, drawn by
    `server.plot.plot_runs` from the store (so the figure shows what the store holds)."""
    from server.plot import plot_runs

    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"convergence-{label.replace('=', '')}.svg"
    plot_runs(
        database_url or None, list(run_ids), x="bytes", y="accuracy", out=out,
        title=f"Fashion-MNIST, 20 clients, Dirichlet 0.5, {label}: accuracy against bytes",
    )  # fmt: skip
    return out


def write_json(
    path: Path, records: list[dict[str, Any]], workload: Workload, database_url: str,
    done: bool, total_s: float | None = None, refused: Sequence[dict[str, str]] = (),
) -> None:  # fmt: skip
    """One record per strategy × server optimiser × γ × p, each with the workload (as
    benchmarks/rounds.py writes) and the refused combinations (``refused_runs``)."""
    from core.secrets import redact_url

    extra = {f"workload_{k}": v for k, v in asdict(workload).items()}
    extra["database_url"] = redact_url(database_url) if database_url else ""
    extra["complete"] = done
    extra["benchmark_wall_s"] = total_s
    extra["figure_run_ids"] = figure_runs(records)
    extra["refused_runs"] = list(refused)
    out = [{**r, **extra} for r in records]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(out, indent=2, default=_json_default), encoding="utf-8")
    tmp.replace(path)


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
