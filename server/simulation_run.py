"""One simulation on a local SuperLink: what to run, following it to the end, what it measured.

`run_one` submits a `RunSpec` (``flwr run``), follows the run's log (`LogFollower`) and its
recorded rounds (`make_watcher`), samples its server's memory (`ServerMemorySampler`), and
returns a `SimulationResult`; a progress callback sees the rounds as they land.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core.runconfig import STORE_URL_ENV
from server.app_dir import AppInfo, ConfigValue
from server.local_superlink import LocalSuperLink
from server.log_follower import LogFollower
from server.memory_sampler import ServerMemorySampler
from server.store_watchers import RoundRow, make_watcher


@dataclass
class RunSpec:
    """One simulation to run: a label and its checked run-config overrides."""

    label: str
    overrides: dict[str, ConfigValue]
    num_supernodes: int
    cpus_per_client: int = 1
    timeout_s: float = 0.0  # 0 = no limit


@dataclass
class SimulationResult:
    """What one simulation did, as measured."""

    label: str
    flower_run_id: int
    status: str
    store_run_id: int | None
    rounds: list[RoundRow]
    num_rounds: int
    wall_s: float
    server_peak_rss_mb: float | None
    log_path: str
    overrides: dict[str, ConfigValue]
    store_status: str | None = None
    #: what the ServerApp recorded about the run: resolved compressor specs, model size
    run_facts: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed"

    @property
    def final(self) -> RoundRow | None:
        return self.rounds[-1] if self.rounds else None

    @property
    def uplink_bytes(self) -> int:
        return sum(r.uplink_bytes for r in self.rounds)

    @property
    def downlink_bytes(self) -> int:
        return sum(r.downlink_bytes for r in self.rounds)

    @property
    def final_accuracy(self) -> float | None:
        for row in reversed(self.rounds):
            if row.eval_accuracy is not None:
                return row.eval_accuracy
        return None

    @property
    def final_eval_loss(self) -> float | None:
        for row in reversed(self.rounds):
            if row.eval_loss is not None:
                return row.eval_loss
        return None

    @property
    def mean_round_s(self) -> float | None:
        times = [r.seconds for r in self.rounds if r.seconds is not None]
        return sum(times) / len(times) if times else None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            ok=self.ok,
            uplink_bytes=self.uplink_bytes,
            downlink_bytes=self.downlink_bytes,
            final_accuracy=self.final_accuracy,
            final_eval_loss=self.final_eval_loss,
            mean_round_s=self.mean_round_s,
        )
        return data


ProgressCallback = Callable[[int, RoundRow | None], None]


def run_one(
    superlink: LocalSuperLink,
    app: AppInfo,
    spec: RunSpec,
    log_dir: Path,
    on_progress: ProgressCallback | None = None,
    poll_interval: float = 0.5,
) -> SimulationResult:
    """Submit one run to `superlink`, follow it to the end, and collect its rounds.

    `on_progress(rounds_done, latest_recorded_round)` is called as rounds land. On Ctrl-C
    the run is stopped on the SuperLink and KeyboardInterrupt propagates.
    """
    merged = {**app.run_config, **spec.overrides}
    num_rounds = int(merged.get("num-server-rounds", 0) or 0)
    # the store the ServerApp records into: the one its environment names (never the run
    # config, see server.config.REFUSED_KEYS), else the default one
    database_url = superlink.env().get(STORE_URL_ENV) or None
    federation: dict[str, int | float | bool | str] = {
        "num-supernodes": spec.num_supernodes,
        "client-resources-num-cpus": spec.cpus_per_client,
    }
    memory = ServerMemorySampler(superlink.pid)
    started = time.monotonic()
    run_id = superlink.submit(app.path, spec.overrides, federation)
    memory.start()
    log_path = log_dir / f"run-{spec.label}-{run_id}.log"
    follower = LogFollower(superlink, run_id, log_path)
    watcher = make_watcher(database_url, run_id)
    status = "running"
    last_done = -1
    try:
        while True:
            new = watcher.poll()
            recorded = max(watcher.rounds) if watcher.rounds else 0
            done = max(recorded, follower.latest_round)
            if on_progress is not None and (new or done != last_done):
                latest = watcher.rounds[max(watcher.rounds)] if watcher.rounds else None
                on_progress(done, latest)
                last_done = done
            if follower.done():
                status = superlink.status(run_id)
                if status.startswith("finished"):
                    break
                # the log stream ended early: poll the run's status instead
                time.sleep(1.0)
                continue
            if spec.timeout_s and time.monotonic() - started > spec.timeout_s:
                superlink.stop_run(run_id)
                status = "timeout"
                break
            time.sleep(poll_interval)
    except KeyboardInterrupt:
        # the interrupt is what the user asked for: a `flwr stop` that fails or times out
        # (a loaded machine) must not replace it; the SuperLink is stopped next anyway
        try:
            superlink.stop_run(run_id)
        except Exception as exc:  # reported; the interrupt goes on
            logging.getLogger(__name__).warning("stopping run %s: %s", run_id, exc)
        raise
    finally:
        follower.stop()
        memory.sample()
        memory.stop()
    # the last round lands in the store just before the run ends; read what is left
    deadline = time.monotonic() + 5.0
    while True:
        watcher.poll()
        if watcher.run_status not in (None, "running") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    rounds = [watcher.rounds[k] for k in sorted(watcher.rounds)]
    if on_progress is not None:
        finished_all = num_rounds if status == "finished:completed" else 0
        done = max([r.round for r in rounds] + [follower.latest_round, finished_all])
        on_progress(done, rounds[-1] if rounds else None)
    return SimulationResult(
        label=spec.label,
        flower_run_id=run_id,
        status=status,
        store_run_id=watcher.store_run_id,
        rounds=rounds,
        num_rounds=num_rounds,
        wall_s=time.monotonic() - started,
        server_peak_rss_mb=memory.peak_mb,
        log_path=str(log_path),
        overrides=dict(spec.overrides),
        store_status=watcher.run_status,
        run_facts=dict(watcher.run_facts),
    )
