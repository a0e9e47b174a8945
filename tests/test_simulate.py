"""`fedsqueeze simulate`: run-config handling (fast) and real simulations on a SuperLink (slow)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from flwr.common.config import parse_config_args

from core.flower_env import terminate_then_kill
from core.records import RoundRecord, RunInfo
from server.app_dir import (
    AppInfo,
    SimulationError,
    check_overrides,
    parse_raw_overrides,
    read_app,
    run_config_arg,
    toml_value,
)
from server.flwr_connection import CONNECTION_NAME
from server.local_superlink import LocalSuperLink
from server.recording import JsonlRecorder
from server.simulate import build_specs
from server.store_watchers import JsonlWatcher, StoreWatcher, make_watcher

ROOT = Path(__file__).resolve().parents[1]
FEDSQUEEZE = str(Path(sys.executable).with_name("fedsqueeze"))


def _app(**config: bool | int | float | str) -> AppInfo:
    return AppInfo(path=ROOT, run_config=dict(config), num_supernodes=20)


# ----------------------------------------------------------------------------- fast


def test_raw_overrides_parse_toml_values_and_bare_words() -> None:
    parsed = parse_raw_overrides(
        [
            "strategy='artemis' num-server-rounds=5",
            'uplink="qsgd:s=1,bucket=4096" up-ef=true',
            "device=cpu participation=0.5",
        ]
    )
    assert parsed == {
        "strategy": "artemis",
        "num-server-rounds": 5,
        "uplink": "qsgd:s=1,bucket=4096",
        "up-ef": True,
        "device": "cpu",
        "participation": 0.5,
    }
    with pytest.raises(SimulationError, match="key=value"):
        parse_raw_overrides(["strategy artemis"])


@pytest.mark.parametrize(
    "value",
    [
        True,
        False,
        0,
        -3,
        12345678901,
        0.5,
        1e-7,
        -2.0,
        "",
        "qsgd:s=1,bucket=4096",
        "it's",
        'say "hi"',
        "sqlite:////tmp/a b.db",
    ],
)
def test_values_survive_flowers_own_run_config_parser(value: bool | int | float | str) -> None:
    """What simulate writes is read back by flwr's parser (the one `flwr run -c` uses)."""
    arg = run_config_arg({"key": value, "other": 1})
    assert parse_config_args([arg]) == {"key": value, "other": 1}


def test_unrepresentable_strings_are_refused() -> None:
    with pytest.raises(SimulationError, match="quote"):
        toml_value("both ' and \" quotes")
    with pytest.raises(SimulationError, match="finite"):
        toml_value(float("nan"))


def test_overrides_are_checked_against_the_apps_keys_and_types() -> None:
    defaults: dict[str, bool | int | float | str] = {
        "strategy": "artemis",
        "num-server-rounds": 3,
        "participation": 1.0,
        "up-ef": False,
    }
    assert check_overrides(defaults, {"participation": 1, "num-server-rounds": 7}) == {
        "participation": 1.0,
        "num-server-rounds": 7,
    }
    with pytest.raises(
        SimulationError, match=r"unknown run-config key 'rounds'.*num-server-rounds"
    ):
        check_overrides(defaults, {"rounds": 3})
    with pytest.raises(SimulationError, match="expected a int"):
        check_overrides(defaults, {"num-server-rounds": 2.5})
    with pytest.raises(SimulationError, match="expected a str"):
        check_overrides(defaults, {"strategy": 3})
    with pytest.raises(SimulationError, match="expected a bool"):
        check_overrides(defaults, {"up-ef": 1})


def test_read_app_of_this_repository() -> None:
    app = read_app(ROOT)
    assert app.path == ROOT
    for key in ("strategy", "uplink", "downlink", "num-server-rounds", "participation", "task"):
        assert key in app.run_config
    assert app.num_supernodes == 20


