"""benchmarks.rounds: the ratio arithmetic (fast) and a real `--quick` run (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.rounds import BASELINE, records_from
from server.simulation_run import SimulationResult
from server.store_watchers import RoundRow
from tasks.fashion_mnist import data_available

ROOT = Path(__file__).resolve().parents[1]
FIELDS = (
    "strategy",
    "uplink",
    "downlink",
    "round_s",
    "round_time_ratio_vs_fedavg",
    "uplink_bytes_ratio_vs_fedavg",
    "downlink_bytes_ratio_vs_fedavg",
    "final_accuracy",
    "server_peak_rss_mb",
)


def _result(label: str, seconds: list[float], up: int, down: int, acc: float) -> SimulationResult:
    rows = [
        RoundRow(round=i + 1, uplink_bytes=up, downlink_bytes=down, eval_accuracy=acc, seconds=s)
        for i, s in enumerate(seconds)
    ]
    return SimulationResult(
        label=label,
        flower_run_id=1,
        status="finished:completed",
        store_run_id=1,
        rounds=rows,
        num_rounds=len(rows),
        wall_s=sum(seconds),
        server_peak_rss_mb=400.0,
        log_path="-",
        overrides={},
        run_facts={"uplink_compressor": "qsgd:s=1", "downlink_compressor": "qsgd:s=1"},
    )


def test_ratios_are_against_fedavg_over_warm_rounds() -> None:
    base = _result(BASELINE, [20.0, 2.0, 2.0], up=1000, down=1000, acc=0.5)
    artemis = _result("artemis", [30.0, 2.1, 2.3], up=50, down=200, acc=0.45)
    records = records_from([base, artemis], {"clients": 20})
    by_name = {r["strategy"]: r for r in records}
    assert by_name[BASELINE]["round_time_ratio_vs_fedavg"] == pytest.approx(1.0)
    a = by_name["artemis"]
    for name in FIELDS:
        assert name in a
    assert a["round_s"] == pytest.approx(2.2)  # round 1 (client start-up) left out
    assert a["first_round_s"] == pytest.approx(30.0)
    assert a["round_time_ratio_vs_fedavg"] == pytest.approx(1.1)
    assert a["uplink_bytes_ratio_vs_fedavg"] == pytest.approx(0.05)
    assert a["downlink_bytes_ratio_vs_fedavg"] == pytest.approx(0.2)
    targets = a["targets"]
    assert targets["uplink_bytes_ratio_vs_fedavg"]["met"] is True  # 0.05 <= 1/16
    assert targets["downlink_bytes_ratio_vs_fedavg"]["met"] is False  # 0.2 > 1/8
    assert a["workload_clients"] == 20


@pytest.mark.slow
@pytest.mark.skipif(not data_available(), reason="Fashion-MNIST IDX files missing")
def test_quick_benchmark_writes_every_field(tmp_path: Path) -> None:
    out = tmp_path / "rounds.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.rounds",
            "--quick",
            # one strategy beside FedAvg: each is a Flower simulation of its own (Ray start-up
            # and all), and mcm / rand-mcm run in Flower simulations in test_simulation.py
            "--strategies",
            "artemis",
            "--no-progress",
            "--json",
            str(out),
            "--work-dir",
            str(tmp_path / "work"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "FEDSQUEEZE_HOME": str(tmp_path / "fsq-home")},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    records = json.loads(out.read_text())
    assert [r["strategy"] for r in records] == [BASELINE, "artemis"]
    for r in records:
        for name in FIELDS:
            assert r[name] is not None, (r["strategy"], name)
        assert r["status"] == "finished:completed"
        assert r["rounds"] == 2
        assert 0.0 <= r["final_accuracy"] <= 1.0
        assert r["server_peak_rss_mb"] > 50
    base = records[0]
    assert base["round_time_ratio_vs_fedavg"] == pytest.approx(1.0)
    assert base["uplink_bytes_ratio_vs_fedavg"] == pytest.approx(1.0)
    # compressed strategies send far fewer bytes than float32 FedAvg
    for r in records[1:]:
        assert r["uplink_bytes_ratio_vs_fedavg"] < 0.25, r
    assert "Rounds:" in done.stdout  # the table
