"""benchmarks.store: bad options exit 2; a real `--quick` run writes every field (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import postgres_reachable

ROOT = Path(__file__).resolve().parents[1]
APPEND_FIELDS = {"section", "backend", "writers", "append_rounds_per_s", "cpu_ms_per_round",
                 "server_cpu_ms_per_round", "durable_commits_per_s", "rounds",
                 "target_rounds_per_s", "meets_target", "load_average"}  # fmt: skip
READ_FIELDS = {"section", "backend", "client_rounds", "rounds", "seed_s", "backfill_s", "read",
               "nodes", "repeats", "identical", "grouped_p50_ms", "grouped_p99_ms",
               "counters_p50_ms", "counters_p99_ms", "speedup_p50", "load_average"}  # fmt: skip


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "benchmarks.store", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip


@pytest.mark.parametrize(
    "args", [["--backends", "mysql"], ["--sections", "nope"], ["--client-rounds", "5"]]
)
def test_bad_options_exit_2(args: list[str]) -> None:
    got = run("--quick", *args)
    assert got.returncode == 2, got.stderr
    assert "benchmarks.store" in got.stderr


@pytest.mark.slow
def test_quick_run_writes_every_field(tmp_path: Path) -> None:
    backends = ["sqlite", "postgresql"] if postgres_reachable() else ["sqlite"]
    out = tmp_path / "store.json"
    got = run("--quick", "--backends", ",".join(backends), "--json", str(out))
    assert got.returncode == 0, got.stdout + got.stderr
    records = json.loads(out.read_text())
    appends = [r for r in records if r["section"] == "appends"]
    reads = [r for r in records if r["section"] == "participation"]
    assert {(r["backend"], r["writers"]) for r in appends} == {
        (b, w) for b in backends for w in (1, 4)
    }
    assert {(r["backend"], r["read"]) for r in reads} == {
        (b, read) for b in backends for read in ("page of 100 nodes", "one node")
    }
    for r in appends:
        assert set(r) >= APPEND_FIELDS and r["rounds"] == 200 * r["writers"]
        gated = (r["backend"], r["writers"]) == ("postgresql", 1)
        assert (r["target_rounds_per_s"] is not None) == gated
        if r["backend"] == "postgresql":  # the server runs on this host in CI and here
            assert r["server_cpu_ms_per_round"] > 0 and r["durable_commits_per_s"] > 0
        else:
            assert r["server_cpu_ms_per_round"] is None is r["durable_commits_per_s"]
    for r in reads:
        assert set(r) >= READ_FIELDS
        assert r["client_rounds"] == 100_000 and r["identical"] is True
    assert "appends: rounds of 20 client-rounds" in got.stdout
