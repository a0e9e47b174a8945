"""benchmarks.convergence: the bytes-to-target arithmetic (fast) and a real `--quick` run (slow)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks.convergence import (
    BASELINE,
    QUICK,
    Plan,
    RunCurve,
    parse_server_lrs,
    plan_runs,
    plateau,
    refused_runs,
    run_overrides,
    summarize,
)
from tasks.fashion_mnist import data_available

ROOT = Path(__file__).resolve().parents[1]
FIELDS = (
    "strategy",
    "server_opt",
    "server_lr",
    "participation",
    "seed_count",
    "target_accuracy",
    "bytes_to_target",
    "bytes_ratio_vs_fedavg",
    "rounds_to_target",
    "final_accuracy",
    "final_accuracy_std",
    "wall_s_to_target",
    "run_ids",
)


def _curve(
    strategy: str, seed: int, acc: list[float], per_round: int, p: float = 1.0,
    server_opt: str = "sgd", server_lr: float | None = None,
) -> RunCurve:  # fmt: skip
    return RunCurve(
        server_opt=server_opt,
        server_lr=server_lr,
        strategy=strategy,
        participation=p,
        seed=seed,
        status="finished",
        run_id=seed + 100,
        accuracy=list(acc),
        bytes=[per_round] * len(acc),
        uplink=[per_round // 2] * len(acc),
        downlink=[per_round - per_round // 2] * len(acc),
        elapsed=[float(i + 1) for i in range(len(acc))],
        wall_s=float(len(acc)),
    )


def test_target_is_99_percent_of_fedavgs_plateau_and_bytes_are_summed_to_it() -> None:
    fedavg = [0.5, 0.7, 0.8, 0.9, 0.9, 0.9, 0.9]
    curves = [
        _curve(BASELINE, 0, fedavg, 1000),
        _curve(BASELINE, 1, fedavg, 1000),
        # seed-mean curve 0.4, 0.6, 0.8, 0.895, 0.9, ...: reaches 0.891 in round 4
        _curve("artemis", 0, [0.4, 0.6, 0.8, 0.89, 0.9, 0.9, 0.92], 30),
        _curve("artemis", 1, [0.4, 0.6, 0.8, 0.90, 0.9, 0.9, 0.88], 30),
        _curve("dore", 0, [0.1] * 7, 30),  # never gets there
    ]
    records = {r["strategy"]: r for r in summarize(curves)}
    base = records[BASELINE]
    plateau_acc = 0.9  # the last 3 rounds (window = len // 2)
    assert base["target_accuracy"] == pytest.approx(0.99 * plateau_acc)
    assert base["rounds_to_target"] == 4 and base["bytes_to_target"] == 4000
    assert base["bytes_ratio_vs_fedavg"] == pytest.approx(1.0)
    a = records["artemis"]
    for name in FIELDS:
        assert name in a
    assert a["seed_count"] == 2 and a["run_ids"] == [100, 101]
    assert a["rounds_to_target"] == 4
    assert a["rounds_to_target_per_seed"] == [5, 4]  # 0.89 < 0.891 for seed 0
    assert a["bytes_to_target"] == 120
    assert a["bytes_ratio_vs_fedavg"] == pytest.approx(0.03)
    assert a["wall_s_to_target"] == pytest.approx(4.0)
    assert a["final_accuracy"] == pytest.approx(0.90)
    assert a["final_accuracy_std"] == pytest.approx(0.02828, abs=1e-4)
    assert a["target_met"] is True  # 0.03 <= 1/16
    d = records["dore"]
    assert d["reached"] is False and d["bytes_to_target"] is None
    assert d["bytes_ratio_vs_fedavg"] is None and "target_met" not in d


def test_plateau_check() -> None:
    rising = [i / 100 for i in range(40)]
    last, gain = plateau(rising, window=10)
    assert last == pytest.approx(0.345) and gain == pytest.approx(0.10)
    flat = [0.5] * 20 + [0.8] * 20
    assert plateau(flat, window=10) == (pytest.approx(0.8), pytest.approx(0.0))


def test_plan_puts_seeds_outermost_and_fedavg_and_the_targeted_strategies_first() -> None:
    plans = plan_runs(["sgd", "artemis", BASELINE, "rand-mcm"], QUICK, first_seed=4)
    assert [(p.strategy, p.participation, p.seed) for p in plans] == [
        (BASELINE, 1.0, 4),
        ("artemis", 1.0, 4),
        ("rand-mcm", 1.0, 4),
        (BASELINE, 0.5, 4),
        ("artemis", 0.5, 4),
        ("rand-mcm", 0.5, 4),
        ("sgd", 1.0, 4),
        ("sgd", 0.5, 4),
    ]


def test_each_server_optimiser_is_its_own_record_against_the_same_fedavg_target() -> None:
    fedavg = [0.5, 0.7, 0.8, 0.9, 0.9, 0.9, 0.9]
    curves = [
        _curve(BASELINE, 0, fedavg, 1000),
        _curve("artemis", 0, [0.4, 0.6, 0.8, 0.9, 0.9, 0.9, 0.9], 30, server_lr=0.05),
        _curve("artemis", 0, [0.9] * 7, 30, server_opt="adam", server_lr=0.01),
        _curve("artemis", 0, [0.1] * 7, 30, server_opt="adam", server_lr=0.1),
    ]
    records = summarize(curves)
    assert [(r["strategy"], r["server_opt"], r["server_lr"]) for r in records] == [
        (BASELINE, "sgd", None),
        ("artemis", "sgd", 0.05),
        ("artemis", "adam", 0.01),
        ("artemis", "adam", 0.1),
    ]
    assert len({r["target_accuracy"] for r in records}) == 1
    assert [r["rounds_to_target"] for r in records] == [4, 4, 1, None]
    assert records[2]["bytes_ratio_vs_fedavg"] == pytest.approx(30 / 4000)
    assert records[3]["reached"] is False and "target_met" not in records[3]


def test_plan_runs_every_strategy_with_every_server_optimiser_but_the_refused_ones() -> None:
    lrs = parse_server_lrs(
        ["adam=0.003", "signsgd-mv=0.001/0.01", "artemis:adam=0.01"],
        ["artemis", "sgd", "signsgd-mv"],
        ("sgd", "momentum", "adam", "amsgrad", "yogi"),
    )
    assert lrs == {"adam": [0.003], "signsgd-mv": [0.001, 0.01], "artemis:adam": [0.01]}
    one_p = replace(QUICK, participations=(1.0,))
    plans = plan_runs(["sgd", "signsgd-mv", "artemis"], one_p, 0, ["sgd", "adam"], lrs)
    assert [(p.strategy, p.server_opt, p.server_lr) for p in plans] == [
        (BASELINE, "sgd", None),  # FedAvg once, Flower's own: no server optimiser
        ("artemis", "sgd", None),
        ("artemis", "adam", 0.01),  # strategy:optimiser beats the optimiser's key
        ("sgd", "sgd", None),
        ("sgd", "adam", 0.003),
        ("signsgd-mv", "sgd", 0.001),  # a sweep: one run per γ
        ("signsgd-mv", "sgd", 0.01),
    ]  # signsgd-mv × adam is refused: the 1-bit broadcast drops adam's scaling
    refused = refused_runs(["sgd", "signsgd-mv", "artemis", BASELINE], ["sgd", "adam"])
    assert [(r["strategy"], r["server_opt"]) for r in refused] == [("signsgd-mv", "adam")]
    assert "sign" in refused[0]["reason"]
    assert plans[5].gamma(one_p) == 0.001 and plans[1].gamma(one_p) == one_p.client_lr
    assert plans[0].gamma(one_p) is None


def test_run_config_names_the_server_optimiser_and_leaves_the_default_runs_unchanged() -> None:
    default = run_overrides(Plan("artemis", 1.0, 0), QUICK, "")
    assert "server-opt" not in default and "server-lr" not in default
    assert default["run-name"] == "convergence artemis p=1 seed=0"
    adam = run_overrides(Plan("artemis", 1.0, 0, "adam", 0.01), QUICK, "")
    assert adam["server-opt"] == "adam" and adam["server-lr"] == 0.01
    assert adam["run-name"] == "convergence artemis p=1 seed=0 server-opt=adam server-lr=0.01"


@pytest.mark.parametrize(
    "args",
    [
        ["--seeds", "0"],
        ["--rounds", "x"],
        ["--strategies", "nope"],
        ["--participations", "2"],
        ["--server-opts", "sgd,nope"],
        ["--server-lr", "adam=0"],
        ["--server-lr", "adam=x"],
        ["--server-lr", "nope=0.1"],
        ["--server-lr", f"{BASELINE}=0.1"],
        ["--server-lr", "artemis:nope=0.1"],
    ],
)
def test_bad_arguments_exit_2_before_anything_starts(args: list[str]) -> None:
    from benchmarks.convergence import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2


@pytest.mark.slow
@pytest.mark.skipif(not data_available(), reason="Fashion-MNIST IDX files missing")
def test_quick_benchmark_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "convergence.json"
    db = tmp_path / "store.db"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.convergence",
            "--quick",
            # one extra optimiser (adam, tuned γ) beside the default sgd
            "--server-opts",
            "sgd,adam",
            "--server-lr",
            "adam=0.01",
            "--json",
            str(out),
            "--database-url",
            f"sqlite:///{db}",
            "--figure",
            str(tmp_path / "fig"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "FEDSQUEEZE_HOME": str(tmp_path / "fsq-home")},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    records = json.loads(out.read_text())
    runs = [(BASELINE, "sgd"), *((s, o) for s in ("artemis", "rand-mcm") for o in ("sgd", "adam"))]
    assert {(r["strategy"], r["server_opt"], r["participation"]) for r in records} == {
        (s, opt, p) for s, opt in runs for p in (1.0, 0.5)
    }
    for r in records:
        assert (
            r["server_lr"]
            == {BASELINE: None, "sgd": QUICK.client_lr, "adam": 0.01}[
                BASELINE if r["strategy"] == BASELINE else r["server_opt"]
            ]
        )
        assert r["refused_runs"] == []
    for r in records:
        for name in FIELDS:
            assert name in r, (r["strategy"], name)
        assert r["seed_count"] == 1 and r["rounds"] == QUICK.rounds
        assert r["complete"] is True
        assert 0.0 < r["target_accuracy"] <= 1.0
        assert 0.0 <= r["final_accuracy"] <= 1.0
        assert r["total_bytes"] > 0
        assert len(r["run_ids"]) == 1 and isinstance(r["run_ids"][0], int)
        if r["strategy"] == BASELINE:
            assert r["reached"] and r["bytes_ratio_vs_fedavg"] == pytest.approx(1.0)
        elif r["reached"]:  # compressed: far fewer bytes than float32 FedAvg
            assert 0 < r["bytes_ratio_vs_fedavg"] < 0.25, r
    # every run is in the store, with all its rounds
    run_ids = sorted(r["run_ids"][0] for r in records)
    with sqlite3.connect(db) as con:
        stored = con.execute("select id from runs order by id").fetchall()
        counts = con.execute("select run_id, count(*) from rounds group by run_id").fetchall()
    assert [i for (i,) in stored] == run_ids
    assert {n for _, n in counts} == {QUICK.rounds}
    assert "p = 1" in done.stderr and "[10/10]" in done.stderr  # table and progress lines
    assert "artemis adam γ=0.01" in done.stderr
    # the optimiser is in each stored run's name and config
    with sqlite3.connect(db) as con:
        configs = [json.loads(c) for (c,) in con.execute("select config from runs")]
    adam = [c for c in configs if c["server-opt"] == "adam"]
    assert len(adam) == 4 and all(c["server-lr"] == 0.01 for c in adam), configs
    assert all(c["run-name"].endswith(" server-opt=adam server-lr=0.01") for c in adam)
    # one figure per p, a line per strategy, drawn from the store
    for label in ("p1", "p0.5"):
        svg = (tmp_path / "fig" / f"convergence-{label}.svg").read_text()
        for run_id in (r["run_ids"][0] for r in records if f"p{r['participation']:g}" == label):
            assert f'id="run-{run_id}"' in svg, (label, run_id)
