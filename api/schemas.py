"""Pydantic 2 request and response models of the REST service (the OpenAPI schema)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from api.validation import check_json

INT32_MAX = (1 << 31) - 1
INT63_MAX = (1 << 62) - 1  # byte and example counts: far beyond any real value, fits BIGINT sums
UINT64_MAX = (1 << 64) - 1

RunStatus = Literal["running", "finished", "failed", "interrupted"]
FinalStatus = Literal["finished", "failed", "interrupted"]
ClientStatus = Literal["active", "disabled"]
Outcome = Literal["ok", "failed", "dropped", "timeout"]
RunSort = Literal["id", "started_at", "strategy", "status", "rounds_done", "best_eval_accuracy"]
SortOrder = Literal["asc", "desc"]


def _no_nul(value: str) -> str:
    """Text that every backend stores and reads back: no NUL, no lone surrogate."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("is not valid Unicode (lone surrogate)") from None
    return value


def _json_object(value: dict[str, Any]) -> dict[str, Any]:
    """A config or extra: storable JSON (depth, size, finite numbers, valid text)."""
    return check_json(value, "value")


def _utc(value: datetime) -> datetime:
    try:
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC)
    except OverflowError as exc:
        raise ValueError("timestamp out of range") from exc


Text = Annotated[str, AfterValidator(_no_nul)]
Name = Annotated[str, Field(min_length=1, max_length=128), AfterValidator(_no_nul)]
UtcDatetime = Annotated[datetime, AfterValidator(_utc)]
Count = Annotated[int, Field(ge=0, le=INT32_MAX)]
Bytes = Annotated[int, Field(ge=0, le=INT63_MAX)]
NodeId = Annotated[int, Field(ge=0, le=UINT64_MAX)]
Metric = Annotated[float, Field(allow_inf_nan=False)]
JsonObject = Annotated[dict[str, Any], AfterValidator(_json_object)]


def _utcnow() -> datetime:
    return datetime.now(UTC)


class ErrorInfo(BaseModel):
    code: str = Field(examples=["not_found"])
    message: str = Field(examples=["run 42 not found"])
    details: list[dict[str, Any]] | None = None


class ErrorBody(BaseModel):
    """The body of every error response."""

    error: ErrorInfo


# ---------------------------------------------------------------- health


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    version: str


class Ready(BaseModel):
    status: Literal["ready", "unavailable"]
    database: str
    revision: str | None
    expected_revision: str


# ---------------------------------------------------------------- runs