def test_read_app_refuses_a_directory_that_is_no_flower_app(tmp_path: Path) -> None:
    with pytest.raises(SimulationError, match=r"no pyproject\.toml"):
        read_app(tmp_path)
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n')
    with pytest.raises(SimulationError, match=r"no \[tool.flwr.app\]"):
        read_app(tmp_path)


def test_build_specs_one_run_per_strategy_with_shared_flags() -> None:
    app = _app(strategy="artemis", **{"num-server-rounds": 3, "num-partitions": -1, "seed": 0})
    specs = build_specs(
        app,
        ["artemis", "sgd", "artemis"],
        {"rounds": 4, "seed": None},
        ["seed=7"],
        clients=6,
        cpus_per_client=1,
        timeout_s=0,
    )
    assert [s.label for s in specs] == ["artemis", "sgd"]
    assert specs[1].overrides == {
        "num-server-rounds": 4,
        "seed": 7,
        "num-partitions": 6,
        "strategy": "sgd",
    }
    assert all(s.num_supernodes == 6 for s in specs)
    # no --strategy: one run with the app's default, federation size from the app
    (single,) = build_specs(app, [], {}, [], None, 1, 0)
    assert single.label == "artemis" and single.num_supernodes == 20
    with pytest.raises(SimulationError, match="--batch-size: this app has no run-config key"):
        build_specs(app, [], {"batch_size": 8}, [], None, 1, 0)


