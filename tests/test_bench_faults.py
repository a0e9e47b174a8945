"""benchmarks.faults: its --quick mode, run for real (one memory algorithm, every fault)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.faults import main
from strategies.local import FAULT_KINDS

FIELDS = (
    "strategy",
    "pp_variant",
    "fault",
    "rate",
    "rounds_completed",
    "rejected",
    "resyncs",
    "final_loss_ratio",
)


@pytest.mark.slow  # 14 runs of 30 rounds: 30-70 s on a loaded 2-core machine
def test_quick_mode_survives_every_fault(tmp_path: Path) -> None:
    out = tmp_path / "faults.json"
    assert main(["--quick", "--strategies", "diana", "--json", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert {(r["pp_variant"], r["fault"]) for r in runs} == {
        (pp, kind) for pp in ("pp1", "pp2") for kind in ("none", *FAULT_KINDS)
    }
    by = {(r["pp_variant"], r["fault"]): r for r in runs}
    for r in runs:
        assert set(FIELDS) <= set(r)
        assert r["rounds_completed"] == r["rounds"] and not r["error"], r
        if r["fault"] == "none":
            assert r["rate"] == 0 and r["final_loss_ratio"] == 1.0
            continue
        assert r["rate"] == 0.3 and r["faults_injected"] > 0
        assert r["final_loss_ratio"] <= 1.5, r  # the target
    for pp in ("pp1", "pp2"):
        # hostile and stale replies are refused, lost state is resynchronised
        for kind in ("corrupt", "crafted"):
            assert by[pp, kind]["rejected"] == by[pp, kind]["faults_injected"] > 0
        assert by[pp, "late"]["rejected"] > 0  # (a reply late in the last round never comes)
        assert by[pp, "state-loss"]["resyncs"] > 0
        assert by[pp, "crash"]["rejected"] == 0 and by[pp, "lost"]["rejected"] == 0


def test_bad_arguments_exit_2(capsys) -> None:
    assert main(["--quick", "--rates", "2"]) == 2
    assert main(["--quick", "--faults", "meteor"]) == 2
    assert "meteor" in capsys.readouterr().err