class RunCreate(BaseModel):
    """A run as it starts (what `core.records.RunInfo` holds)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "strategy": "artemis",
                    "uplink_compressor": "sq:s=1",
                    "downlink_compressor": "sq:s=1",
                    "task": "fashion_mnist",
                    "config": {"num-server-rounds": 100, "lr": 0.05},
                    "num_parameters": 206922,
                    "flower_run_id": 1234567890,
                }
            ]
        },
    )

    strategy: Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_no_nul)]
    uplink_compressor: Name
    downlink_compressor: Name
    task: Name
    config: JsonObject = Field(
        default_factory=dict,
        description="stored without `database-url`, URL passwords redacted",
    )
    num_parameters: Annotated[int, Field(ge=1, le=INT63_MAX)] | None = None
    flower_run_id: NodeId | None = None
    started_at: UtcDatetime = Field(default_factory=_utcnow)


class RunSummary(BaseModel):
    rounds_done: int
    last_round: int | None
    sampled: int
    replied: int
    failed: int
    uplink_bytes: int = Field(description="measured bytes sent by clients, all rounds")
    downlink_bytes: int = Field(description="measured bytes sent to clients, all rounds")
    predicted_uplink_bytes: int
    predicted_downlink_bytes: int
    best_eval_accuracy: float | None
    best_eval_round: int | None
    float32_uplink_bytes: int | None = Field(
        description="4·d·(replies): the same uplink traffic as float32 (needs num_parameters)"
    )
    float32_downlink_bytes: int | None = Field(description="4·d·(sampled clients)")
    uplink_compression_ratio: float | None
    downlink_compression_ratio: float | None
    total_compression_ratio: float | None


class RunOut(BaseModel):
    id: int = Field(examples=[1])
    flower_run_id: int | None
    strategy: str = Field(examples=["artemis"])
    uplink_compressor: str
    downlink_compressor: str
    task: str
    config: dict[str, Any]
    num_parameters: int | None
    status: RunStatus
    started_at: datetime
    ended_at: datetime | None
    updated_at: datetime
    summary: RunSummary


class RunFinish(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"status": "finished"}]}
    )

    status: FinalStatus


# ---------------------------------------------------------------- rounds


class ClientRoundIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    node_id: NodeId
    outcome: Outcome
    uplink_bytes: Bytes = 0
    downlink_bytes: Bytes = 0
    num_examples: Bytes = 0
    local_loss: Metric | None = None
    duration_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    error: Annotated[str, Field(max_length=10_000), AfterValidator(_no_nul)] | None = None


class ClientRoundOut(BaseModel):
    node_id: int
    outcome: Outcome
    uplink_bytes: int
    downlink_bytes: int
    num_examples: int
    local_loss: float | None
    duration_s: float | None
    error: str | None


class RoundCreate(BaseModel):
    """One finished round (what `core.records.RoundRecord` holds)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "round": 1,
                    "sampled": 2,
                    "replied": 2,
                    "failed": 0,
                    "uplink_bytes": 52000,
                    "downlink_bytes": 52000,
                    "predicted_uplink_bytes": 51800,
                    "predicted_downlink_bytes": 51800,
                    "train_loss": 0.91,
                    "eval_loss": 0.85,
                    "eval_accuracy": 0.71,
                    "phase_seconds": {"configure": 0.01, "train": 2.3, "aggregate": 0.02},
                    "clients": [
                        {"node_id": 11, "outcome": "ok", "uplink_bytes": 26000,
                         "downlink_bytes": 26000, "num_examples": 600, "local_loss": 0.9},
                        {"node_id": 12, "outcome": "ok", "uplink_bytes": 26000,
                         "downlink_bytes": 26000, "num_examples": 600, "local_loss": 0.92},
                    ],
                }
            ]
        },
    )  # fmt: skip

    round: Count
    sampled: Count
    replied: Count
    failed: Count
    uplink_bytes: Bytes
    downlink_bytes: Bytes
    predicted_uplink_bytes: Bytes
    predicted_downlink_bytes: Bytes
    train_loss: Metric | None = None
    eval_loss: Metric | None = None
    eval_accuracy: Metric | None = None
    phase_seconds: dict[Annotated[str, Field(max_length=64), AfterValidator(_no_nul)], Metric] = (
        Field(default_factory=dict)
    )
    started_at: UtcDatetime = Field(default_factory=_utcnow)
    ended_at: UtcDatetime = Field(default_factory=_utcnow)
    clients: list[ClientRoundIn] = Field(default_factory=list, max_length=100_000)
    extra: JsonObject = Field(default_factory=dict)


class RoundOut(BaseModel):
    run_id: int
    round: int
    sampled: int
    replied: int
    failed: int
    uplink_bytes: int
    downlink_bytes: int
    predicted_uplink_bytes: int
    predicted_downlink_bytes: int
    train_loss: float | None
    eval_loss: float | None
    eval_accuracy: float | None
    phase_seconds: dict[str, float]
    started_at: datetime
    ended_at: datetime
    extra: dict[str, Any]


class RoundDetail(RoundOut):
    clients: list[ClientRoundOut]


# ---------------------------------------------------------------- series / compare


class Series(BaseModel):
    """Per-run curves, one entry per stored round (cumulative bytes are running sums)."""

    run_id: int
    rounds: list[int]
    train_loss: list[float | None]
    eval_loss: list[float | None]
    eval_accuracy: list[float | None]
    uplink_bytes_cumulative: list[int]
    downlink_bytes_cumulative: list[int]
    ended_at: list[datetime]


class Comparison(BaseModel):
    runs: list[RunOut]
    series: list[Series]


# ---------------------------------------------------------------- clients


class ClientCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "name": "jetson-kitchen",
                    "location": "lab 2",
                    "public_key_pem": "-----BEGIN PUBLIC KEY-----\n...\n-----END PUBLIC KEY-----\n",
                }
            ]
        },
    )

    name: Name
    public_key_pem: Annotated[str, Field(min_length=1, max_length=10_000), AfterValidator(_no_nul)]
    location: Annotated[str, Field(max_length=255), AfterValidator(_no_nul)] | None = None
    node_id: NodeId | None = Field(
        default=None,
        description="Flower node id; only when no SuperLink registrar is configured "
        "(otherwise the SuperLink assigns it)",
    )


class Participation(BaseModel):
    rounds: int
    ok: int
    failed: int
    uplink_bytes: int
    downlink_bytes: int
    num_examples: int
    last_round_at: datetime | None


class ClientOut(BaseModel):
    id: int
    name: str
    location: str | None
    node_id: int | None
    status: ClientStatus
    enrolled_at: datetime
    last_seen_at: datetime | None
    public_key_pem: str
    participation: Participation


# ---------------------------------------------------------------- pages

T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int = Field(description="items matching the filters, all pages")
    limit: int
    offset: int
    next_offset: int | None = Field(description="offset of the next page, null on the last")
