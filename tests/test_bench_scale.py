"""benchmarks.scale: its --quick mode, run for real (the server half alone, one worker
process), and its planning of the full grid (what is skipped and why)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from benchmarks.scale import FULL_GRID, QUICK_EXTRA, QUICK_GRID, main, plan, select_grid

FIELDS = (
    "clients",
    "participation",
    "d",
    "pp_variant",
    "strategy",
    "rounds",
    "round_s",
    "round_s_cpu",
    "peak_rss_mb",
    "disk_bytes",
    "skipped_reason",
    "ns_per_coord",
    "ram_vectors",
    "store_on_disk",
)


@pytest.mark.slow  # 10 cases of 3-10 rounds at d = 2·10^4: 20-90 s on a loaded 2-core machine
def test_quick_mode_measures_every_case(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    assert main(["--quick", "--json", str(out), "--work-dir", str(tmp_path / "work")]) == 0
    result = json.loads(out.read_text())
    records = result["records"]
    want = {
        (n, p, d, pp)
        for d in QUICK_GRID["d"]
        for n in QUICK_GRID["clients"]
        for p in QUICK_GRID["participation"]
        for pp in QUICK_GRID["pp_variant"]
    } | {(n, p, d, pp) for n, p, d in QUICK_EXTRA for pp in QUICK_GRID["pp_variant"]}
    assert {(r["clients"], r["participation"], r["d"], r["pp_variant"]) for r in records} == want
    assert result["flower"] is None  # --quick runs no Flower simulation
    for r in records:
        assert set(FIELDS) <= set(r), r
        assert not r["skipped"] and r["skipped_reason"] == "", r
        assert r["rounds"] >= 3 and r["round_s"] > 0 and r["round_s_cpu"] > 0
        assert r["outcomes"] == {"ok": round(r["participants_total"])}, r  # every reply taken
        assert r["peak_rss_mb"] > 0 and r["memory_method"] in ("vmhwm", "ru_maxrss")
        spills = r["clients"] * r["d"] * 4 > 512 * 2**20  # the store's RAM budget
        assert r["store_on_disk"] == spills, r
        # a store on disk holds the rows of the clients seen: at least one round's
        assert (r["disk_bytes"] >= 4 * r["d"] * r["participants"]) if spills else True, r
        assert r["disk_bytes"] == 0 or spills, r
    # the spilled store keeps its RAM to its cache, not its rows (0.5 GB of them here)
    spilled = [r for r in records if r["store_on_disk"]]
    assert spilled and all(r["peak_extra_mb"] < 256 for r in spilled), spilled
    assert set(result["fits"]) == {"pp1", "pp2"}


def test_the_full_grid_skips_what_does_not_fit_and_says_why() -> None:
    cases = plan(FULL_GRID, (), ["artemis"], 10**9, free_ram=16 * 10**9, free_disk=70 * 10**9)
    assert len(cases) == 4 * 3 * 3 * 2
    by = {(c.clients, c.participation, c.d, c.pp_variant): c for c in cases}
    huge = by[10000, 0.01, 10**7, "pp1"]  # N·d·4 = 400 GB of memories
    assert huge.rounds == 0 and huge.skipped_reason.startswith(("disk", "time")), huge
    assert by[10000, 0.01, 10**7, "pp2"].skipped_reason  # PP2 keeps every h_i too
    small = by[10, 1.0, 2 * 10**4, "pp1"]
    assert small.skipped_reason == "" and small.rounds >= 3
    for c in cases:
        assert (c.rounds == 0) == bool(c.skipped_reason)
    no_disk = plan(FULL_GRID, (), ["artemis"], 10**9, free_ram=16 * 10**9, free_disk=10**9)
    spilled = [c for c in no_disk if c.clients * c.d * 4 > 512 * 2**20 and not c.skipped_reason]
    assert not spilled  # every store that would spill needs more disk than 1 GB


def test_bad_arguments_exit_2(capsys) -> None:
    assert main(["--quick", "--strategies", "fedmagic"]) == 2
    assert main(["--quick", "--timeout", "0"]) == 2
    assert "fedmagic" in capsys.readouterr().err
    for bad in (
        ["--clients", "10,ten"],
        ["--participation", "1.5"],
        ["--d", "2.5"],
        ["--pp-variant", "pp3"],
        ["--clients", ","],
    ):
        assert main(["--quick", *bad]) == 2, bad
    err = capsys.readouterr().err
    assert "'ten' is not a number" in err and "pp3" in err and "1.5 is not in (0, 1]" in err


def test_the_grid_can_be_narrowed_to_given_values() -> None:
    args = argparse.Namespace(clients="100, 1000", participation="0.1", d="1e6", pp_variant=None)
    grid = select_grid(FULL_GRID, args)
    assert grid["clients"] == (100, 1000) and grid["participation"] == (0.1,)
    assert grid["d"] == (10**6,) and grid["pp_variant"] == FULL_GRID["pp_variant"]
    cases = plan(grid, (), ["rand-mcm"], 10**9, free_ram=16 * 10**9, free_disk=70 * 10**9)
    assert {(c.clients, c.participation, c.d) for c in cases} == {
        (100, 0.1, 10**6),
        (1000, 0.1, 10**6),
    }
