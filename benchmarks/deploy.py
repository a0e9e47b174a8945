"""Deployment benchmark: fedsqueeze against Flower's own FedAvg on the same SuperNodes.

Workload: the synthetic least-squares task, R rounds, N clients each taking part in every
round (p = 1), CPU. One invocation starts one deployment, the `fedsqueeze server start`
machinery (SuperLink with TLS and SuperNode authentication, REST service) in a throw-away
data directory on free ports, enrols N clients over REST and starts N SuperNodes from
their bundles (`fedsqueeze client start`, so with the project's SuperExec task-poll
interval, core.superexec). On these same processes it submits two runs, one after the
other (`--pairs`: several such pairs), with `server.deploy.runs.submit_run` (= ``flwr run``)
and the same run config:

* ``flwr-fedavg``: Flower's ``FedAvg`` strategy unchanged (its ``start`` loop, its
  ``send_and_receive`` that pulls replies every 3 s), float32 arrays both ways;
* the fedsqueeze strategy (default ``artemis``): compressed both ways, replies pulled
  every 0.1 s (strategies.flower).

Measured (rounds 2..R; round 1 also pays for installing the app bundle, and the fedsqueeze
strategy's for asking every node its partition, so it is reported apart): ``round_s_*``,
the mean wall time of a round as the ServerApp recorded it (ended_at − started_at), and
``round_time_ratio_vs_fedavg`` = fedsqueeze / FedAvg. The runs come in ``--pairs`` pairs in
alternating order (FedAvg first, then fedsqueeze first, ...: `run_order`), since the
machine's load drifts during a benchmark and the second run of a pair finds warmer caches;
``load_average`` is taken before every run and at the end.

A round's breakdown follows its critical path, the node whose reply came last, with the
source of every stamp (all processes share this machine's clock):

* ``server_configure_s``, ``server_aggregate_s``, ``server_evaluate_s``: the ServerApp's own
  ``perf_counter`` around its phases (recorded with the round; for fedsqueeze the downlink
  encoding is in configure and the uplink decoding in aggregate);
* ``idle_poll_wait_s``: from the push (round start + configure) to the SuperNode's log line
  "Receiving: train message" (its poll of the SuperLink, every 3 s when idle, returned it);
* ``superexec_wait_s``: from there to the ClientApp process's start as the kernel has it
  (from ``/proc/self/stat``, logged by the ClientApp: client/timing.py), i.e. SuperExec's
  task poll and its launch of ``flwr-clientapp`` (the node downloads the message's content
  meanwhile);
* ``clientapp_start_s``: from the process start to the train handler's first line
  (interpreter, imports, Flower's hand-over of the message);
* ``client_setup_s``, ``client_training_s``: the handler's own ``perf_counter`` around the
  task set-up (model, data partition) and the local training;
* ``client_codec_s``: the rest of the handler (decoding the downlink, the algorithm's client
  half, encoding the uplink, saving the state; FedAvg: loading and copying the arrays);
* ``reply_s``: from the handler's end to the SuperNode's "Sent successfully" (the ClientApp
  handing its reply over and exiting, the SuperNode's 0.5 s reply check, the upload);
* ``server_pull_wait_s``: from there to the end of the ServerApp's train phase (its reply
  polling);
* ``unexplained_s``: the round's wall time less all of the above.

Beside it, figures a loaded machine does not stretch, or that show where waiting hides:

* ``client_cpu_*``: per train message of rounds 2..R on every node, the ClientApp
  process's CPU time before the handler (``startup_cpu_s``: interpreter, Flower, imports,
  the app bundle), in it (``handler_cpu_s``), and the modules the handler imported on first
  use (``imports``); ``client_cpu_ratio_vs_fedavg`` compares start-up + handler;
* ``node_turnaround_s_*``: from the critical node's "Sent successfully" to its receipt of
  the next round (`node_turnaround`): about 3 s whatever the server does in between,
  because the SuperNode sleeps 3 s after its first empty poll; 6 s when the server's next
  message missed that poll.

The SuperNode and ClientApp stamps come from their DEBUG logs (``FLWR_LOG_LEVEL=DEBUG``).

Beside it: the ClientApp's import time. In fresh interpreters (median of several), the
time to ``import client.app`` against ``import torch, flwr`` alone: every message in
deployment pays it, once per ClientApp process.

    python -m benchmarks.deploy               # 4 nodes, 6 rounds, 2 pairs of runs
    python -m benchmarks.deploy --quick       # 2 nodes, 3 rounds, 1 pair (CI)
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from client.timing import parse_timing_lines
from core.superexec import DEFAULT_TASK_POLL_INTERVAL_S, TASK_POLL_INTERVAL_ENV
from strategies.registry import ALGORITHMS, FLWR_FEDAVG

REPO_ROOT = Path(__file__).resolve().parents[1]
#: the issue's target for round_time_ratio_vs_fedavg
TARGET_RATIO = 0.8
#: and for the ClientApp's imports on top of torch + flwr
TARGET_IMPORT_OVERHEAD_S = 0.2
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# "INFO 2026-11-22 01:12:25,123:      Receiving: train message (ID: ...)"
_STAMPED = re.compile(r"^\w+\s+(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\s*:\s*(.*)$")
_HEADER = re.compile(r"\[RUN (\d+)(?:, ROUND (\S+))?\]")
#: the components of a round, in the order they happen on the critical path
COMPONENTS = (
    "server_configure_s",
    "idle_poll_wait_s",
    "superexec_wait_s",
    "clientapp_start_s",
    "client_setup_s",
    "client_training_s",
    "client_codec_s",
    "reply_s",
    "server_pull_wait_s",
    "server_aggregate_s",
    "server_evaluate_s",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stamp(text: str) -> float:
    """A Flower log time stamp (local time, milliseconds) as a UNIX time."""
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").astimezone().timestamp()


@dataclass
class NodeEvents:
    """Per group id (round): when the node's poll returned the message ("Receiving:"),
    when it had sent the reply ("Sent successfully"), and the ClientApp's own timing line
    (client/timing.py) for it."""

    received: dict[str, float]
    sent: dict[str, float]
    handler: dict[str, dict[str, float]]


def parse_supernode_log(text: str, run_id: int) -> NodeEvents:
    """Receipt and reply times per round of `run_id` from a DEBUG SuperNode log.

    Rounds are the messages' group ids when the ServerApp sets them (both strategies do);
    otherwise the k-th message of the run is taken as round k (exact for this workload:
    every node takes part in every round, one message each, and a SuperNode handles one
    message at a time)."""
    received: dict[str, float] = {}
    sent: dict[str, float] = {}
    run: int | None = None
    group: str | None = None
    n_received = n_sent = 0
    send_key: str | None = None
    for raw in text.splitlines():
        m = _STAMPED.match(_ANSI.sub("", raw).strip())
        if not m:
            continue
        when, message = _stamp(m.group(1)), m.group(2).strip()
        if h := _HEADER.search(message):
            run, group = int(h.group(1)), h.group(2)
        elif message.startswith("Receiving:") and run == run_id:
            # the node's poll returned the message; it has made the ClientApp task already
            # and downloads the content while SuperExec picks the task up
            n_received += 1
            received.setdefault(group or str(n_received), when)
        elif message.startswith("Sending:") and run == run_id:
            n_sent += 1
            send_key = group or str(n_sent)
        elif message.startswith("Sent successfully") and send_key is not None:
            sent[send_key] = when
            send_key = None
    handler = {str(int(t["round"])): t for t in parse_timing_lines(_ANSI.sub("", text), run_id)}
    return NodeEvents(received, sent, handler)


def _iso(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def round_breakdown(r: dict[str, Any], nodes: list[NodeEvents]) -> dict[str, float] | None:
    """One round's components (COMPONENTS, plus round_s and unexplained_s) along the
    critical path; None when the critical node's events are not all in its log."""
    key = str(r["round"])
    candidates = [n for n in nodes if key in n.sent and key in n.received]
    if not candidates:
        return None
    last = max(candidates, key=lambda n: n.sent[key])
    timing = last.handler.get(key)
    if timing is None:
        return None
    start, end = _iso(r["started_at"]), _iso(r["ended_at"])
    phases = {k: float(v) for k, v in r["phase_seconds"].items()}
    push = start + phases.get("configure", 0.0)
    pulled = push + phases.get("train", 0.0)
    handler_s = timing["handler_s"]
    parts = {
        "server_configure_s": phases.get("configure", 0.0),
        "idle_poll_wait_s": last.received[key] - push,
        "superexec_wait_s": timing["process_start"] - last.received[key],
        "clientapp_start_s": timing["handler_start"] - timing["process_start"],
        "client_setup_s": timing["setup_s"],
        "client_training_s": timing["train_s"],
        "client_codec_s": handler_s - timing["setup_s"] - timing["train_s"],
        "reply_s": last.sent[key] - timing["handler_end"],
        "server_pull_wait_s": pulled - last.sent[key],
        "server_aggregate_s": phases.get("aggregate", 0.0),
        "server_evaluate_s": phases.get("evaluate", 0.0),
    }
    round_s = end - start
    parts["round_s"] = round_s
    parts["unexplained_s"] = round_s - sum(parts[c] for c in COMPONENTS)
    return parts