def test_cli_reports_bad_input_clearly() -> None:
    done = subprocess.run(
        [FEDSQUEEZE, "simulate", "-c", "no-such-key=1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "unknown run-config key 'no-such-key'" in done.stderr


def test_missing_dataset_is_reported_before_anything_starts(tmp_path: Path) -> None:
    done = subprocess.run(
        [FEDSQUEEZE, "simulate", "--task", "fashion-mnist", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "300"},
    )
    assert done.returncode == 2
    assert "apt-get install dataset-fashion-mnist" in done.stderr
    assert "SuperLink" not in done.stdout + done.stderr


def test_jsonl_history_is_followed_for_one_flower_run(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"

    def info(flower_run_id: int) -> RunInfo:
        return RunInfo("artemis", "qsgd:s=1", "qsgd:s=1", "t", {}, flower_run_id, num_parameters=9)

    earlier = JsonlRecorder(path)
    rid = earlier.start_run(info(111))
    earlier.record_round(rid, RoundRecord(1, 2, 2, 0, 10, 20, 10, 20))
    earlier.finish_run(rid, "finished")
    watcher = JsonlWatcher(path, flower_run_id=222)
    assert watcher.poll() == [] and watcher.store_run_id is None
    ours = JsonlRecorder(path)
    rid = ours.start_run(info(222))
    ours.record_round(rid, RoundRecord(1, 3, 3, 0, 30, 60, 30, 60, train_loss=0.5))
    (row,) = watcher.poll()
    assert (row.round, row.uplink_bytes, row.train_loss) == (1, 30, 0.5)
    assert row.seconds is not None and row.seconds >= 0
    assert watcher.run_facts["num_parameters"] == 9
    ours.record_round(rid, RoundRecord(2, 3, 2, 1, 20, 60, 20, 60, eval_accuracy=0.7))
    ours.finish_run(rid, "finished")
    (row,) = watcher.poll()
    assert (row.round, row.failed, row.eval_accuracy) == (2, 1, 0.7)
    assert watcher.run_status == "finished"
    later = JsonlRecorder(path)  # a later run in the same file, same recorder-local id
    later.record_round(later.start_run(info(333)), RoundRecord(3, 1, 1, 0, 1, 1, 1, 1))
    assert watcher.poll() == []
    assert sorted(watcher.rounds) == [1, 2]


def test_store_history_is_followed_for_one_flower_run(tmp_path: Path) -> None:
    """The same as above from a real SQLite store, as the ServerApp's SqlRecorder writes it."""
    from api.store import SqlRecorder

    url = f"sqlite:///{tmp_path / 'runs.db'}"
    recorder = SqlRecorder(url)
    other = recorder.start_run(
        RunInfo("sgd", "none", "none", "t", {}, flower_run_id=111, num_parameters=9)
    )
    recorder.record_round(other, RoundRecord(1, 2, 2, 0, 10, 20, 10, 20))
    watcher = make_watcher(url, flower_run_id=222)
    assert isinstance(watcher, StoreWatcher)
    assert watcher.poll() == [] and watcher.store_run_id is None
    rid = recorder.start_run(
        RunInfo("artemis", "qsgd:s=1", "qsgd:s=1", "t", {}, flower_run_id=222, num_parameters=9)
    )
    recorder.record_round(rid, RoundRecord(1, 3, 3, 0, 30, 60, 30, 60, train_loss=0.5))
    (row,) = watcher.poll()
    assert watcher.store_run_id == rid and watcher.run_status == "running"
    assert (row.round, row.uplink_bytes, row.train_loss) == (1, 30, 0.5)
    assert row.seconds is not None and row.seconds >= 0
    assert watcher.run_facts["num_parameters"] == 9
    recorder.record_round(rid, RoundRecord(2, 3, 2, 1, 20, 60, 20, 60, eval_accuracy=0.7))
    recorder.finish_run(rid, "finished")
    (row,) = watcher.poll()
    assert (row.round, row.failed, row.eval_accuracy) == (2, 1, 0.7)
    assert watcher.run_status == "finished" and sorted(watcher.rounds) == [1, 2]


# ----------------------------------------------------------------------------- slow


def _gone(pid: int) -> bool:
    try:
        proc = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return True
    return proc.status() == psutil.STATUS_ZOMBIE


@pytest.mark.slow
def test_local_superlink_starts_answers_and_stops(tmp_path: Path) -> None:
    link = LocalSuperLink(tmp_path / "flwr-home")
    try:
        link.start()
        assert link.healthy()
        assert link.pid is not None
        pid = link.pid
        config = (tmp_path / "flwr-home" / "config.toml").read_text()
        assert f'address = "127.0.0.1:{link.port}"' in config
        assert f'default = "{CONNECTION_NAME}"' in config
        listed = link.flwr(["ls", CONNECTION_NAME, "--format", "json"])
        assert listed.returncode == 0, listed.stderr
        assert json.loads(listed.stdout[listed.stdout.find("{") :])["runs"] == []
    finally:
        link.stop()
    assert _gone(pid)
    assert not link.healthy()


def _simulate_env(tmp_path: Path) -> dict[str, str]:
    env = os.environ.copy()
    env["FEDSQUEEZE_HOME"] = str(tmp_path / "fsq-home")
    env.pop("DATABASE_URL", None)
    env["COLUMNS"] = "160"
    return env


@pytest.mark.slow
def test_simulate_runs_two_strategies_with_a_users_task(tmp_path: Path) -> None:
    """A real simulation on a real SuperLink, with the example task of the docs
    (docs/running-simulations.md)."""
    out = tmp_path / "results.json"
    db = tmp_path / "runs.db"
    done = subprocess.run(
        [
            FEDSQUEEZE,
            "simulate",
            "--strategy", "artemis",
            "--strategy", "sgd",
            "--task", "examples.my_task:make_task",
            "--rounds", "2",
            "--clients", "4",
            "--participation", "0.5",
            "--database-url", f"sqlite:///{db}",
            "--timeout", "300",
            "--json", str(out),
            "--no-progress",
        ],
        cwd=ROOT,
        env=_simulate_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(out.read_text())
    assert [r["label"] for r in results] == ["artemis", "sgd"]
    for r in results:
        assert r["status"] == "finished:completed"
        assert [row["round"] for row in r["rounds"]] == [1, 2]
        assert r["store_run_id"] is not None
        assert r["uplink_bytes"] > 0 and r["downlink_bytes"] > 0
        assert r["final_accuracy"] is not None and 0.0 <= r["final_accuracy"] <= 1.0
        assert r["overrides"]["task"] == "examples.my_task:make_task"
        assert r["server_peak_rss_mb"] is not None and r["server_peak_rss_mb"] > 50
    # artemis compresses both ways; plain sgd sends float32 both ways
    artemis, sgd = results
    assert artemis["uplink_bytes"] < sgd["uplink_bytes"]
    # the SuperLink it started is gone, and so is the temporary FLWR_HOME
    pid = int(re.search(r"\(pid (\d+)\)", done.stdout).group(1))  # type: ignore[union-attr]
    assert _gone(pid)
    home = re.search(r"FLWR_HOME=(\S+)\)", done.stdout.replace("\n", ""))
    assert home is not None and not Path(home.group(1)).exists()
    assert "artemis" in done.stdout and "sgd" in done.stdout  # the comparison table


def _cmdline(proc: psutil.Process) -> str:
    """`proc`'s command line, or "" for a process that has exited (a zombie not yet reaped
    by its parent, or gone): the SuperLink's short-lived children come and go."""
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


@pytest.mark.slow
def test_ctrl_c_stops_the_run_and_the_superlink(tmp_path: Path) -> None:
    """A run that cannot finish on its own (10^9 rounds), interrupted once it is training:
    however slow the machine, the interrupt always arrives before the end."""
    log = tmp_path / "simulate.out"
    run_logs = tmp_path / "flwr-home" / "logs"
    with log.open("w") as fh:
        proc = subprocess.Popen(
            [
                FEDSQUEEZE,
                "simulate",
                "--task", "synthetic-lsq",
                "--rounds", "1000000000",
                "--clients", "3",
                "--database-url", f"sqlite:///{tmp_path / 'runs.db'}",
                "--flwr-home", str(tmp_path / "flwr-home"),  # kept after Ctrl-C: keep it here
                "--no-progress",
            ],
            cwd=ROOT,
            env=_simulate_env(tmp_path),
            stdout=fh,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    pid: int | None = None
    descendants: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            text = log.read_text()
            match = re.search(r"SuperLink up on \S+ \(pid (\d+)\)", text)
            if match:
                pid = int(match.group(1))
                # wait until the run's server process exists, then interrupt
                children = psutil.Process(pid).children(recursive=True)
                if any("flwr-simulation" in _cmdline(c) for c in children):
                    break
            time.sleep(0.5)
        assert pid is not None, log.read_text()
        descendants = psutil.Process(pid).children(recursive=True)

        def training() -> bool:  # the run's streamed log shows its first round
            return any(
                re.search(r"\bround 1: sampled", p.read_text(errors="replace"))
                for p in run_logs.glob("*.log")
            )

        deadline = time.monotonic() + 300
        while not training() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert training(), log.read_text()
        descendants = psutil.Process(pid).children(recursive=True) or descendants
        proc.send_signal(signal.SIGINT)
        # the stop path is bounded by its own timeouts (`flwr stop` 30 s, the log follower
        # 10 s, the SuperLink's process tree 10 + 10 + 3 + 5 s): about 70 s at most; a loaded
        # CI machine stretches each step (a timeout of 120 s here was once exceeded at load 10)
        assert proc.wait(timeout=300) == 130, log.read_text()
        assert _gone(pid)
        psutil.wait_procs(descendants, timeout=15)
        assert all(_gone(c.pid) for c in descendants)
        assert "interrupted" in log.read_text()
        assert list(run_logs.glob("run-*.log"))
    finally:
        # a failed run must not leave its SuperLink behind: SIGKILL on the command would
        # orphan it (its stop path never runs), so the tree found above is ended here too
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if pid is not None and not _gone(pid):
            family = [psutil.Process(pid)]
            with contextlib.suppress(psutil.Error):
                family += psutil.Process(pid).children(recursive=True)
            terminate_then_kill(family + list(descendants), 10.0)
