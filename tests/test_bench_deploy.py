"""benchmarks.deploy: a real `--quick` run (SuperLink, SuperNodes, both strategies)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.deploy import COMPONENTS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_benchmark_runs_both_strategies_on_the_same_nodes(tmp_path: Path) -> None:
    out = tmp_path / "deploy.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.deploy", "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, "FEDSQUEEZE_HOME": str(tmp_path / "fsq-home")},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    result = json.loads(out.read_text())
    nodes, rounds = result["nodes"], result["rounds"]
    assert (nodes, rounds) == (2, 3)
    assert result["order"] == ["flwr-fedavg", "artemis"] and len(result["load_average"]) == 4
    for side in ("fedsqueeze", "flwr_fedavg"):
        assert result[f"replied_{side}"] == [nodes] * rounds
        assert result[f"round_s_{side}"] > 0
        # every steady round's critical path was found in the SuperNodes' and ClientApps'
        # logs, and its parts add up to the round (what is left is small bookkeeping)
        assert result[f"breakdown_rounds_{side}"] == rounds - 1
        parts = result[f"breakdown_{side}"]
        assert set(COMPONENTS) <= set(parts)
        assert parts["client_training_s"] > 0 and parts["clientapp_start_s"] > 0
        # every train message of rounds 2..R logged its ClientApp's CPU time
        assert result[f"client_cpu_messages_{side}"] == nodes * (rounds - 1)
        assert result[f"client_cpu_{side}"]["startup_cpu_s"] > 0
        assert result[f"node_turnaround_s_{side}"] > 0
        assert sum(parts[c] for c in COMPONENTS) + parts["unexplained_s"] == pytest.approx(
            result[f"round_s_{side}"]
        )
    assert result["round_time_ratio_vs_fedavg"] == pytest.approx(
        result["round_s_fedsqueeze"] / result["round_s_flwr_fedavg"]
    )
    # artemis sends compact bytes where FedAvg sends float32 arrays
    assert result["uplink_bytes_fedsqueeze"] < result["uplink_bytes_flwr_fedavg"]
    assert result["import_s_client_app"] > 0 and result["import_s_torch_flwr"] > 0
    assert "round time ratio vs fedavg" in done.stdout  # the table
