"""Rounds benchmark: our strategies against Flower's own FedAvg on one simulated workload.

Workload (issue 3): 20 clients, participation p = 0.5, Fashion-MNIST with the small CNN of
tasks/fashion_mnist.py (Dirichlet α = 0.5 label skew), 5 rounds (each client that takes part
runs K = 10 local SGD steps of batch 32, η = 0.05), in Flower's simulation
engine on a local SuperLink (``server.simulate``), one run per strategy, one after the
other, each recorded to a throw-away SQLite round-history store.

Measured per strategy, from what the ServerApp recorded:

* round_s: mean wall time of a round (ended_at − started_at) over rounds 2..R; round 1 also
  pays for starting the simulated clients (Ray workers, data loading) and is reported apart
  as first_round_s;
* uplink / downlink bytes: the serialized payload sizes summed over all rounds and clients,
  catch-up traffic of clients that missed rounds included;
* final_accuracy: central evaluation after the last round;
* server_peak_rss_mb: peak resident memory (Linux VmHWM) of the ``flwr-simulation`` process
  that runs the ServerApp.

Ratios are against ``flwr-fedavg`` measured in the same invocation. Targets (compressors at
the presets' QSGD s = 1): round_time_ratio ≤ 1.10 for artemis and mcm; uplink ratio ≤ 1/16
for artemis and mcm; downlink ratio ≤ 1/16 for rand-mcm and ≤ 1/8 for artemis.

    python -m benchmarks.rounds                 # the full workload, every strategy
    python -m benchmarks.rounds --quick         # a small, fast version (smoke test)
    python -m benchmarks.rounds --json out.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

BASELINE = "flwr-fedavg"
ALL_STRATEGIES = (
    "sgd",
    "qsgd",
    "diana",
    "biqsgd",
    "artemis",
    "dore",
    "doublesqueeze",
    "mcm",
    "rand-mcm",
    "ef-sgd",
    "signsgd-mv",
)
QUICK_STRATEGIES = ("artemis", "mcm", "rand-mcm")

#: (strategy, metric, bound): the issue's targets, each a ratio against flwr-fedavg
TARGETS: tuple[tuple[str, str, float], ...] = (
    ("artemis", "round_time_ratio_vs_fedavg", 1.10),
    ("mcm", "round_time_ratio_vs_fedavg", 1.10),
    ("artemis", "uplink_bytes_ratio_vs_fedavg", 1 / 16),
    ("mcm", "uplink_bytes_ratio_vs_fedavg", 1 / 16),
    ("rand-mcm", "downlink_bytes_ratio_vs_fedavg", 1 / 16),
    ("artemis", "downlink_bytes_ratio_vs_fedavg", 1 / 8),
)

FULL: dict[str, Any] = {
    "clients": 20,
    "participation": 0.5,
    "rounds": 5,
    "local_steps": 10,
    "batch_size": 32,
    "client_lr": 0.05,
    "test_examples": 0,
}
QUICK: dict[str, Any] = {**FULL, "clients": 4, "rounds": 2, "local_steps": 2, "test_examples": 1000}


def _ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return value / base


def _warm_round_s(result: Any) -> float | None:
    times = [r.seconds for r in result.rounds if r.seconds is not None]
    warm = times[1:] if len(times) > 1 else times
    return sum(warm) / len(warm) if warm else None


def records_from(results: list[Any], workload: dict[str, Any]) -> list[dict[str, Any]]:
    """One JSON record per strategy, ratios against the flwr-fedavg run."""
    base = next((r for r in results if r.label == BASELINE), None)
    base_round = _warm_round_s(base) if base is not None else None
    base_up = base.uplink_bytes if base is not None else None
    base_down = base.downlink_bytes if base is not None else None
    records = []
    for r in results:
        times = [row.seconds for row in r.rounds if row.seconds is not None]
        round_s = _warm_round_s(r)
        record: dict[str, Any] = {
            "strategy": r.label,
            "status": r.status,
            "uplink": r.run_facts.get("uplink_compressor") or "float32",
            "downlink": r.run_facts.get("downlink_compressor") or "float32",
            "num_parameters": r.run_facts.get("num_parameters"),
            "rounds": len(r.rounds),
            "round_s": round_s,
            "first_round_s": times[0] if times else None,
            "round_time_ratio_vs_fedavg": _ratio(round_s, base_round),
            "uplink_bytes": r.uplink_bytes,
            "downlink_bytes": r.downlink_bytes,
            "uplink_bytes_ratio_vs_fedavg": _ratio(r.uplink_bytes, base_up),
            "downlink_bytes_ratio_vs_fedavg": _ratio(r.downlink_bytes, base_down),
            "final_accuracy": r.final_accuracy,
            "final_eval_loss": r.final_eval_loss,
            "server_peak_rss_mb": r.server_peak_rss_mb,
            "wall_s": r.wall_s,
            "flower_run_id": r.flower_run_id,
            **{f"workload_{k}": v for k, v in workload.items()},
        }
        targets = {}
        for strategy, metric, bound in TARGETS:
            if strategy == r.label:
                value = record[metric]
                targets[metric] = {
                    "bound": bound,
                    "value": value,
                    "met": value is not None and value <= bound,
                }
        record["targets"] = targets
        records.append(record)
    return records


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(records: list[dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for name in (
        "strategy",
        "up / down",
        "s/round",
        "time ×",
        "uplink ×",
        "downlink ×",
        "accuracy",
        "server RSS MB",
        "targets",
    ):
        table.add_column(name, justify="left" if name in ("strategy", "up / down") else "right")
    for rec in records:
        met = rec["targets"]
        verdict = (
            "-"
            if not met
            else " ".join(
                ("[green]✓[/]" if t["met"] else "[red]✗[/]")
                + {"round": "time", "uplink": "up", "downlink": "down"}[k.split("_")[0]]
                for k, t in met.items()
            )
        )
        table.add_row(
            rec["strategy"]
            + ("" if rec["status"] == "finished:completed" else f" ({rec['status']})"),
            f"{rec['uplink']} / {rec['downlink']}",
            _fmt(rec["round_s"], ".2f"),
            _fmt(rec["round_time_ratio_vs_fedavg"], ".2f"),
            _fmt(rec["uplink_bytes_ratio_vs_fedavg"], ".4f"),
            _fmt(rec["downlink_bytes_ratio_vs_fedavg"], ".4f"),
            _fmt(rec["final_accuracy"], ".4f"),
            _fmt(rec["server_peak_rss_mb"], ".0f"),
            verdict,
        )
    Console(width=max(140, shutil.get_terminal_size().columns)).print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.rounds",
        description="Wall time per round, bytes each way and accuracy of each strategy "
        "against Flower's own FedAvg on one simulated Fashion-MNIST workload.",
    )
    parser.add_argument("--quick", action="store_true", help="small and fast: 4 clients, 2 rounds")
    parser.add_argument("--json", type=Path, help="write one record per strategy here")
    parser.add_argument(
        "--strategies",
        help=f"comma-separated strategies besides {BASELINE} (default: all; quick: "
        f"{','.join(QUICK_STRATEGIES)})",
    )
    parser.add_argument("--clients", type=int, help="simulated clients (default 20; quick 4)")
    parser.add_argument("--rounds", type=int, help="rounds per run (default 5; quick 2)")
    parser.add_argument("--participation", type=float, help="participation p (default 0.5)")
    parser.add_argument(
        "--local-steps", type=int, help="local SGD steps K per round (default 10; quick 2)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default="", help="Fashion-MNIST IDX directory")
    parser.add_argument("--timeout", type=float, default=1800.0, help="per run, seconds")
    parser.add_argument("--app-dir", type=Path, help="Flower app directory (default: this repo)")
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="where the runs' store, FLWR_HOME and logs go (default: a temporary directory, "
        "removed when every run completed)",
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from rich.console import Console

    from server.app_dir import SimulationError, check_overrides, read_app
    from server.simulate import run_simulations
    from server.simulation_run import RunSpec
    from tasks.fashion_mnist import FashionMnistDataMissing, check_data_dir

    console = Console(stderr=True)
    try:
        check_data_dir(args.data_dir or None)
    except FashionMnistDataMissing as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2
    workload = dict(QUICK if args.quick else FULL)
    for key in ("clients", "rounds", "participation", "local_steps"):
        if getattr(args, key) is not None:
            workload[key] = getattr(args, key)
    if (
        workload["clients"] < 1
        or workload["rounds"] < 2
        or workload["local_steps"] < 1
        or not 0 < workload["participation"] <= 1
    ):
        console.print(
            "[red]error:[/] need clients >= 1, rounds >= 2, local steps >= 1 and "
            "0 < participation <= 1"
        )
        return 2
    if args.strategies:
        strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    else:
        strategies = list(QUICK_STRATEGIES if args.quick else ALL_STRATEGIES)
    strategies = [BASELINE, *[s for s in dict.fromkeys(strategies) if s != BASELINE]]

    if args.work_dir is not None:
        work = args.work_dir.expanduser().resolve()
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="fedsqueeze-bench-rounds-"))
    try:
        app = read_app(args.app_dir)
        task_options = (
            f"test_examples={workload['test_examples']}" if workload["test_examples"] else ""
        )
        specs = []
        for strategy in strategies:
            overrides = check_overrides(
                app.run_config,
                {
                    "strategy": strategy,
                    "task": "fashion-mnist",
                    "task-options": task_options,
                    "data-dir": args.data_dir,
                    "num-server-rounds": workload["rounds"],
                    "num-partitions": workload["clients"],
                    "participation": workload["participation"],
                    "local-steps": workload["local_steps"],
                    "batch-size": workload["batch_size"],
                    "client-lr": workload["client_lr"],
                    "seed": args.seed,
                    "device": "cpu",
                },
            )
            specs.append(
                RunSpec(
                    label=strategy,
                    overrides=overrides,
                    num_supernodes=int(workload["clients"]),
                    timeout_s=args.timeout,
                )
            )
        console.print(
            f"Rounds benchmark: {workload['clients']} clients, p={workload['participation']}, "
            f"Fashion-MNIST CNN, {workload['rounds']} rounds of K={workload['local_steps']} local "
            f"steps; {len(specs)} runs (work dir {work})"
        )
        results = run_simulations(
            app,
            specs,
            flwr_home=work / "flwr-home",
            console=console,
            show_progress=not args.no_progress,
            database_url=f"sqlite:///{work / 'rounds.db'}",
        )
    except SimulationError as exc:
        console.print(f"[red]error:[/] {exc} (files kept in {work})")
        return 1
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/] (files kept in {work})")
        return 130
    if all(r.ok for r in results):
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    else:
        console.print(f"[red]some runs failed[/]: logs kept in {work}")

    records = records_from(results, workload)
    print_table(
        records,
        f"Rounds: {workload['clients']} clients, p={workload['participation']}, "
        f"{workload['rounds']} rounds, ratios vs {BASELINE}",
    )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=2), encoding="utf-8")
        console.print(f"wrote {args.json}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
