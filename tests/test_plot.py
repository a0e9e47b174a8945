"""`fedsqueeze plot` and `server.plot.plot_runs` on runs written through a real SQLite store:
the files exist (PNG and SVG) and the lines drawn are the stored rounds."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from api.store import Store, open_store
from core.records import RoundRecord, RunInfo
from server.plot import PlotError, plot_runs

ROOT = Path(__file__).resolve().parents[1]
START = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
SVG = "{http://www.w3.org/2000/svg}"


def _run(store: Store, strategy: str, name: str, rounds: int, seed: int) -> int:
    run_id = store.create_run(
        RunInfo(strategy, "sq:s=1", "sq:s=1", "synthetic-lsq",
                {"run-name": name, "participation": 0.5, "local-steps": 2}, started_at=START)
    )  # fmt: skip
    for k in range(1, rounds + 1):
        evaluated = k != 2  # round 2 has no evaluation: no point, but its bytes count
        store.append_round(
            run_id,
            RoundRecord(
                round=k, sampled=4, replied=4, failed=0,
                uplink_bytes=1000 * k + seed, downlink_bytes=3000 + 7 * seed,
                predicted_uplink_bytes=0, predicted_downlink_bytes=0,
                eval_loss=2.0 / (k + seed) if evaluated else None,
                eval_accuracy=1.0 - 1.0 / (k + 1 + seed) if evaluated else None,
                started_at=START + timedelta(seconds=10 * k - 5),
                ended_at=START + timedelta(seconds=10 * k + seed),
            ),
        )  # fmt: skip
    store.finish_run(run_id, "finished")
    return run_id


@pytest.fixture
def stored(tmp_path: Path) -> tuple[str, Store, list[int]]:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    store = open_store(url)
    ids = [_run(store, "artemis", "art-a", 5, 1), _run(store, "sgd", "plain", 4, 2)]
    return url, store, ids


def _expected(store: Store, run_id: int, x: str, y: str) -> tuple[list[float], list[float]]:
    """The points computed here from the stored rounds (REST-shaped pages of the store)."""
    run = store.get_run(run_id)
    rows = store.list_rounds(run_id, limit=1000).items
    xs, ys, total = [], [], 0
    for r in rows:
        total += r.uplink_bytes + r.downlink_bytes
        value = r.eval_loss if y == "loss" else r.eval_accuracy
        if value is None:
            continue
        xs.append({"round": r.round, "bytes": total,
                   "seconds": (r.ended_at - run.started_at).total_seconds()}[x])  # fmt: skip
        ys.append(value)
    return xs, ys


@pytest.mark.parametrize("x", ["round", "bytes", "seconds"])
@pytest.mark.parametrize("y", ["loss", "accuracy"])
def test_lines_are_the_stored_rounds(
    stored: tuple[str, Store, list[int]], tmp_path: Path, x: str, y: str
) -> None:
    url, store, ids = stored
    out = tmp_path / f"{x}-{y}.png"
    # one run by id, the other by its run-name
    fig = plot_runs(url, [str(ids[0]), "plain"], x=x, y=y, out=out)
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    ax = fig.axes[0]
    lines = [ln for ln in ax.get_lines() if ln.get_gid()]
    assert [ln.get_gid() for ln in lines] == [f"run-{i}" for i in ids]
    for line, run_id in zip(lines, ids, strict=True):
        xs, ys = _expected(store, run_id, x, y)
        assert len(xs) == (5 if run_id == ids[0] else 4) - 1  # round 2 has no evaluation
        assert np.asarray(line.get_xdata(), dtype=float).tolist() == pytest.approx(xs)
        assert np.asarray(line.get_ydata(), dtype=float).tolist() == pytest.approx(ys)
    assert ax.get_xscale() == ("log" if x == "bytes" else "linear")
    legend = ax.get_legend()
    assert legend is not None
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels[0] == "art-a: artemis (up sq:s=1, down sq:s=1, p=0.5, K=2)"
    assert labels[1].startswith("plain: sgd")


def test_svg_holds_one_path_per_run_with_a_vertex_per_point(
    stored: tuple[str, Store, list[int]], tmp_path: Path
) -> None:
    url, store, ids = stored
    out = tmp_path / "acc.svg"
    plot_runs(url, ids, x="bytes", y="accuracy", out=out)
    root = ET.parse(out).getroot()
    for run_id in ids:
        (group,) = [g for g in root.iter(f"{SVG}g") if g.get("id") == f"run-{run_id}"]
        line_path = group.find(f"{SVG}path")
        assert line_path is not None
        vertices = re.findall(r"[ML]\s*[-\d.e]+\s+[-\d.e]+", line_path.get("d", ""))
        xs, _ = _expected(store, run_id, "bytes", "accuracy")
        assert len(vertices) == len(xs)
        assert len(group.findall(f".//{SVG}use")) == len(xs)  # one marker per point


def test_bad_input_is_refused_before_anything_is_written(
    stored: tuple[str, Store, list[int]], tmp_path: Path
) -> None:
    url, store, ids = stored
    out = tmp_path / "never.png"
    with pytest.raises(PlotError, match="x must be one of round, bytes, seconds; got 'time'"):
        plot_runs(url, ids, x="time", out=out)
    with pytest.raises(PlotError, match=r"must end in \.png or \.svg"):
        plot_runs(url, ids, out=tmp_path / "a.pdf")
    with pytest.raises(PlotError, match="run 999 not found"):
        plot_runs(url, [ids[0], 999], out=out)
    with pytest.raises(PlotError, match="no run is named 'nope'"):
        plot_runs(url, ["nope"], out=out)
    empty = store.create_run(RunInfo("sgd", "none", "none", "t", {"run-name": "plain"}))
    with pytest.raises(PlotError, match="2 runs are named 'plain'"):
        plot_runs(url, ["plain"], out=out)
    with pytest.raises(
        PlotError, match=rf"plain \(id {empty}\) has no rounds with an evaluation loss"
    ):
        plot_runs(url, [empty], y="loss", out=out)
    assert not out.exists()


def _cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FEDSQUEEZE_HOME": str(home), "COLUMNS": "200"}
    env.pop("DATABASE_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "server.cli", "plot", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_cli_writes_png_and_svg_and_exits_2_on_bad_input(
    stored: tuple[str, Store, list[int]], tmp_path: Path
) -> None:
    url, _, ids = stored
    home = tmp_path / "home"
    for name in ("curves.png", "curves.svg"):
        out = tmp_path / name
        done = _cli(*map(str, ids), "--x", "bytes", "--y", "loss", "--out", str(out),
                    "--database-url", url, home=home)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert out.stat().st_size > 1000
    assert (tmp_path / "curves.svg").read_text().lstrip().startswith("<?xml")
    never = tmp_path / "never.png"
    for args, message in [
        (["--x", "rounds"], "--x must be one of round, bytes, seconds; got 'rounds'"),
        (["--y", "acc"], "--y must be one of loss, accuracy; got 'acc'"),
        (["--out", str(tmp_path / "x.jpg")], "must end in .png or .svg"),
        (["42"], "run 42 not found"),
    ]:
        argv = [str(ids[0]), "--out", str(never), "--database-url", url, *args]
        done = _cli(*argv, home=home)
        assert done.returncode == 2, (args, done.stderr)
        assert message in done.stderr
        assert "Traceback" not in done.stderr
    assert not never.exists() and not (tmp_path / "x.jpg").exists()
