"""benchmarks.api: the sweep's choice of a point (fast) and a real `--quick` run (slow)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.api import ENDPOINTS, P99_LIMIT_MS, summary

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("backend", "endpoint", "loadgen", "connections", "rate_rps", "p50_ms", "p99_ms")


def _point(c: int, rate: float, p99: float, errors: int = 0) -> dict[str, float]:
    return {
        "connections": c,
        "requests": 5 * rate,
        "rate_rps": rate,
        "p50_ms": p99 / 3,
        "p99_ms": p99,
        "errors": errors,
        "service_cpu_ms_per_request": 1.0,
        "load_average_1m": 1.0,
    }


def test_summary_takes_the_highest_rate_within_the_p99_limit() -> None:
    points = [_point(1, 100, 5), _point(2, 300, 20), _point(4, 250, 45), _point(8, 400, 80)]
    best = summary(points)
    assert (best["connections"], best["rate_rps"], best["meets_limit"]) == (2, 300, True)
    # a point with errors does not count, however fast
    best = summary([_point(1, 100, 5), _point(2, 900, 10, errors=3)])
    assert best["connections"] == 1
    # nor does one that finished no request within the run (wrk then reports p99 0)
    assert summary([_point(1, 0, 0)])["meets_limit"] is False


def test_summary_of_a_miss_shows_one_connection() -> None:
    best = summary([_point(1, 20, P99_LIMIT_MS + 1)])
    assert best["meets_limit"] is False
    assert best["rate_rps"] is None and best["connections"] is None
    assert best["p99_ms"] == P99_LIMIT_MS + 1 and best["rate_rps_1_connection"] == 20


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_quick_benchmark_writes_every_endpoint(tmp_path: Path) -> None:
    out = tmp_path / "api.json"
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    subprocess.run(
        [sys.executable, "-m", "benchmarks.api", "--quick", "--backends", "sqlite",
         "--json", str(out)],
        cwd=ROOT, env=env, check=True, timeout=600,
    )  # fmt: skip
    data = json.loads(out.read_text())
    results = data["results"]
    assert [r["endpoint"] for r in results] == list(ENDPOINTS)
    for r in results:
        for name in FIELDS:
            assert name in r, (r["endpoint"], name)
        assert r["backend"] == "sqlite" and r["loadgen"] == "wrk" and r["code"] == "current"
        assert r["p50_ms"] <= r["p99_ms"]
        assert (r["rate_rps"] is None) == (not r["meets_limit"])
    for p in data["points"]:
        assert p["requests"] > 0 and p["errors"] == 0, p