def node_turnaround(r: dict[str, Any], nodes: list[NodeEvents]) -> float | None:
    """From the critical node's reply in round r ("Sent successfully") to its receipt of
    round r + 1's message; None when either is not in its log.

    The SuperNode polls the SuperLink again right after sending a reply, finds nothing (the
    server cannot have made the next round yet), and then sleeps 3 s before the next poll
    (flwr 1.42, fixed). So whatever the ServerApp does between pulling the reply and
    pushing the next round, if it is done within those 3 s, the critical node's next
    receipt comes at the same time: the server's reply polling and its own work are hidden."""
    key, after = str(r["round"]), str(int(r["round"]) + 1)
    candidates = [n for n in nodes if key in n.sent and key in n.received]
    if not candidates:
        return None
    last = max(candidates, key=lambda n: n.sent[key])
    if after not in last.received:
        return None
    return last.received[after] - last.sent[key]


#: the ClientApp's CPU figures per message (client.timing), averaged over all nodes
CPU_FIELDS = ("startup_cpu_s", "handler_cpu_s", "imports")


def summarize(runs: list[tuple[list[dict[str, Any]], list[NodeEvents]]]) -> dict[str, Any]:
    """One strategy's runs: round time (rounds 2..R of every run), the mean breakdown of the
    rounds fully measured, the critical node's turnaround (`node_turnaround`), and the
    ClientApp's CPU per train message of rounds 2..R on every node."""
    seconds: list[float] = []
    firsts: list[float] = []
    parts: list[dict[str, float]] = []
    turnaround: list[float] = []
    cpu: list[dict[str, float]] = []
    for rounds, nodes in runs:
        times = [_iso(r["ended_at"]) - _iso(r["started_at"]) for r in rounds]
        firsts.append(times[0])
        seconds += times[1:] if len(times) > 1 else times
        steady = rounds[1:] if len(rounds) > 1 else rounds
        parts += [p for p in (round_breakdown(r, nodes) for r in steady) if p is not None]
        turnaround += [t for t in (node_turnaround(r, nodes) for r in steady) if t is not None]
        cpu += [t for n in nodes for k, t in n.handler.items() if int(k) > 1 and "imports" in t]
    names = (*COMPONENTS, "unexplained_s")
    return {
        "round_s": statistics.fmean(seconds),
        "first_round_s": statistics.fmean(firsts),
        "rounds": [len(rounds) for rounds, _ in runs],
        "replied": [r["replied"] for rounds, _ in runs for r in rounds],
        # per run (every run has the same rounds and nodes)
        "uplink_bytes": sum(r["uplink_bytes"] for rounds, _ in runs for r in rounds) // len(runs),
        "downlink_bytes": sum(r["downlink_bytes"] for rounds, _ in runs for r in rounds)
        // len(runs),
        "breakdown_rounds": len(parts),
        "breakdown": {n: statistics.fmean(p[n] for p in parts) for n in names} if parts else {},
        "node_turnaround_s": statistics.fmean(turnaround) if turnaround else None,
        "client_cpu_messages": len(cpu),
        "client_cpu": {f: statistics.fmean(t[f] for t in cpu) for f in CPU_FIELDS} if cpu else {},
    }


