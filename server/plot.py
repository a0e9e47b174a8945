"""`fedsqueeze plot`: curves of stored runs as a PNG or SVG figure (matplotlib, Agg).

One line per run: its central evaluation loss or accuracy against the round, the measured
cumulative bytes (uplink + downlink, catch-up traffic included, as recorded) or the
seconds since the run started (round end time minus the run's start). Bytes are drawn on
a log scale. Each line is labelled by the run's name (run-config ``run-name``, else
``run N``), its strategy and its settings (compressors, participation p, local steps K).

`plot_runs` is the function the command and the benchmarks call; it checks every input
(axes, file extension, runs, data) before anything is drawn and raises `PlotError`
naming what was wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from api.models import Run
    from api.store import Store

X_AXES = ("round", "bytes", "seconds")
Y_AXES = ("loss", "accuracy")
FORMATS = ("png", "svg")
X_LABELS = {
    "round": "round",
    "bytes": "cumulative bytes, uplink + downlink (measured, log scale)",
    "seconds": "seconds since the run started",
}
Y_LABELS = {"loss": "central evaluation loss", "accuracy": "central evaluation accuracy"}


class PlotError(ValueError):
    """Bad input to `plot_runs`: an unknown axis, run or file type, or a run without data."""


@dataclass(frozen=True)
class Curve:
    """One run's line: its points (x_t, y_t) for the rounds where y was measured."""

    run_id: int
    label: str
    x: list[float]
    y: list[float]


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise PlotError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def output_format(out: str | Path) -> str:
    """``png`` or ``svg`` from the file name's extension (else `PlotError`)."""
    ext = Path(out).suffix.lower().lstrip(".")
    if ext not in FORMATS:
        raise PlotError(f"--out {str(out)!r}: the file name must end in .png or .svg")
    return ext


def run_name(run: Run) -> str:
    """The run's ``run-name`` from its config, else ``run N``."""
    name = run.config.get("run-name") if isinstance(run.config, dict) else None
    return name if isinstance(name, str) and name else f"run {run.id}"


def run_label(run: Run) -> str:
    """``NAME: STRATEGY (up C_up, down C_dwn, p=.., K=..)`` for a legend."""
    settings = [f"up {run.uplink_compressor}", f"down {run.downlink_compressor}"]
    config = run.config if isinstance(run.config, dict) else {}
    for key, short in (("participation", "p"), ("local-steps", "K")):
        if key in config:
            settings.append(f"{short}={config[key]}")
    return f"{run_name(run)}: {run.strategy} ({', '.join(settings)})"


def resolve_runs(store: Store, refs: Sequence[int | str]) -> list[Run]:
    """The runs named by `refs`: a run id, or a run's ``run-name`` (which must name one
    run only). Raises `PlotError` naming the first reference that matches no run."""
    from sqlalchemy import select

    from api.errors import NotFoundError
    from api.models import Run

    if not refs:
        raise PlotError("name at least one run (an id or a run-name)")
    runs: list[Run] = []
    names: dict[str, list[int]] | None = None
    for ref in refs:
        text = str(ref).strip()
        if text.isdigit():
            try:
                runs.append(store.get_run(int(text)))
            except NotFoundError:
                raise PlotError(f"run {text} not found in the store") from None
            continue
        if names is None:  # one pass over the runs' configs, on first use of a name
            names = {}
            with store.session() as session:
                for run_id, config in session.execute(select(Run.id, Run.config)):
                    name = config.get("run-name") if isinstance(config, dict) else None
                    if isinstance(name, str) and name:
                        names.setdefault(name, []).append(run_id)
        ids = names.get(text, [])
        if not ids:
            raise PlotError(f"no run is named {text!r} (give a run id or an existing run-name)")
        if len(ids) > 1:
            raise PlotError(f"{len(ids)} runs are named {text!r} (ids {ids}): give a run id")
        runs.append(store.get_run(ids[0]))
    return runs


def _seconds(started: datetime, ended: datetime) -> float:
    return (ended - started).total_seconds()


def curves(store: Store, runs: Sequence[Run], x: str = "round", y: str = "accuracy") -> list[Curve]:
    """Each run's points from the store (`Store.series`): x is the round, the cumulative
    measured bytes up + down, or the seconds since the run's start; y the central eval loss
    or accuracy. Rounds without a y value are left out (their bytes still count)."""
    _check_choice("x", x, X_AXES)
    _check_choice("y", y, Y_AXES)
    series = store.series([r.id for r in runs])
    out = []
    for run in runs:
        xs: list[float] = []
        ys: list[float] = []
        total = 0
        for rnd, _train, eval_loss, eval_accuracy, up, down, ended in series[run.id]:
            total += up + down
            value = eval_loss if y == "loss" else eval_accuracy
            if value is None:
                continue
            xs.append(
                float(rnd)
                if x == "round"
                else float(total)
                if x == "bytes"
                else _seconds(run.started_at, ended)
            )
            ys.append(float(value))
        if not xs:
            raise PlotError(
                f"{run_name(run)} (id {run.id}) has no rounds with an evaluation {y} to plot"
            )
        out.append(Curve(run.id, run_label(run), xs, ys))
    return out


