"""Deployment benchmark: a run on local SuperNodes against the same run in simulation.

Workload: one strategy (default artemis) on the synthetic least-squares task, R rounds,
N = 4 clients each taking part in every round (p = 1), CPU.

* Deployment: `fedsqueeze server start` machinery (SuperLink with TLS and SuperNode
  authentication, REST service) in a throw-away data directory on free ports, 4 clients
  enrolled over REST, 4 SuperNodes started from their bundles (`fedsqueeze client start`),
  the run submitted with `server.deploy.runs.submit_run` (= ``flwr run``).
* Simulation: the same run config in Flower's simulation engine (``server.simulate``, 4
  simulated SuperNodes), recorded to the same store.

Measured, from what the ServerApp recorded (rounds 2..R: round 1 also pays for installing
the app bundle and the first ClientApp start-up and is reported apart as first_round_s):

* ``round_s_deployment`` / ``round_s_simulation``: mean wall time of a round
  (ended_at − started_at); their ratio.
* ``poll_wait_share``: the share of the deployment rounds' wall time spent waiting on
  polls along the round's critical path (the node whose reply came last): from the
  server's push (round start + configure phase) to that node's receipt of the message
  (the SuperNode asks the SuperLink for work every 3 s in flwr 1.41), plus from the node's
  reply being sent to the server's poll returning with it (the ServerApp polls every
  0.1 s). Beside it, ``node_busy_s_per_round``: that node's time from receiving the
  message to sending its reply (the ClientApp process start-up, one per message in
  Flower's subprocess isolation, the local training, the 0.5 s reply check). The node-side
  times come from the SuperNodes' own log lines ("Received successfully", "Sent
  successfully"), timestamped by running them with ``FLWR_LOG_LEVEL=DEBUG``; all
  processes share this machine's clock.

    python -m benchmarks.deploy               # 8 rounds
    python -m benchmarks.deploy --quick       # 3 rounds (smoke test)
    python -m benchmarks.deploy --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# "INFO 2026-11-22 01:12:25,123:      Receiving: train message (ID: ...)"
_STAMPED = re.compile(r"^\w+\s+(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\s*:\s*(.*)$")
_HEADER = re.compile(r"\[RUN (\d+)(?:, ROUND (\S+))?\]")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stamp(text: str) -> float:
    """A Flower log time stamp (local time, milliseconds) as a UNIX time."""
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").astimezone().timestamp()


@dataclass
class NodeEvents:
    """Per group id (round): when the node received the message and sent its reply."""

    received: dict[str, float]
    sent: dict[str, float]


def parse_supernode_log(text: str, run_id: int) -> NodeEvents:
    """Receipt and reply times per round of `run_id` from a DEBUG SuperNode log.

    Rounds are the messages' group ids when the ServerApp sets them; otherwise the k-th
    message of the run is taken as round k (exact for this workload: every node takes part
    in every round, one message each, and a SuperNode handles one message at a time)."""
    received: dict[str, float] = {}
    sent: dict[str, float] = {}
    run: int | None = None
    group: str | None = None
    n_received = n_sent = 0
    recv_key: str | None = None
    send_key: str | None = None
    for raw in text.splitlines():
        m = _STAMPED.match(_ANSI.sub("", raw).strip())
        if not m:
            continue
        when, message = _stamp(m.group(1)), m.group(2).strip()
        if h := _HEADER.search(message):
            run, group = int(h.group(1)), h.group(2)
        elif message.startswith("Receiving:") and run == run_id:
            n_received += 1
            recv_key = group or str(n_received)
        elif message.startswith("Received successfully") and recv_key is not None:
            received.setdefault(recv_key, when)
            recv_key = None
        elif message.startswith("Sending:") and run == run_id:
            n_sent += 1
            send_key = group or str(n_sent)
        elif message.startswith("Sent successfully") and send_key is not None:
            sent[send_key] = when
            send_key = None
    return NodeEvents(received, sent)


def node_busy(rounds: list[dict[str, Any]], nodes: list[NodeEvents]) -> list[float | None]:
    """Per round, the critical node's time from receiving the message to sending its reply
    (ClientApp process start-up, local training, the SuperNode's 0.5 s reply check)."""
    out: list[float | None] = []
    for r in rounds:
        key = str(r["round"])
        candidates = [n for n in nodes if key in n.sent and key in n.received]
        if not candidates:
            out.append(None)
            continue
        last = max(candidates, key=lambda n: n.sent[key])
        out.append(last.sent[key] - last.received[key])
    return out


def poll_waits(rounds: list[dict[str, Any]], nodes: list[NodeEvents]) -> list[float | None]:
    """Critical-path poll wait per round (None when a round's events are not all known)."""
    out: list[float | None] = []
    for r in rounds:
        key = str(r["round"])
        start = datetime.fromisoformat(r["started_at"]).timestamp()
        phases = r["phase_seconds"]
        push = start + float(phases.get("configure", 0.0))
        end = push + float(phases.get("train", 0.0))
        candidates = [n for n in nodes if key in n.sent and key in n.received]
        if not candidates:
            out.append(None)
            continue
        last = max(candidates, key=lambda n: n.sent[key])
        wait = max(0.0, last.received[key] - push) + max(0.0, end - last.sent[key])
        out.append(wait)
    return out


def _round_seconds(r: dict[str, Any]) -> float:
    return (
        datetime.fromisoformat(r["ended_at"]) - datetime.fromisoformat(r["started_at"])
    ).total_seconds()


def _steady(values: list[float]) -> float:
    tail = values[1:] if len(values) > 1 else values
    return statistics.fmean(tail)


@contextlib.contextmanager
def _deployment(root: Path, nodes: int) -> Iterator[tuple[Any, Any, list[Path]]]:
    """Server + `nodes` enrolled SuperNodes; everything ended by PID afterwards."""
    from client.enroll import enroll
    from server.deploy.launcher import start_server, stop_server
    from server.deploy.processes import stop_process

    data_dir = root / "server"
    result = start_server(
        data_dir,
        overrides={
            "superlink_port": _free_port(),
            "api_port": _free_port(),
            "database_url": f"sqlite:///{root / 'store.db'}",
        },
    )
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    try:
        assert result.admin_token is not None
        env = dict(os.environ, FLWR_LOG_LEVEL="DEBUG", PYTHONUNBUFFERED="1",
                   FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")  # fmt: skip
        for i in range(nodes):
            bundle, _ = enroll(
                name=f"bench-{i}",
                api_url=result.config.api_url,
                token=result.admin_token,
                superlink=result.config.device_address,
                ca_cert_pem=result.paths.tls.ca_cert.read_bytes(),
                dest=root / f"node{i}.bundle",
                partition_id=i,
                num_partitions=nodes,
            )
            log = root / f"node{i}.log"
            logs.append(log)
            with open(log, "wb") as fh:
                procs.append(
                    subprocess.Popen(
                        [
                            str(Path(sys.executable).parent / "fedsqueeze"),
                            "client",
                            "start",
                            "--bundle",
                            str(bundle),
                            "--device",
                            "cpu",
                            "--clientappio-port",
                            str(_free_port()),
                        ],
                        env=env,
                        stdout=fh,
                        stderr=subprocess.STDOUT,
                    )
                )
        yield result.paths, result.config, logs
    finally:
        from server.deploy.processes import ProcessRecord

        for p in procs:
            with contextlib.suppress(Exception):
                import psutil

                record = ProcessRecord("node", p.pid, psutil.Process(p.pid).create_time(), [], "")
                stop_process(record)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=15)
        stop_server(data_dir)


def _get(api_url: str, path: str, **params: Any) -> Any:
    import httpx

    r = httpx.get(api_url + path, params=params, timeout=30)
    r.raise_for_status()
    return r.json()


def _store_rounds(api_url: str, flower_run_id: int) -> list[dict[str, Any]]:
    from server.deploy.runs import store_rounds

    _, rounds = store_rounds(api_url, flower_run_id)
    return rounds


def run_benchmark(
    rounds: int, nodes: int, strategy: str, task: str, timeout: float, echo: Any
) -> dict[str, Any]:
    from server.app_dir import read_app
    from server.deploy.runs import flower_run_status, submit_run
    from server.simulate import build_specs, run_simulations

    root = Path(tempfile.mkdtemp(prefix="fedsqueeze-bench-deploy-"))
    old_env = {k: os.environ.get(k) for k in ("FEDSQUEEZE_HOME", "FLWR_HOME", "DATABASE_URL")}
    os.environ["FEDSQUEEZE_HOME"] = str(root / "home")
    os.environ["FLWR_HOME"] = str(root / "flwr-home")
    os.environ.pop("DATABASE_URL", None)
    config: dict[str, bool | int | float | str] = {
        "strategy": strategy,
        "num-server-rounds": rounds,
        "task": task,
        "num-partitions": nodes,
        "min-nodes": nodes,
        "participation": 1.0,
        "device": "cpu",
        "round-timeout": timeout,
    }
    ok = False
    try:
        with _deployment(root, nodes) as (paths, cfg, logs):
            echo(f"deployment: {nodes} SuperNodes, {strategy}, {rounds} rounds on {task}")
            t0 = time.perf_counter()
            outcome = submit_run(paths, cfg, config, app_dir=REPO_ROOT)
            wall_deploy = time.perf_counter() - t0
            if outcome.flower_run_id is None:
                raise RuntimeError(
                    "deployment run did not start:\n" + "\n".join(outcome.lines[-30:])
                )
            status = flower_run_status(
                cfg.superlink_address, paths.tls.ca_cert, outcome.flower_run_id
            )
            if not status.ok:
                raise RuntimeError(
                    f"deployment run {status.status}/{status.sub_status}: {status.details}"
                )
            dep_rounds = _store_rounds(cfg.api_url, outcome.flower_run_id)
            events = [parse_supernode_log(p.read_text(errors="replace"), outcome.flower_run_id)
                      for p in logs]  # fmt: skip

            echo(f"simulation: {nodes} simulated SuperNodes, same run config")
            app = read_app(REPO_ROOT)
            specs = build_specs(app, [strategy], {}, [], nodes, 1, timeout * rounds)
            for spec in specs:
                spec.overrides.update({k: v for k, v in config.items() if k != "strategy"})
            t0 = time.perf_counter()
            (sim,) = run_simulations(
                app,
                specs,
                flwr_home=root / "sim-home",
                show_progress=False,
                database_url=cfg.database_url,
            )
            wall_sim = time.perf_counter() - t0
            if not sim.ok:
                raise RuntimeError(f"simulation ended {sim.status}; log: {sim.log_path}")
            sim_rounds = _store_rounds(cfg.api_url, sim.flower_run_id)
        ok = True
    finally:
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if ok:
            shutil.rmtree(root, ignore_errors=True)
        else:
            echo(f"kept {root} for inspection")

    dep_s = [_round_seconds(r) for r in dep_rounds]
    sim_s = [_round_seconds(r) for r in sim_rounds]
    waits = poll_waits(dep_rounds, events)
    steady = [(w, s) for w, s in zip(waits[1:], dep_s[1:], strict=True) if w is not None]
    share = sum(w for w, _ in steady) / sum(s for _, s in steady) if steady else None
    busy = [b for b in node_busy(dep_rounds, events)[1:] if b is not None]
    return {
        "strategy": strategy,
        "task": task,
        "nodes": nodes,
        "rounds": rounds,
        "round_s_deployment": _steady(dep_s),
        "round_s_simulation": _steady(sim_s),
        "deployment_vs_simulation": _steady(dep_s) / _steady(sim_s),
        "first_round_s_deployment": dep_s[0],
        "first_round_s_simulation": sim_s[0],
        "poll_wait_share": share,
        "poll_wait_s_per_round": (statistics.fmean(w for w, _ in steady) if steady else None),
        "poll_rounds_measured": len(steady),
        "node_busy_s_per_round": statistics.fmean(busy) if busy else None,
        "wall_s_deployment": wall_deploy,
        "wall_s_simulation": wall_sim,
        "replied_deployment": [r["replied"] for r in dep_rounds],
        "uplink_bytes_deployment": sum(r["uplink_bytes"] for r in dep_rounds),
        "uplink_bytes_simulation": sum(r["uplink_bytes"] for r in sim_rounds),
        "downlink_bytes_deployment": sum(r["downlink_bytes"] for r in dep_rounds),
        "downlink_bytes_simulation": sum(r["downlink_bytes"] for r in sim_rounds),
    }


def _table(result: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title=f"deployment vs simulation ({result['strategy']}, {result['nodes']} "
                  f"nodes, {result['rounds']} rounds)")  # fmt: skip
    table.add_column("measure")
    table.add_column("deployment", justify="right")
    table.add_column("simulation", justify="right")
    table.add_row("s per round (rounds 2..R)", f"{result['round_s_deployment']:.2f}",
                  f"{result['round_s_simulation']:.2f}")  # fmt: skip
    table.add_row("first round s", f"{result['first_round_s_deployment']:.2f}",
                  f"{result['first_round_s_simulation']:.2f}")  # fmt: skip
    table.add_row("uplink bytes", f"{result['uplink_bytes_deployment']:,}",
                  f"{result['uplink_bytes_simulation']:,}")  # fmt: skip
    table.add_row("downlink bytes", f"{result['downlink_bytes_deployment']:,}",
                  f"{result['downlink_bytes_simulation']:,}")  # fmt: skip
    share = result["poll_wait_share"]
    per = result["poll_wait_s_per_round"]
    table.add_row("poll wait share", "-" if share is None else f"{share:.1%}", "")
    table.add_row("poll wait s per round", "-" if per is None else f"{per:.2f}", "")
    busy = result["node_busy_s_per_round"]
    table.add_row("node busy s per round", "-" if busy is None else f"{busy:.2f}", "")
    table.add_row("deployment / simulation", f"{result['deployment_vs_simulation']:.2f}", "")
    return table


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds instead of 8")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (overrides --quick)")
    parser.add_argument("--nodes", type=int, default=4, help="local SuperNodes (default 4)")
    parser.add_argument("--strategy", default="artemis")
    parser.add_argument("--task", default="synthetic-lsq")
    parser.add_argument("--round-timeout", type=float, default=300.0)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 8)
    if rounds < 2 or args.nodes < 1:
        parser.error("need at least 2 rounds and 1 node")
    console = Console(stderr=True)
    result = run_benchmark(rounds, args.nodes, args.strategy, args.task, args.round_timeout,
                           console.print)  # fmt: skip
    Console().print(_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