# ----------------------------------------------------------------------------- imports
_IMPORT_PROBE = (
    "import sys, time; t, c = time.perf_counter(), time.process_time(); {stmt}; "
    "sys.stdout.write(repr((time.perf_counter() - t, time.process_time() - c)))"
)


def _probe_env() -> dict[str, str]:
    """This checkout first on the path (what a ClientApp started from it imports)."""
    path = os.environ.get("PYTHONPATH", "")
    return dict(os.environ, PYTHONPATH=str(REPO_ROOT) + (os.pathsep + path if path else ""))


def _import_seconds(stmt: str) -> tuple[float, float]:
    """(wall, CPU) seconds of `stmt` in a fresh interpreter."""
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_PROBE.format(stmt=stmt)],
        capture_output=True, text=True, check=True, env=_probe_env(), cwd=REPO_ROOT,
    )  # fmt: skip
    wall, cpu = (float(x) for x in done.stdout.strip().strip("()").split(","))
    return wall, cpu


def import_times(runs: int) -> dict[str, Any]:
    """Median seconds, over `runs` fresh interpreters each (taken alternately, so that the
    machine's load falls on both alike), of ``import client.app`` and of
    ``import torch, flwr``: wall time, and the importing process's CPU time (what the
    imports cost on a machine that other processes do not share: on a loaded one the
    wall time is mostly waiting for a core); and the packages that ``client.app`` imports
    beyond the baseline, with their own import time from ``-X importtime``."""
    app: list[tuple[float, float]] = []
    base: list[tuple[float, float]] = []
    for _ in range(runs):
        base.append(_import_seconds("import torch, flwr"))
        app.append(_import_seconds("import client.app"))
    wall_app, wall_base = (statistics.median(w for w, _ in xs) for xs in (app, base))
    cpu_app, cpu_base = (statistics.median(c for _, c in xs) for xs in (app, base))
    return {
        "import_runs": runs,
        "import_s_client_app": wall_app,
        "import_s_torch_flwr": wall_base,
        "import_overhead_s": wall_app - wall_base,
        "import_cpu_s_client_app": cpu_app,
        "import_cpu_s_torch_flwr": cpu_base,
        "import_cpu_overhead_s": cpu_app - cpu_base,
        "import_extra_packages_s": _extra_packages(),
    }


