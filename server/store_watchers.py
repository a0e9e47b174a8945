"""Watching a run's rounds land in the round-history store, as the ServerApp records them.

`make_watcher` picks the reader for the run's store URL: `StoreWatcher` for a database
(SQLite, PostgreSQL; read through the store's SQLAlchemy models) or `JsonlWatcher` for a
``jsonl:PATH`` file. Each `poll` returns the rounds recorded since the last one as
`RoundRow`s, and keeps what the ServerApp recorded about the run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any


@dataclass
class RoundRow:
    """One recorded round, as the progress bar and the summaries use it."""

    round: int
    sampled: int = 0
    replied: int = 0
    failed: int = 0
    uplink_bytes: int = 0
    downlink_bytes: int = 0
    train_loss: float | None = None
    eval_loss: float | None = None
    eval_accuracy: float | None = None
    seconds: float | None = None  # wall time of the round (ended_at - started_at)
    phase_seconds: dict[str, float] = field(default_factory=dict)


#: what a recorded round (a store row, or a RoundRecord in a jsonl file) says, as read here
_ROUND_FIELDS = (
    "round",
    "sampled",
    "replied",
    "failed",
    "uplink_bytes",
    "downlink_bytes",
    "train_loss",
    "eval_loss",
    "eval_accuracy",
    "phase_seconds",
    "started_at",
    "ended_at",
)


class StoreWatcher:
    """Reads the rounds of one Flower run from the round-history store as they land."""

    def __init__(self, database_url: str | None, flower_run_id: int) -> None:
        self.database_url = database_url or None
        self.flower_run_id = flower_run_id
        self.store_run_id: int | None = None
        self.run_status: str | None = None
        self.rounds: dict[int, RoundRow] = {}
        self.run_facts: dict[str, Any] = {}
        self.error: str | None = None
        self._store: Any = None

    def _open(self) -> Any:
        if self._store is None:
            from api.db import get_engine
            from api.store import Store

            self._store = Store(get_engine(self.database_url))
        return self._store

    def poll(self) -> list[RoundRow]:
        """New rounds since the last poll (empty if none, or if the store is unreadable)."""
        try:
            return self._poll()
        except Exception as exc:  # the store may not exist yet; the run goes on
            self.error = f"{type(exc).__name__}: {exc}"
            return []

    def _poll(self) -> list[RoundRow]:
        from sqlalchemy import select

        from api.models import Round, Run

        store = self._open()
        with store.session() as session:
            if self.store_run_id is None:
                run_id = session.scalars(
                    select(Run.id)
                    .where(Run.flower_run_id == self.flower_run_id)
                    .order_by(Run.id.desc())
                ).first()
                if run_id is None:
                    return []
                self.store_run_id = int(run_id)
            run = session.get(Run, self.store_run_id)
            if run is not None:
                self.run_status = run.status
                self.run_facts = {
                    "uplink_compressor": run.uplink_compressor,
                    "downlink_compressor": run.downlink_compressor,
                    "num_parameters": run.num_parameters,
                }
            rows = session.scalars(
                select(Round)
                .where(Round.run_id == self.store_run_id, Round.round.not_in(list(self.rounds)))
                .order_by(Round.round)
            ).all()
            new = [_round_row({f: getattr(r, f) for f in _ROUND_FIELDS}) for r in rows]
        for row in new:
            self.rounds[row.round] = row
        self.error = None
        return new


class JsonlWatcher:
    """Reads the rounds of one Flower run from a `JsonlRecorder` file (``jsonl:PATH``)."""

    def __init__(self, path: str | os.PathLike[str], flower_run_id: int) -> None:
        self.path = Path(path).expanduser()
        self.flower_run_id = flower_run_id
        self.store_run_id: int | None = None
        self.run_status: str | None = None
        self.rounds: dict[int, RoundRow] = {}
        self.run_facts: dict[str, Any] = {}
        self.error: str | None = None
        self._offset = 0

    def poll(self) -> list[RoundRow]:
        new: list[RoundRow] = []
        try:
            with self.path.open("r", encoding="utf-8") as fh:
                fh.seek(self._offset)
                while True:
                    line = fh.readline()
                    if not line.endswith("\n"):
                        break  # nothing more, or a line still being written
                    self._offset = fh.tell()
                    row = self._event(json.loads(line))
                    if row is not None and row.round not in self.rounds:
                        self.rounds[row.round] = row
                        new.append(row)
        except (OSError, ValueError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        return new

    def _event(self, event: dict[str, Any]) -> RoundRow | None:
        kind = event.get("event")
        if kind == "start_run":
            info = event.get("info") or {}
            if self.store_run_id is not None and event.get("run_id") == self.store_run_id:
                self.store_run_id = -1  # a later run reuses the id: ours is over
            if info.get("flower_run_id") == self.flower_run_id:
                self.store_run_id = int(event["run_id"])
                self.run_status = "running"
                self.run_facts = {
                    "uplink_compressor": info.get("uplink_compressor"),
                    "downlink_compressor": info.get("downlink_compressor"),
                    "num_parameters": info.get("num_parameters"),
                }
        elif kind == "round" and event.get("run_id") == self.store_run_id:
            record = dict(event.get("record") or {})
            for key in ("started_at", "ended_at"):
                if isinstance(record.get(key), str):
                    record[key] = datetime.fromisoformat(record[key])
            return _round_row(record)
        elif kind == "finish_run" and event.get("run_id") == self.store_run_id:
            self.run_status = str(event.get("status"))
        return None


def make_watcher(database_url: str | None, flower_run_id: int) -> StoreWatcher | JsonlWatcher:
    """The reader of the ServerApp's round history for this run's ``database-url``."""
    if database_url and database_url.startswith("jsonl:"):
        return JsonlWatcher(database_url.removeprefix("jsonl:"), flower_run_id)
    return StoreWatcher(database_url, flower_run_id)


def _round_row(r: Mapping[str, Any]) -> RoundRow:
    """A recorded round as a RoundRow: missing or null counts are 0, missing metrics None."""
    seconds = None
    started, ended = r.get("started_at"), r.get("ended_at")
    if isinstance(started, datetime) and isinstance(ended, datetime):
        seconds = (ended - started).total_seconds()
    return RoundRow(
        round=int(r["round"]),
        sampled=int(r.get("sampled") or 0),
        replied=int(r.get("replied") or 0),
        failed=int(r.get("failed") or 0),
        uplink_bytes=int(r.get("uplink_bytes") or 0),
        downlink_bytes=int(r.get("downlink_bytes") or 0),
        train_loss=r.get("train_loss"),
        eval_loss=r.get("eval_loss"),
        eval_accuracy=r.get("eval_accuracy"),
        seconds=seconds,
        phase_seconds=dict(r.get("phase_seconds") or {}),
    )
