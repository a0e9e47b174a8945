"""What a run records, and the interface of whoever stores it.

Plain data (no torch, no Flower, no SQL) so that the strategies (strategies/flower.py
measures each round), the round-history store (api/store.py's `SqlRecorder`), the HTTP
recorder (api/client.py) and the ServerApp's file recorder (server/recording.py) all speak
the same records without importing each other. The ServerApp calls `start_run` once,
`record_round` once per finished round (one transaction each in the SQL store) and
`finish_run` once with the final status.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable


def utcnow() -> datetime:
    """Now, timezone-aware in UTC (every timestamp of a record)."""
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
    """The inverse of `to_jsonable` for a `RoundRecord` (checkpoints carry their round)."""
    values = dict(data)
    for key in ("started_at", "ended_at"):
        values[key] = datetime.fromisoformat(values[key])
    values["clients"] = [ClientRoundRecord(**c) for c in values.get("clients", [])]
    return RoundRecord(**values)


def to_jsonable(obj: Any) -> Any:
    """A record (or a dict / list of them) as JSON-ready values: dataclasses become dicts,
    datetimes ISO 8601 strings; what `json.dumps` and the REST bodies take."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: to_jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, datetime):
        return obj.isoformat()
    return obj
