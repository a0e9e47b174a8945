"""What the ServerApp records about a run, and the interface of whoever stores it.

Plain data (no torch, no Flower, no SQL) so that the strategies, the round-history store
(api/) and the HTTP recorder all speak the same records. The ServerApp calls
`start_run` once, `record_round` once per finished round (one transaction each in the
SQL store) and `finish_run` once with the final status.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class RunInfo:
    """A run as it starts."""

    strategy: str
    uplink_compressor: str
    downlink_compressor: str
    task: str
    config: dict[str, Any]
    flower_run_id: int | None = None
    started_at: datetime = field(default_factory=utcnow)
    # number of model parameters d: the float32 baseline of a message is 4*d bytes
    num_parameters: int | None = None


@dataclass
class ClientRoundRecord:
    """One client's part in one round."""

    node_id: int
    outcome: str  # "ok" | "failed" | "dropped" (invalid payload) | "timeout"
    uplink_bytes: int = 0
    downlink_bytes: int = 0
    num_examples: int = 0
    local_loss: float | None = None
    duration_s: float | None = None
    error: str | None = None


@dataclass
class RoundRecord:
    """One finished round, as measured."""

    round: int
    sampled: int
    replied: int
    failed: int
    uplink_bytes: int  # measured: serialized payload sizes, summed over clients
    downlink_bytes: int  # measured, catch-up traffic included
    predicted_uplink_bytes: int  # what the codec's size formula predicts
    predicted_downlink_bytes: int
    train_loss: float | None = None
    eval_loss: float | None = None
    eval_accuracy: float | None = None
    # seconds per phase: configure / train / aggregate / evaluate
    phase_seconds: dict[str, float] = field(default_factory=dict)
    started_at: datetime = field(default_factory=utcnow)
    ended_at: datetime = field(default_factory=utcnow)
    clients: list[ClientRoundRecord] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. resyncs, catch-up bytes


class Recorder(Protocol):
    """Where the ServerApp writes a run's history."""

    def start_run(self, info: RunInfo) -> int:
        """Create the run; return its id in the store."""
        ...

    def record_round(self, run_id: int, record: RoundRecord) -> None:
        """Store one finished round atomically."""
        ...

    def finish_run(self, run_id: int, status: str) -> None:
        """Mark the run `finished`, `failed` or `interrupted`."""
        ...


@runtime_checkable
class ResumableRecorder(Recorder, Protocol):
    """A recorder that can reopen a run after a crash of the ServerApp (the SQL store)."""

    @property
    def store_key(self) -> str:
        """A name of the store without secrets (checkpoint folders are kept per store)."""
        ...

    def resume_run(self, run_id: int, flower_run_id: int | None = None) -> int:
        """Set an interrupted or failed run back to `running`; return its last stored round."""
        ...


def round_record_from_json(data: dict[str, Any]) -> RoundRecord:
    """The inverse of `_to_jsonable` for a `RoundRecord` (checkpoints carry their round)."""
    values = dict(data)
    for key in ("started_at", "ended_at"):
        values[key] = datetime.fromisoformat(values[key])
    values["clients"] = [ClientRoundRecord(**c) for c in values.get("clients", [])]
    return RoundRecord(**values)


def _to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: _to_jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {k: _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, datetime):
        return obj.isoformat()
    return obj


class JsonlRecorder:
    """Appends one JSON object per event to a file (no database needed)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._next_id = 1

    def _write(self, event: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(_to_jsonable(event)) + "\n")

    def start_run(self, info: RunInfo) -> int:
        run_id = self._next_id
        self._next_id += 1
        self._write({"event": "start_run", "run_id": run_id, "info": info})
        return run_id

    def record_round(self, run_id: int, record: RoundRecord) -> None:
        self._write({"event": "round", "run_id": run_id, "record": record})

    def finish_run(self, run_id: int, status: str) -> None:
        self._write({"event": "finish_run", "run_id": run_id, "status": status, "at": utcnow()})