def _importtime(stmt: str) -> dict[str, float]:
    """Self time (s) per top-level package from ``python -X importtime``."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", stmt],
        capture_output=True, text=True, check=True, cwd=REPO_ROOT, env=_probe_env(),
    )  # fmt: skip
    per: dict[str, float] = {}
    for line in done.stderr.splitlines():
        # "import time:   self [us] | cumulative | imported package"
        fields = line.removeprefix("import time:").split("|")
        if len(fields) != 3 or not fields[0].strip().isdigit():
            continue
        top = fields[2].strip().split(".")[0]
        per[top] = per.get(top, 0.0) + int(fields[0]) / 1e6
    return per


def _extra_packages(top: int = 8) -> dict[str, float]:
    app = _importtime("import client.app")
    base = _importtime("import torch, flwr")
    extra = {k: v for k, v in app.items() if k not in base}
    return dict(sorted(extra.items(), key=lambda kv: -kv[1])[:top])


# ----------------------------------------------------------------------------- deployment
@contextlib.contextmanager
def _deployment(
    root: Path, nodes: int, superexec_poll: float
) -> Iterator[tuple[Any, Any, list[Path]]]:
    """Server + `nodes` enrolled SuperNodes; everything ended by PID afterwards."""
    from client.enroll import enroll
    from server.deploy.launcher import start_server, stop_server
    from server.deploy.processes import ProcessRecord, stop_process

    data_dir = root / "server"
    result = start_server(
        data_dir,
        overrides={
            "superlink_port": _free_port(),
            "api_port": _free_port(),
            "database_url": f"sqlite:///{root / 'store.db'}",
        },
    )
    procs: list[tuple[subprocess.Popen[bytes], list[str]]] = []
    logs: list[Path] = []
    try:
        if result.admin_token is None:
            raise RuntimeError("a fresh server data directory should have made an admin token")
        env = dict(os.environ, FLWR_LOG_LEVEL="DEBUG", PYTHONUNBUFFERED="1",
                   FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")  # fmt: skip
        env[TASK_POLL_INTERVAL_ENV] = repr(superexec_poll)
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
            cmd = [
                str(Path(sys.executable).parent / "fedsqueeze"),
                "client",
                "start",
                "--bundle",
                str(bundle),
                "--device",
                "cpu",
                "--clientappio-port",
                str(_free_port()),
            ]
            with open(log, "wb") as fh:
                proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
            procs.append((proc, cmd))
        yield result.paths, result.config, logs
    finally:
        import psutil

        try:
            for p, cmd in procs:
                with contextlib.suppress(psutil.Error):  # already gone
                    created = psutil.Process(p.pid).create_time()
                    # SIGTERM reaches `client start`, which ends its SuperNode and helpers
                    stop_process(ProcessRecord("node", p.pid, created, cmd, ""))
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=15)
        finally:
            stop_server(data_dir)


@dataclass
class RunRecord:
    """One run as measured: the ServerApp's rounds (from the store) and every node's events."""

    strategy: str
    flower_run_id: int
    wall_s: float
    rounds: list[dict[str, Any]]
    events: list[NodeEvents]


def _run_one(paths: Any, cfg: Any, config: dict[str, Any], logs: list[Path]) -> RunRecord:
    from server.deploy.runs import flower_run_status, store_rounds, submit_run

    t0 = time.perf_counter()
    outcome = submit_run(paths, cfg, config, app_dir=REPO_ROOT)
    wall = time.perf_counter() - t0
    if outcome.flower_run_id is None:
        raise RuntimeError(
            f"{config['strategy']} run did not start:\n" + "\n".join(outcome.lines[-30:])
        )
    status = flower_run_status(cfg.superlink_address, paths.tls.ca_cert, outcome.flower_run_id)
    if not status.ok:
        raise RuntimeError(
            f"{config['strategy']} run {status.status}/{status.sub_status}: {status.details}"
        )
    _, rounds = store_rounds(cfg.api_url, outcome.flower_run_id)
    events = [parse_supernode_log(p.read_text(errors="replace"), outcome.flower_run_id)
              for p in logs]  # fmt: skip
    return RunRecord(config["strategy"], outcome.flower_run_id, wall, rounds, events)


def run_order(strategy: str, pairs: int) -> list[str]:
    """The runs, in order: `pairs` pairs, FedAvg first in the 1st, 3rd, ... pair and the
    fedsqueeze strategy first in the others (ABBA...), so that neither side always runs on
    the warmer caches or the machine's later load."""
    out: list[str] = []
    for i in range(pairs):
        pair = [FLWR_FEDAVG, strategy]
        out += pair if i % 2 == 0 else pair[::-1]
    return out


