"""The simulate command's figures as text: the side-by-side table of runs, bytes and numbers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from server.simulation_run import SimulationResult


def format_bytes(n: int | None) -> str:
    """`n` bytes in B, KB, MB or GB (powers of 1024); "-" for None."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} GB"


def format_optional(value: float | None, spec: str) -> str:
    """`value` formatted with `spec`; "-" for None."""
    return "-" if value is None else format(value, spec)


def results_table(results: Sequence[SimulationResult], title: str = "Simulations") -> Any:
    """A rich table: one row per run with status, accuracy, loss, bytes each way, time."""
    from rich.table import Table

    table = Table(title=title)
    for column in (
        "strategy",
        "status",
        "rounds",
        "accuracy",
        "eval loss",
        "uplink",
        "downlink",
        "s/round",
        "run id",
    ):
        table.add_column(column, justify="left" if column in ("strategy", "status") else "right")
    for r in results:
        table.add_row(
            r.label,
            r.status.removeprefix("finished:"),
            f"{len(r.rounds)}/{r.num_rounds}",
            format_optional(r.final_accuracy, ".4f"),
            format_optional(r.final_eval_loss, ".4f"),
            format_bytes(r.uplink_bytes),
            format_bytes(r.downlink_bytes),
            format_optional(r.mean_round_s, ".2f"),
            str(r.store_run_id) if r.store_run_id is not None else "-",
        )
    return table