def draw(lines: Sequence[Curve], x: str, y: str, title: str | None = None) -> Figure:
    """A matplotlib figure (no pyplot state) with one line per curve."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Up to 10 runs: one colour each (tab10); more: 20 colours (tab20) and, past 20, a
    # line style per cycle, so no two lines look alike. The legend goes below the axes,
    # where long labels do not cover the curves.
    fig = Figure(figsize=(8.0, 5.0 + 0.22 * len(lines)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["tab10" if len(lines) <= 10 else "tab20"]
    palette = [cmap(i) for i in range(cmap.N)]
    styles = ("-", "--", ":", "-.")
    for i, curve in enumerate(lines):
        (line,) = ax.plot(curve.x, curve.y, marker="o" if len(curve.x) <= 30 else None,
                          markersize=3, linewidth=1.5, label=curve.label,
                          color=palette[i % len(palette)],
                          linestyle=styles[(i // len(palette)) % len(styles)])  # fmt: skip
        line.set_gid(f"run-{curve.run_id}")  # the line's <g id> in an SVG
    if x == "bytes":
        ax.set_xscale("log")
    ax.set_xlabel(X_LABELS[x])
    ax.set_ylabel(Y_LABELS[y])
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.12), ncols=1)
    if title:
        ax.set_title(title)
    return fig


def plot_runs(
    store_or_url: Store | str | None,
    runs: Sequence[int | str],
    *,
    x: str = "round",
    y: str = "accuracy",
    out: str | Path | None = None,
    title: str | None = None,
) -> Figure:
    """Draw stored runs, one line each, and write the figure to `out` (PNG or SVG).

    Args:
        store_or_url: an open `api.store.Store`, or a database URL (None: $DATABASE_URL,
            else the SQLite file under $FEDSQUEEZE_HOME, as every command).
        runs: run ids or run-names.
        x: ``round``, ``bytes`` (cumulative measured up + down, log scale) or ``seconds``.
        y: ``loss`` or ``accuracy`` (central evaluation).
        out: the file to write; its extension (.png or .svg) chooses the format. None:
            only return the figure.
        title: an optional title.

    Returns:
        The matplotlib figure; ``fig.axes[0].get_lines()`` hold the data drawn.

    Raises:
        PlotError: a bad axis or extension, an unknown run, or a run with nothing to plot
            (all checked before anything is drawn or written).
    """
    _check_choice("x", x, X_AXES)
    _check_choice("y", y, Y_AXES)
    fmt = output_format(out) if out is not None else None
    store = _open(store_or_url)
    lines = curves(store, resolve_runs(store, runs), x, y)
    fig = draw(lines, x, y, title)
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format=fmt, dpi=120, bbox_inches="tight")
    return fig


def _open(store_or_url: Store | str | None) -> Store:
    from api.store import Store, open_store

    if isinstance(store_or_url, Store):
        return store_or_url
    return open_store(store_or_url)


# ---------------------------------------------------------------- command


def plot(
    runs: Annotated[
        list[str],
        typer.Argument(
            help="run ids or run-names (see `fedsqueeze stats runs`)", show_default=False
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="file to write: .png or .svg", show_default=False)
    ],
    x: Annotated[
        str,
        typer.Option("--x", help="round | bytes (cumulative up + down, log scale) | seconds"),
    ] = "round",
    y: Annotated[
        str, typer.Option("--y", help="loss | accuracy (central evaluation)")
    ] = "accuracy",
    title: Annotated[str | None, typer.Option(help="figure title", show_default=False)] = None,
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url",
            help="SQLAlchemy URL; default $DATABASE_URL, else "
            "sqlite:///$FEDSQUEEZE_HOME/fedsqueeze.db",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Plot stored runs: one line per run, loss or accuracy against rounds, bytes or seconds.

    Example: fedsqueeze plot 3 4 fedavg-baseline --x bytes --y accuracy --out acc.svg
    """
    from api.cli import _bad, _database_errors, _store

    try:
        _check_choice("--x", x, X_AXES)
        _check_choice("--y", y, Y_AXES)
        output_format(out)
    except PlotError as exc:
        raise _bad(str(exc)) from None
    store = _store(database_url)
    with _database_errors(database_url):
        try:
            plot_runs(store, runs, x=x, y=y, out=out, title=title)
        except PlotError as exc:
            raise _bad(str(exc)) from None
    typer.echo(f"wrote {out}")


__all__ = ["Curve", "PlotError", "curves", "plot", "plot_runs", "resolve_runs"]