def _load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_benchmark(
    rounds: int,
    nodes: int,
    strategy: str,
    task: str,
    timeout: float,
    superexec_poll: float,
    import_runs: int,
    echo: Callable[[str], Any],
    pairs: int = 1,
) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="fedsqueeze-bench-deploy-"))
    old_env = {k: os.environ.get(k) for k in ("FEDSQUEEZE_HOME", "FLWR_HOME", "DATABASE_URL")}
    os.environ["FEDSQUEEZE_HOME"] = str(root / "home")
    os.environ["FLWR_HOME"] = str(root / "flwr-home")
    os.environ.pop("DATABASE_URL", None)
    base: dict[str, Any] = {
        "num-server-rounds": rounds,
        "task": task,
        "num-partitions": nodes,
        "min-nodes": nodes,
        "participation": 1.0,
        "device": "cpu",
        "round-timeout": timeout,
    }
    records: list[RunRecord] = []
    loads: list[list[float]] = [_load_average()]
    ok = False
    try:
        with _deployment(root, nodes, superexec_poll) as (paths, cfg, logs):
            for name in run_order(strategy, pairs):
                echo(f"{name}: {nodes} SuperNodes, {rounds} rounds on {task} "
                     f"(load average {loads[-1][0]:.1f})")  # fmt: skip
                records.append(_run_one(paths, cfg, {**base, "strategy": name}, logs))
                loads.append(_load_average())
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
    echo(f"import times: {import_runs} fresh interpreters each")
    imports = import_times(import_runs)
    loads.append(_load_average())
    side = {
        name: summarize([(r.rounds, r.events) for r in records if r.strategy == name])
        for name in (FLWR_FEDAVG, strategy)
    }
    ours, fedavg = side[strategy], side[FLWR_FEDAVG]
    ratio = ours["round_s"] / fedavg["round_s"]
    result: dict[str, Any] = {
        "strategy": strategy,
        "task": task,
        "nodes": nodes,
        "rounds": rounds,
        "pairs": pairs,
        "order": [r.strategy for r in records],
        "load_average": loads,
        "superexec_task_poll_interval_s": superexec_poll,
        "round_time_ratio_vs_fedavg": ratio,
    }
    for label, s in (("fedsqueeze", ours), ("flwr_fedavg", fedavg)):
        name = strategy if label == "fedsqueeze" else FLWR_FEDAVG
        result |= {
            f"round_s_{label}": s["round_s"],
            f"first_round_s_{label}": s["first_round_s"],
            f"wall_s_{label}": statistics.fmean(r.wall_s for r in records if r.strategy == name),
            f"breakdown_{label}": s["breakdown"],
            f"breakdown_rounds_{label}": s["breakdown_rounds"],
            f"node_turnaround_s_{label}": s["node_turnaround_s"],
            f"client_cpu_{label}": s["client_cpu"],
            f"client_cpu_messages_{label}": s["client_cpu_messages"],
            f"replied_{label}": s["replied"],
            f"uplink_bytes_{label}": s["uplink_bytes"],
            f"downlink_bytes_{label}": s["downlink_bytes"],
        }
    if ours["client_cpu"] and fedavg["client_cpu"]:
        # a ClientApp process's whole CPU per train message, start-up and handler
        per_message = {n: s["client_cpu"]["startup_cpu_s"] + s["client_cpu"]["handler_cpu_s"]
                       for n, s in side.items()}  # fmt: skip
        result["client_cpu_ratio_vs_fedavg"] = per_message[strategy] / per_message[FLWR_FEDAVG]
    return {
        **result,
        **imports,
        "targets": {
            "round_time_ratio_vs_fedavg": {"target": TARGET_RATIO, "met": ratio <= TARGET_RATIO},
            "import_overhead_s": {
                "target": TARGET_IMPORT_OVERHEAD_S,
                "met": imports["import_overhead_s"] <= TARGET_IMPORT_OVERHEAD_S,
            },
            "import_cpu_overhead_s": {
                "target": TARGET_IMPORT_OVERHEAD_S,
                "met": imports["import_cpu_overhead_s"] <= TARGET_IMPORT_OVERHEAD_S,
            },
        },
    }


