"""The Flower side: one `Strategy` subclass for every algorithm, and the message formats.

`FedSqueezeStrategy` drives a `ServerHalf` (the algorithm's math) through Flower's Message
API: `configure_train` samples S_k by partition (`strategies.partitions`: S_k depends on the
seed, the round and the partition ids, never on Flower's node ids) and encodes each client's
downlink, `aggregate_train` validates the replies (in partition order) and lets the server
half form ĝ and move the model. `start` runs the
rounds itself so that it can poll for replies every `poll_interval` seconds (Flower's own
loop polls every 3 s in deployment), time each phase and record every round. With
``max-staleness`` τ > 0 it also keeps the message ids of replies that missed their round and
pulls them in the next τ rounds, handing them to the server half as delayed updates
(`strategies.consistency`); clients with such a reply outstanding are not sampled.

Downlink content (RecordDict): ``"fedsqueeze.down"`` (ConfigRecord: round, kind, versions,
ack round, reset flag, uplink seed, ``payloads``: list of codec bytes) and
``"fedsqueeze.config"`` (the run config, so that clients need no other source).
Uplink content: ``"fedsqueeze.up"`` (ConfigRecord: round, status, ``payload`` bytes, state
``digest`` bytes (`strategies.consistency.state_digest`), loss, examples, predicted bytes,
duration). Measured bytes are the lengths of the codec payloads put into these records.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from core.records import ClientRoundRecord, Recorder, RoundRecord, utcnow
from strategies.messages import Downlink, Uplink
from strategies.partitions import PartitionMap, sample_partitions
from strategies.server_half import ServerHalf
from strategies.settings import AlgorithmSettings

log = logging.getLogger("flwr.fedsqueeze.strategy")

DOWN_KEY = "fedsqueeze.down"
UP_KEY = "fedsqueeze.up"
CONFIG_KEY = "fedsqueeze.config"

EvaluateFn = Callable[[int, torch.Tensor], dict[str, float]]
ProgressFn = Callable[[RoundRecord], None]
#: called with (k, round k's record) once round k is complete, before it is stored
CheckpointFn = Callable[[int, RoundRecord], None]


# ----------------------------------------------------------------------------- formats
def downlink_to_record(message: Downlink, session: str = "") -> ConfigRecord:
    return ConfigRecord(
        {
            "session": session,
            "round": message.round,
            "kind": message.kind,
            "base-version": message.base_version,
            "target-version": message.target_version,
            "ack-round": message.ack_round,
            "reset": message.reset,
            "uplink-seed": message.uplink_seed,
            "predicted-nbytes": message.predicted_nbytes,
            "payloads": list(message.payloads),
        }
    )


def downlink_from_record(record: ConfigRecord) -> Downlink:
    try:
        kind = str(record["kind"])
        if kind not in ("log", "snapshot", "fresh"):
            raise ValueError(f"unknown downlink kind {kind!r}")
        payloads = record.get("payloads", [])
        if not isinstance(payloads, list) or not all(isinstance(p, bytes) for p in payloads):
            raise ValueError("payloads must be a list of bytes")
        return Downlink(
            round=int(record["round"]),  # type: ignore[arg-type]
            kind=kind,  # type: ignore[arg-type]
            base_version=int(record["base-version"]),  # type: ignore[arg-type]
            target_version=int(record["target-version"]),  # type: ignore[arg-type]
            ack_round=int(record["ack-round"]),  # type: ignore[arg-type]
            reset=bool(record["reset"]),
            uplink_seed=int(record["uplink-seed"]),  # type: ignore[arg-type]
            payloads=list(payloads),  # type: ignore[arg-type]
            predicted_nbytes=int(record["predicted-nbytes"]),  # type: ignore[arg-type]
        )
    except KeyError as exc:
        raise ValueError(f"downlink message lacks {exc}") from None


def uplink_to_record(uplink: Uplink, duration_s: float) -> ConfigRecord:
    return ConfigRecord(
        {
            "round": uplink.round,
            "status": uplink.status,
            "payload": uplink.payload,
            "predicted-nbytes": uplink.predicted_nbytes,
            "digest": bytes(uplink.digest),
            "loss": float(uplink.loss),
            "num-examples": uplink.num_examples,
            "detail": uplink.detail,
            "duration": float(duration_s),
        }
    )


def uplink_from_record(record: ConfigRecord) -> tuple[Uplink, float]:
    try:
        status = str(record["status"])
        if status not in ("ok", "resync"):
            raise ValueError(f"unknown status {status!r}")
        payload = record["payload"]
        if not isinstance(payload, bytes):
            raise ValueError("payload is not bytes")
        digest = record["digest"]
        if not isinstance(digest, bytes):
            raise ValueError("digest is not bytes")
        return (
            Uplink(
                round=int(record["round"]),  # type: ignore[arg-type]
                status=status,  # type: ignore[arg-type]
                payload=payload,
                predicted_nbytes=int(record["predicted-nbytes"]),  # type: ignore[arg-type]
                digest=digest,
                loss=float(record["loss"]),  # type: ignore[arg-type]
                num_examples=int(record["num-examples"]),  # type: ignore[arg-type]
                detail=str(record.get("detail", "")),
            ),
            float(record.get("duration", 0.0)),  # type: ignore[arg-type]
        )
    except KeyError as exc:
        raise ValueError(f"uplink message lacks {exc}") from None


def pull_replies(
    grid: Grid,
    ids: Collection[str],
    wait_for: Collection[str],
    timeout: float,
    poll_interval: float,
) -> list[Message]:
    """Pull the replies to the messages `ids` every `poll_interval` s until the replies to
    `wait_for` (a subset of `ids`) are all in or `timeout` passes; every reply pulled is
    returned (those to the other ids too: replies of earlier rounds, see `start`)."""
    wanted, waiting = set(ids), set(wait_for)
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    while wanted:
        got = list(grid.pull_messages(wanted))
        replies.extend(got)
        answered = {m.metadata.reply_to_message_id for m in got}
        wanted.difference_update(answered)
        waiting.difference_update(answered)
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(poll_interval)
    return replies


def wait_for_nodes(grid: Grid, minimum: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    last = -1
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"only {len(nodes)} of the {minimum} required nodes connected in {timeout:.0f} s"
            )
        if len(nodes) != last:
            log.info("waiting for nodes: %d connected, %d required", len(nodes), minimum)
            last = len(nodes)
        time.sleep(0.2)


# ----------------------------------------------------------------------------- strategy
@dataclass
class _RoundBook:
    sampled: list[int] = field(default_factory=list)
    expected: float = 0.0
    down_bytes: dict[int, int] = field(default_factory=dict)
    predicted_down: int = 0
    clients: list[ClientRoundRecord] = field(default_factory=list)
    up_bytes: int = 0
    predicted_up: int = 0
    losses: list[tuple[float, int]] = field(default_factory=list)
    #: message id → node of this round's downlinks (set once pushed)
    message_ids: dict[str, int] = field(default_factory=dict)


class FedSqueezeStrategy(Strategy):
    """Every algorithm of ALGORITHMS.md as a Flower strategy around its `ServerHalf`."""

    def __init__(
        self,
        server: ServerHalf,
        client_config: dict[str, Any],
        *,
        evaluate_fn: EvaluateFn | None = None,
        eval_every: int = 1,
        recorder: Recorder | None = None,
        run_id: int | None = None,
        poll_interval: float = 0.1,
        min_nodes: int = 1,
        progress: ProgressFn | None = None,
        session: str = "",
        checkpoint: CheckpointFn | None = None,
        first_round: int = 1,
    ) -> None:
        self.server = server
        #: names this run's client state in context.state (a node may serve several runs)
        self.session = session or f"{run_id or 0}-{np.random.default_rng().integers(2**62):x}"
        self.settings: AlgorithmSettings = server.settings
        self.client_config = ConfigRecord(dict(client_config))
        self.evaluate_fn = evaluate_fn
        self.eval_every = eval_every
        self.recorder = recorder
        self.run_id = run_id
        self.poll_interval = poll_interval
        self.min_nodes = min_nodes
        self.progress = progress
        #: saves the server's state after each round (see server.checkpoints)
        self.checkpoint = checkpoint
        #: 1, or k + 1 when resuming after round k
        self.first_round = first_round
        #: kept in checkpoints for resumed runs; S_k itself no longer draws from it
        self.rng = np.random.default_rng(self.settings.seed)
        #: node → partition: S_k and per-client seeds follow partitions, not Flower's node ids
        self.partitions = PartitionMap()
        self.server.seed_keys = self.partitions.of
        #: how long a partition query may take (`start` sets it to the round timeout)
        self.query_timeout = 600.0
        self.records: list[RoundRecord] = []
        self._round = _RoundBook()
        #: message id → (node, round) of the downlinks whose reply is outstanding (τ > 0):
        #: pulled again in later rounds until the server half applies, refuses or drops it
        self._in_flight: dict[str, tuple[int, int]] = {}

    def summary(self) -> None:
        s = self.settings
        log.info(
            "%s: uplink %s (α_up=%.4g, EF %s), downlink %s (α_dwn=%.4g, EF %s), γ=%g, "
            "p=%g (%s), %s",
            s.name, s.uplink, s.up_memory_rate, s.up_ef, s.downlink, s.down_memory_rate,
            s.down_ef, s.server_lr, s.participation, s.participation_mode, s.pp_variant,
        )  # fmt: skip

    # ---- Flower's four phases
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        nodes = self.partitions.discover(
            grid, grid.get_node_ids(), self.query_timeout, self.poll_interval
        )
        s = self.settings
        sampled, expected = sample_partitions(
            {node: self.partitions.of[node] for node in nodes},
            s.participation, s.participation_mode, s.seed, server_round,
        )  # fmt: skip
        book = _RoundBook(sampled=sampled, expected=expected)
        self._round = book
        self.server.begin_round(server_round)
        self.server.set_members(nodes)  # N: the clients counted in h = (1/(pN)) Σ h_i
        sampled = book.sampled = self.server.skip_busy(sampled)  # τ > 0: reply outstanding
        messages = []
        for node in sampled:
            down = self.server.downlink_for(server_round, node)
            book.down_bytes[node] = down.nbytes
            self.server.count_payloads(sent=len(down.payloads))
            book.predicted_down += down.predicted_nbytes
            content = RecordDict(
                {
                    DOWN_KEY: downlink_to_record(down, self.session),
                    CONFIG_KEY: self.client_config,
                }
            )
            messages.append(  # group id = the round, as Flower's own strategies set it
                Message(
                    content=content,
                    dst_node_id=node,
                    message_type=MessageType.TRAIN,
                    group_id=str(server_round),
                )
            )
        log.info(
            "round %d: sampled %d of %d nodes (pN = %.2f)",
            server_round, len(sampled), len(nodes), expected,
        )  # fmt: skip
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        book = self._round
        answered: set[int] = set()

        # in partition order, not arrival order: ĝ sums the same floats in the same order
        def order(m: Message) -> tuple[int, int]:
            return self.server.seed_key(int(m.metadata.src_node_id)), int(m.metadata.src_node_id)

        for reply in sorted(replies, key=order):
            node = int(reply.metadata.src_node_id)
            late = self._in_flight.pop(reply.metadata.reply_to_message_id, None)
            if late is None:
                answered.add(node)
            record = ClientRoundRecord(node_id=node, outcome="failed")
            record.downlink_bytes = 0 if late else book.down_bytes.get(node, 0)
            if reply.has_error():
                record.error = str(reply.error.reason)
                record.outcome = (
                    self.server.late_failed(server_round, node, record.error)
                    if late
                    else self.server.receive(server_round, node, None, record.error)
                )
                book.clients.append(record)
                continue
            try:
                content = reply.content
                if UP_KEY not in content.config_records:
                    raise ValueError(f"reply has no {UP_KEY!r} record")
                uplink, duration = uplink_from_record(content.config_records[UP_KEY])
            except (ValueError, TypeError) as exc:
                reason = f"malformed reply: {exc}"
                record.outcome = (
                    self.server.late_failed(server_round, node, reason)
                    if late
                    else self.server.reject(server_round, node, reason)
                )
                record.error = str(exc)
                book.clients.append(record)
                continue
            record.outcome = self.server.receive(server_round, node, uplink)
            record.uplink_bytes = uplink.nbytes
            record.num_examples = uplink.num_examples
            record.local_loss = uplink.loss if np.isfinite(uplink.loss) else None
            record.duration_s = duration
            if record.outcome != "ok":
                record.error = uplink.detail or "invalid payload or state digest (see log)"
            book.up_bytes += uplink.nbytes
            self.server.count_payloads(received=1 if uplink.payload else 0)
            book.predicted_up += uplink.predicted_nbytes
            if record.outcome == "ok" and not late:
                book.losses.append((uplink.loss, uplink.num_examples))
            book.clients.append(record)
        ids_of = {node: mid for mid, node in book.message_ids.items()}
        for node in book.sampled:
            if node not in answered:
                outcome = self.server.timeout(server_round, node)
                if outcome == "timeout" and node in ids_of:  # outstanding: pull it later
                    self._in_flight[ids_of[node]] = (node, server_round)
                book.clients.append(
                    ClientRoundRecord(
                        node_id=node,
                        outcome="timeout" if outcome == "failed" else outcome,
                        downlink_bytes=book.down_bytes.get(node, 0),
                        error="no reply before the round timeout",
                    )
                )
        stats = self.server.finish_round(server_round, book.expected)
        outstanding = self.server.outstanding
        self._in_flight = {  # drop those the server half no longer waits for
            mid: (node, k)
            for mid, (node, k) in self._in_flight.items()
            if node in outstanding and outstanding[node].round == k
        }
        metrics: dict[str, Any] = {
            "accepted": stats.accepted,
            "dropped": stats.dropped,
            "resyncs": stats.resyncs,
        }
        if book.losses:
            n = sum(c for _, c in book.losses) or 1
            metrics["train-loss"] = sum(loss * c for loss, c in book.losses) / n
        return None, MetricRecord(metrics)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []  # evaluation is central, on the server (see `start`)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return None

    # ---- the loop
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Run rounds `first_round`..`num_rounds`; `initial_arrays` is unused (the server
        half holds w0). Each round is checkpointed (if set), then stored."""
        self.summary()
        self.query_timeout = timeout
        result = Result()
        wait_for_nodes(grid, self.min_nodes, timeout)
        if self.evaluate_fn is not None and self.eval_every and self.first_round == 1:
            result.evaluate_metrics_serverapp[0] = MetricRecord(
                dict(self.evaluate_fn(0, self.server.evaluation_model()))
            )
        for k in range(self.first_round, num_rounds + 1):
            started = utcnow()
            t0 = time.perf_counter()
            messages = list(self.configure_train(k, initial_arrays, ConfigRecord(), grid))
            t1 = time.perf_counter()
            replies = self._exchange(grid, messages, k, timeout)
            t2 = time.perf_counter()
            _, metrics = self.aggregate_train(k, replies)
            t3 = time.perf_counter()
            evaluation: dict[str, float] = {}
            if (
                self.evaluate_fn is not None
                and self.eval_every
                and (k % self.eval_every == 0 or k == num_rounds)
            ):
                evaluation = self.evaluate_fn(k, self.server.evaluation_model())
                result.evaluate_metrics_serverapp[k] = MetricRecord(dict(evaluation))
            t4 = time.perf_counter()
            if metrics is not None:
                result.train_metrics_clientapp[k] = metrics
            record = self._round_record(
                k, started, evaluation, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)
            )
            self.records.append(record)
            if self.checkpoint is not None:
                self.checkpoint(k, record)
            if self.recorder is not None and self.run_id is not None:
                self.recorder.record_round(self.run_id, record)
            if self.progress is not None:
                self.progress(record)
            log.info(
                "round %d/%d: %d/%d replied, up %d B, down %d B, train loss %s, eval %s",
                k, num_rounds, record.replied, record.sampled, record.uplink_bytes,
                record.downlink_bytes,
                "-" if record.train_loss is None else f"{record.train_loss:.4g}",
                {key: round(v, 4) for key, v in evaluation.items()},
            )  # fmt: skip
        result.arrays = ArrayRecord([self.server.evaluation_model().numpy()])
        return result

    def _exchange(
        self, grid: Grid, messages: list[Message], k: int, timeout: float
    ) -> list[Message]:
        """Push round k's messages and pull their replies until all are in or `timeout`
        passes; replies outstanding from earlier rounds (τ > 0) are pulled alongside, and
        those whose last chance is this round (round + τ = k) are waited for as well."""
        ids = list(grid.push_messages(messages)) if messages else []
        self._round.message_ids = {
            mid: int(m.metadata.dst_node_id) for mid, m in zip(ids, messages, strict=True)
        }
        tau = self.server.max_staleness
        expiring = [mid for mid, (_, r) in self._in_flight.items() if k - r >= tau]
        return pull_replies(
            grid, [*ids, *self._in_flight], [*ids, *expiring], timeout, self.poll_interval
        )

    def _round_record(
        self,
        k: int,
        started: Any,
        evaluation: dict[str, float],
        phases: tuple[float, float, float, float],
    ) -> RoundRecord:
        book = self._round
        stats = self.server.stats
        losses = book.losses
        n = sum(c for _, c in losses)
        return RoundRecord(
            round=k,
            sampled=len(book.sampled),
            replied=stats.accepted,
            failed=len(book.sampled) - stats.accepted,
            uplink_bytes=book.up_bytes,
            downlink_bytes=sum(book.down_bytes.values()),
            predicted_uplink_bytes=book.predicted_up,
            predicted_downlink_bytes=book.predicted_down,
            train_loss=(sum(loss * c for loss, c in losses) / n) if n else None,
            eval_loss=evaluation.get("loss"),
            eval_accuracy=evaluation.get("accuracy"),
            phase_seconds={
                "configure": phases[0],
                "train": phases[1],
                "aggregate": phases[2],
                "evaluate": phases[3],
            },
            started_at=started,
            ended_at=utcnow(),
            clients=book.clients,
            extra=stats.as_dict(),
        )