def _table(result: dict[str, Any]) -> Any:
    from rich.table import Table

    s = result["strategy"]
    loads = ", ".join(f"{x[0]:.1f}" for x in result["load_average"])
    table = Table(title=f"deployment: {s} vs flwr-fedavg ({result['nodes']} nodes, "
                  f"{result['rounds']} rounds, SuperExec poll "
                  f"{result['superexec_task_poll_interval_s']} s; runs in order "
                  f"{', '.join(result['order'])}; load average {loads})")  # fmt: skip
    table.add_column("seconds (rounds 2..R, critical node)")
    table.add_column(s, justify="right")
    table.add_column("flwr-fedavg", justify="right")
    table.add_row("round", f"{result['round_s_fedsqueeze']:.2f}",
                  f"{result['round_s_flwr_fedavg']:.2f}")  # fmt: skip
    table.add_row("first round", f"{result['first_round_s_fedsqueeze']:.2f}",
                  f"{result['first_round_s_flwr_fedavg']:.2f}")  # fmt: skip
    ours, theirs = result["breakdown_fedsqueeze"], result["breakdown_flwr_fedavg"]
    for name in (*COMPONENTS, "unexplained_s"):
        table.add_row(
            f"  {name.removesuffix('_s')}",
            f"{ours[name]:.3f}" if name in ours else "-",
            f"{theirs[name]:.3f}" if name in theirs else "-",
        )
    for name, label in (("node_turnaround_s", "critical node: reply to next receipt"),):
        a, b = result[f"{name}_fedsqueeze"], result[f"{name}_flwr_fedavg"]
        table.add_row(label, f"{a:.3f}" if a is not None else "-",
                      f"{b:.3f}" if b is not None else "-")  # fmt: skip
    ours_cpu, theirs_cpu = result["client_cpu_fedsqueeze"], result["client_cpu_flwr_fedavg"]
    for name in CPU_FIELDS:
        fmt = "{:.0f}" if name == "imports" else "{:.3f}"
        table.add_row(
            f"ClientApp {name.removesuffix('_s')} (per message, all nodes)",
            fmt.format(ours_cpu[name]) if name in ours_cpu else "-",
            fmt.format(theirs_cpu[name]) if name in theirs_cpu else "-",
        )
    if "client_cpu_ratio_vs_fedavg" in result:
        cpu_ratio = result["client_cpu_ratio_vs_fedavg"]
        table.add_row("ClientApp CPU ratio vs fedavg", f"{cpu_ratio:.2f}", "")
    table.add_row("uplink bytes (a run)", f"{result['uplink_bytes_fedsqueeze']:,}",
                  f"{result['uplink_bytes_flwr_fedavg']:,}")  # fmt: skip
    table.add_row("downlink bytes (a run)", f"{result['downlink_bytes_fedsqueeze']:,}",
                  f"{result['downlink_bytes_flwr_fedavg']:,}")  # fmt: skip
    ratio = result["round_time_ratio_vs_fedavg"]
    table.add_row("round time ratio vs fedavg", f"{ratio:.2f} (target <= {TARGET_RATIO})", "")
    for label, key in (("wall", "import_"), ("CPU", "import_cpu_")):
        app, base = result[key + "s_client_app"], result[key + "s_torch_flwr"]
        table.add_row(
            f"import client.app / torch+flwr, {label} (median)",
            f"{app:.2f} / {base:.2f}",
            f"{result[key + 'overhead_s']:+.2f} (target <= {TARGET_IMPORT_OVERHEAD_S})",
        )
    return table


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    from core.superexec import check_task_poll_interval

    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 nodes, 3 rounds, 3 import runs")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per strategy (6)")
    parser.add_argument("--nodes", type=int, default=None, help="local SuperNodes (4)")
    parser.add_argument("--strategy", default="artemis", help="the fedsqueeze strategy")
    parser.add_argument("--task", default="synthetic-lsq")
    parser.add_argument("--round-timeout", type=_positive, default=300.0)
    parser.add_argument(
        "--superexec-poll-interval", type=float, default=DEFAULT_TASK_POLL_INTERVAL_S,
        help=f"the SuperNodes' {TASK_POLL_INTERVAL_ENV} "
        f"(default {DEFAULT_TASK_POLL_INTERVAL_S}; Flower's own is 1.0)",
    )  # fmt: skip
    parser.add_argument("--import-runs", type=int, default=None, help="fresh interpreters (5)")
    parser.add_argument(
        "--pairs", type=int, default=None,
        help="runs per strategy, in alternating order: FedAvg first, then fedsqueeze first, "
        "... (1 with --quick, else 2)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 6)
    nodes = args.nodes or (2 if args.quick else 4)
    import_runs = args.import_runs or (3 if args.quick else 5)
    pairs = args.pairs or (1 if args.quick else 2)
    if rounds < 2 or nodes < 1 or import_runs < 1 or pairs < 1:
        parser.error("need at least 2 rounds, 1 node, 1 import run and 1 pair")
    if args.strategy not in ALGORITHMS:
        parser.error(f"--strategy: unknown {args.strategy!r}; use one of {', '.join(ALGORITHMS)}")
    if args.strategy == FLWR_FEDAVG:
        parser.error(f"--strategy is the fedsqueeze side; {FLWR_FEDAVG} always runs beside it")
    try:
        check_task_poll_interval(args.superexec_poll_interval)
    except ValueError as exc:
        parser.error(f"--superexec-poll-interval: {exc}")
    console = Console(stderr=True)
    result = run_benchmark(rounds, nodes, args.strategy, args.task, args.round_timeout,
                           args.superexec_poll_interval, import_runs, console.print,
                           pairs)  # fmt: skip
    Console().print(_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
