"""The server half every algorithm shares: the round template, the books it keeps on each
client, and the consistency protocol's server side.

One round k, driven by the Flower glue (`strategies.flower`) or by `strategies.local`::

    1. begin_round(k)             forget the last round's scratch and counters
    2. set_members(nodes)         the clients C counted this round (N = |C|); a client
                                  joins or leaves with its share of PP2's h
    3. downlink_for(k, i)         for each i ∈ S_k: the family's message (catch-up,
                                  snapshot or fresh), stamped for the consistency protocol,
                                  and the state digest the server expects back
    4. receive(k, i, uplink)      for each reply: validate (`strategies.validation`),
                                  compare digests (`strategies.consistency`), keep Δ̂_i;
                                  a reply of an earlier round k' is a delayed update,
                                  kept when 1 ≤ k − k' ≤ τ and still outstanding
       timeout(k, i)              for each sampled client that did not reply in time:
                                  with τ > 0 its reply becomes outstanding
    5. finish_round(k, pN)        ĝ by PP1 / PP2 (`strategies.aggregation`), then the
                                  family moves the central model (`_advance`) by the
                                  server optimiser's step u = server_opt(ĝ)
                                  (`server_step`, `strategies.server_opt`)

A family (`strategies.artemis`, `strategies.mcm`, `strategies.signsgd`) subclasses
`ServerHalf` and implements the abstract hooks: what to send client i, the digest of the
downlink state (H, w) client i will hold, and how the model moves given ĝ.

Steps 3-5 encode and decode with the codecs' compiled CPU kernels from
`compression.LONG_LIVED_MIN_NUMEL` coordinates on (`compression.kernels_from`): a server half
lives as long as its run, so numba's one-time load pays for itself, where a client's fresh
ClientApp process keeps the torch code below 2^22. Decoded vectors are the same bit for bit
on both paths, so the two sides still agree; the server's compressed downlinks use the
kernels' random draws.
"""

from __future__ import annotations

import functools
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import torch

from compression import LONG_LIVED_MIN_NUMEL, kernels_from
from strategies import aggregation, server_opt
from strategies.consistency import digest_difference, tensor_digest
from strategies.encoding import derive_seed, get_compressor
from strategies.memory_store import TensorStore
from strategies.messages import Downlink, Uplink
from strategies.sampling import expected_participants
from strategies.settings import AlgorithmSettings
from strategies.validation import decode_uplink, default_max_uplink_bytes

# a child of Flower's logger, so that our lines appear in `flwr run` log streams
log = logging.getLogger("flwr.fedsqueeze.strategies")


P = ParamSpec("P")
R = TypeVar("R")


def _with_kernels(method: Callable[P, R]) -> Callable[P, R]:
    """`method` run with the codecs' compiled kernels from `LONG_LIVED_MIN_NUMEL` on (see
    the module docstring)."""

    @functools.wraps(method)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        with kernels_from(LONG_LIVED_MIN_NUMEL):
            return method(*args, **kwargs)

    return run


@dataclass
class ClientBook:
    """What the server knows about client i: last accepted round, the version it holds."""

    acked_round: int = 0
    version: int = 0
    needs_reset: bool = False
    #: in the set C the server counts (N = |C|); see `ServerHalf.set_members`
    counted: bool = False


@dataclass(frozen=True)
class DownlinkCommit:
    """What the server needs, once client i's reply is accepted, to update the per-client
    downlink state it computed when it sent i its message: Rand-MCM keeps the bytes of Ω_i
    (`payload`, to apply H_i ← H_i + α_dwn Ω_i then) and the digests of H_i + α_dwn Ω_i and
    of the perturbed model ŵ_i = H_i + Ω_i (`digests`), no d-vectors. Empty for the
    families that broadcast one message to all."""

    payload: bytes | None = None
    digests: tuple[bytes, bytes] | None = None


@dataclass
class PendingReply:
    """What the server expects from client i this round and what to commit if it arrives."""

    target_version: int
    expected_digest: bytes
    commit: DownlinkCommit = field(default_factory=DownlinkCommit)


@dataclass
class OutstandingReply:
    """A reply of round `round` that missed its round's deadline (τ > 0): what the server
    expected from the client then, kept until the reply arrives or τ rounds have passed."""

    round: int
    expected: PendingReply


@dataclass
class RoundStats:
    """Counters of one round (go to RoundRecord.extra)."""

    accepted: int = 0
    dropped: int = 0
    #: replies that arrived and were refused (bad payload, stale round, digest mismatch)
    rejected: int = 0
    resyncs: int = 0
    digest_checks: int = 0
    digest_mismatches: int = 0
    snapshots: int = 0
    catchup_messages: int = 0
    catchup_bytes: int = 0
    resets_sent: int = 0
    expected_participants: float = 0.0
    downlink_payloads: int = 0  # codec payloads sent (each carries a < 64-byte header)
    uplink_payloads: int = 0
    joined: int = 0  # clients added to the counted set C this round
    left: int = 0  # clients removed from C this round
    members: int = 0  # N = |C| after this round's changes
    #: delayed updates (`strategies.consistency`): late replies folded into this round's ĝ,
    #: late replies refused (no longer outstanding, staleness > τ, or a failed check),
    #: outstanding replies dropped after τ rounds, sampled clients skipped because a reply
    #: of theirs was outstanding, and one entry per late reply that arrived this round
    late_applied: int = 0
    late_refused: int = 0
    late_expired: int = 0
    busy_skipped: int = 0
    late_replies: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["late_replies"] = [dict(entry) for entry in self.late_replies]
        return out


class ServerHalf(ABC):
    """The server side of one algorithm, independent of Flower.

    Per round k: `begin_round(k)`, `set_members(nodes)` with the clients the round samples
    from, `downlink_for(k, i)` for every sampled client (before training), then
    `receive(k, i, uplink)` for every reply, then `finish_round(k, pN)` which forms ĝ and
    moves the central model (family-specific `_advance`).

    Uplink memories: the server keeps every client's h_i in `h_store` (PP1 and PP2) and,
    under PP2, the single memory h in `h_global`, corrected by a client's share whenever
    that share changes outside the aggregation update (reset, leave, join; see
    `strategies.aggregation`'s memory invariant).
    """

    #: family subclasses set this to the model kinds they implement
    kinds: tuple[str, ...] = ()

    def __init__(
        self,
        settings: AlgorithmSettings,
        w0: torch.Tensor,
        store_dir: str | Path | None = None,
        expected_clients: int = 0,
        max_uplink_bytes: int | None = None,
    ) -> None:
        if settings.model not in self.kinds:
            raise ValueError(f"{type(self).__name__} does not implement {settings.model}")
        w0 = w0.detach().to("cpu", torch.float32).reshape(-1).clone()
        if w0.numel() != settings.dim:
            raise ValueError(f"initial model has {w0.numel()} values, settings say {settings.dim}")
        self.settings = settings
        self.dim = settings.dim
        self.w = w0  # the central model (exact, or degraded where the algorithm says)
        self.version = 0
        self.books: dict[int, ClientBook] = {}
        self.pending: dict[int, PendingReply] = {}
        #: τ, and the replies that missed their round and may still be applied (τ > 0)
        self.max_staleness = settings.max_staleness
        self.outstanding: dict[int, OutstandingReply] = {}
        self.up_compressor = get_compressor(settings.uplink)
        self.down_compressor = get_compressor(settings.downlink)
        self.max_uplink_bytes = max_uplink_bytes or default_max_uplink_bytes(self.dim)
        self.h_global = (
            torch.zeros(self.dim) if settings.up_memory and settings.pp_variant == "pp2" else None
        )  # PP2: one memory h
        self.h_store = (  # h_i of every client it has seen (PP1 and PP2)
            TensorStore(self.dim, directory=store_dir, expected_clients=expected_clients)
            if settings.up_memory
            else None
        )
        self.stats = RoundStats()
        #: the server optimiser (pure functions, rebuilt from the settings) and its state
        self.optimizer = server_opt.from_settings(settings.server_opt)
        self.opt_state = self.optimizer.init(self.dim)
        #: this round's running sum of the accepted replies (`_add_to_sum`); None before the first
        self._sum: torch.Tensor | None = None
        #: a d-vector of scratch space for `aggregation.add_uplink` (kept: a fresh one per
        #: reply would cost its page faults); None before the first reply
        self._scratch: torch.Tensor | None = None
        self._store_dir = store_dir
        self._expected_clients = expected_clients
        self._round = 0
        #: (the `books` it was built from, C): see `_counted`
        self._counted_cache: tuple[dict[int, ClientBook], set[int]] | None = None
        #: (h, whether h is +0.0 everywhere): see `_h_is_positive_zero`
        self._zero_h_cache: tuple[torch.Tensor | None, bool] | None = None
        #: node → partition id, set by the Flower glue (`strategies.partitions`)
        self.seed_keys: dict[int, int] = {}

    # ---- hooks for the families
    @abstractmethod
    def _downlink_payload(
        self, node: int, book: ClientBook, k: int
    ) -> tuple[Downlink, DownlinkCommit]:
        """The message for `node` and what to store for it if its reply is accepted."""

    @abstractmethod
    def _expected_digest_down(self, node: int, commit: DownlinkCommit) -> tuple[bytes, bytes]:
        """`tensor_digest` of the downlink memory and of the model the client will hold."""

    @abstractmethod
    def _advance(self, g_hat: torch.Tensor, k: int) -> None:
        """Move the central model by u = `server_step`(ĝ) and prepare the next downlink
        (the family's math)."""

    def server_step(self, g_hat: torch.Tensor) -> torch.Tensor:
        """u = server_opt(ĝ), advancing the optimiser's state (u = ĝ for server-opt=sgd).
        Families call it once per model move, where the papers' step uses ĝ."""
        u, self.opt_state = self.optimizer.update(g_hat, self.opt_state)
        return u

    # optional hooks: no-ops unless the family keeps per-client downlink state (Rand-MCM)
    def _reset_client(self, node: int) -> None:  # noqa: B027
        """Zero the server's per-client downlink memory (families that keep one)."""

    def _commit_client(self, node: int, commit: DownlinkCommit) -> None:  # noqa: B027
        """Store what the family computed for this client at send time."""

    def evaluation_model(self) -> torch.Tensor:
        """The model to evaluate centrally (w; MCM: the preserved exact model)."""
        return self.w

    # ---- the clients the server counts
    def seed_key(self, node: int) -> int:
        """Client i's key in per-client seeds: its partition id when `seed_keys` names it
        (so a run is a function of its seed whatever ids Flower gives the nodes), else the
        node id itself (in-process runs, whose nodes are their partitions)."""
        return self.seed_keys.get(node, node)

    def members(self) -> list[int]:
        """The clients C the server counts, N = |C| (those it samples from)."""
        return sorted(self._counted())

    def _counted(self) -> set[int]:
        """C as a set, kept in step by `_join` / `_leave`, so that a round costs O(|changes|)
        book-keeping beyond one pass over the nodes, not O(N) per join (O(N²) when N clients
        join). Derived from `books` (the checkpointed truth): rebuilt when `books` is
        replaced, as by `strategies.checkpoint.restore`."""
        cache = self._counted_cache
        if cache is None or cache[0] is not self.books:
            cache = (self.books, {node for node, book in self.books.items() if book.counted})
            self._counted_cache = cache
        return cache[1]

    def set_members(self, nodes: Iterable[int]) -> None:
        """Count exactly `nodes` from now on: the clients this round samples from (call after
        `begin_round`). A node not counted before joins, with the h_i the server holds for it
        (0 for a new client, its last h_i for one that comes back); a counted node absent
        from `nodes` leaves, and its h_i is kept for its return. Under PP2, h is corrected so
        that h = (1/(pN)) Σ_{i∈C} h_i still holds (`strategies.aggregation`)."""
        now = set(map(int, nodes))
        counted = self._counted()
        leaving = counted - now
        if leaving:  # in the order the server first saw them (the order of `books`)
            for node in [n for n in self.books if n in leaving]:
                self._leave(node)
        for node in sorted(now - counted):
            self.books.setdefault(node, ClientBook())
            self._join(node)
        self.stats.members = len(counted)

    def expected_participants(self, n: int | None = None) -> float:
        """pN for n counted clients (default: the current N), as `sample_clients` draws them."""
        if n is None:
            n = len(self._counted())
        s = self.settings
        return expected_participants(n, s.participation, s.participation_mode)

    def _join(self, node: int) -> None:
        book = self.books.setdefault(node, ClientBook())
        counted = self._counted()
        n = len(counted)
        # Σ h_i += h_j; skipped when h = +0 and h_j = 0 (a new client): (pN·0 + 0)/(pN)' = +0,
        # h stays as it is, without O(d) work per client (O(N·d) when N clients join at once)
        if (
            self.h_global is not None
            and self.h_store is not None
            and (node in self.h_store or not self._h_is_positive_zero())
        ):
            h_j = self.h_store.view(node)
            self.h_global = aggregation.pp2_join(self.h_global, h_j, n, self.expected_participants)
        book.counted = True
        counted.add(node)
        self.stats.joined += 1
        if self._round > 1:
            log.info("round %d: node %d joins (N = %d)", self._round, node, n + 1)

    def _h_is_positive_zero(self) -> bool:
        """h (PP2) is +0.0 everywhere; checked once per h tensor (h is replaced, never changed
        in place, so the answer is cached by the tensor's identity)."""
        h = self.h_global
        cache = self._zero_h_cache
        if cache is None or cache[0] is not h:
            zero = h is not None and not bool(h.any()) and not bool(torch.signbit(h).any())
            cache = self._zero_h_cache = (h, zero)
        return cache[1]

    def _leave(self, node: int) -> None:
        counted = self._counted()
        n = len(counted)
        if self.h_global is not None and self.h_store is not None:  # Σ h_i −= h_j
            h_j = self.h_store.view(node)
            self.h_global = aggregation.pp2_leave(self.h_global, h_j, n, self.expected_participants)
        self.books[node].counted = False
        counted.discard(node)
        self.stats.left += 1
        if self.outstanding.pop(node, None) is not None:  # its h_i must not move outside C
            log.info("round %d: node %d left with a reply outstanding: dropped", self._round, node)
        log.info("round %d: node %d leaves (N = %d)", self._round, node, n - 1)

    def _reset_uplink_memory(self, node: int) -> None:
        """h_i ← 0 on the server; under PP2 h loses the client's share h_i / (pN)."""
        if self.h_store is None:
            return
        h_i = self.h_store.view(node)
        if self.h_global is not None and self.books[node].counted:
            self.h_global = aggregation.pp2_reset(self.h_global, h_i, self.expected_participants())
        self.h_store.set(node, torch.zeros(self.dim))

    # ---- the round
    def begin_round(self, k: int) -> None:
        self.stats = RoundStats()
        self.pending.clear()
        self._sum = None
        self._round = k

    def skip_busy(self, sampled: Iterable[int]) -> list[int]:
        """S_k without the clients whose reply of an earlier round is outstanding: a newer
        downlink would make them drop the state that reply was computed at (its ack round
        is older), so it could never be applied. Counted (`RoundStats.busy_skipped`); the
        draw of S_k itself is unchanged (same seed, round and partitions)."""
        kept = []
        for node in sampled:
            late = self.outstanding.get(node)
            if late is None:
                kept.append(node)
                continue
            self.stats.busy_skipped += 1
            log.info(
                "round %d: node %d skipped: its reply of round %d is outstanding",
                self._round, node, late.round,
            )  # fmt: skip
        return kept

    @_with_kernels
    def downlink_for(self, k: int, node: int) -> Downlink:
        book = self.books.setdefault(node, ClientBook())
        late = self.outstanding.pop(node, None)
        if late is not None:  # the newer downlink acks an older round: that reply is void
            log.warning(
                "round %d: node %d sampled with its reply of round %d outstanding: that "
                "reply can no longer be applied", k, node, late.round,
            )  # fmt: skip
        if not book.counted:  # sampled without `set_members` saying so: it joins
            self._join(node)
        if book.needs_reset:
            self._reset_uplink_memory(node)
            self._reset_client(node)
        message, commit = self._downlink_payload(node, book, k)
        message.ack_round = book.acked_round
        message.reset = book.needs_reset
        message.uplink_seed = derive_seed(self.settings.seed, k, self.seed_key(node), 1)
        if message.reset:
            self.stats.resets_sent += 1
        # h_i's digest as the store knows it (`aggregation.add_uplink` gives it the digest of
        # each h_i it updates): no read of h_i per downlink
        up = tensor_digest(None) if self.h_store is None else self.h_store.digest(node)
        expected = up + b"".join(self._expected_digest_down(node, commit))
        self.pending[node] = PendingReply(message.target_version, expected, commit)
        return message

    @_with_kernels
    def receive(self, k: int, node: int, uplink: Uplink | None, error: str = "") -> str:
        """Validate and take in one reply; return its outcome ('ok', 'failed', 'dropped').

        Never raises because of what a reply holds: any failure of a client's payload
        (stale round, size, undecodable bytes, wrong length, non-finite values, malformed
        or mismatching digest, or any other exception while decoding) makes the reply
        rejected, logged and counted (`RoundStats.rejected`), and the round goes on. A reply
        for another round leaves the client's pending reply of this round in place.
        """
        stamp = getattr(uplink, "round", None)
        if uplink is not None and isinstance(stamp, int) and stamp < k:
            return self._receive_late(k, node, uplink)
        if uplink is not None and stamp != k:
            return self.reject(k, node, f"reply for round {stamp!r}, expected {k}", pop=False)
        pending = self.pending.pop(node, None)
        if pending is None:
            log.warning("round %d: reply from node %d that was not sampled: dropped", k, node)
            self.stats.dropped += 1
            return "dropped"
        if uplink is None:
            log.warning("round %d: node %d failed (%s); its state stays as before", k, node, error)
            return "failed"
        outcome = self._take(k, node, uplink, pending)
        if outcome == "ok":
            self.stats.accepted += 1
        return outcome

    def timeout(self, k: int, node: int) -> str:
        """Client `node` sampled in round k did not reply before the round's deadline.
        With τ = 0 its reply is dropped ('failed', as `receive(k, node, None)`); with τ > 0
        what the server expected from it becomes outstanding, to be applied if the reply
        arrives within τ rounds ('timeout'), and the client is not sampled meanwhile."""
        if self.max_staleness == 0 or node not in self.pending:
            return self.receive(k, node, None, "no reply (timeout)")
        self.outstanding[node] = OutstandingReply(k, self.pending.pop(node))
        log.info(
            "round %d: node %d did not reply in time; its reply may still be applied "
            "until round %d", k, node, k + self.max_staleness,
        )  # fmt: skip
        return "timeout"

    def late_failed(self, j: int, node: int, error: str) -> str:
        """Client `node`'s outstanding reply arrived in round j as an error or a malformed
        message: nothing more will come for it, so it is no longer outstanding ('failed')."""
        late = self.outstanding.pop(node, None)
        k = late.round if late is not None else -1
        self.stats.late_replies.append(
            {"node_id": node, "round": k, "staleness": j - k if late else -1,
             "applied": False, "reason": error}
        )  # fmt: skip
        self.stats.late_refused += 1
        log.warning("round %d: node %d's late reply of round %d failed: %s", j, node, k, error)
        return "failed"

    def _receive_late(self, j: int, node: int, uplink: Uplink) -> str:
        """A reply of round k < j arriving in round j: a delayed update of staleness j − k,
        taken (as a timely reply, into this round's ĝ) when it is client `node`'s outstanding
        reply of round k and j − k ≤ τ, else refused (`late_refused`)."""
        k = uplink.round
        staleness = j - k
        entry: dict[str, Any] = {"node_id": node, "round": k, "staleness": staleness}
        self.stats.late_replies.append(entry)
        late = self.outstanding.get(node)
        if late is None or late.round != k or staleness > self.max_staleness:
            if staleness > self.max_staleness:
                why = f"staleness {staleness} > max-staleness {self.max_staleness}"
            else:
                why = "no longer outstanding (a newer downlink was sent, or the client left)"
            entry.update(applied=False, reason=why)
            self.stats.late_refused += 1
            return self.reject(j, node, f"reply for round {k}, expected {j}: {why}", pop=False)
        del self.outstanding[node]
        outcome = self._take(k, node, uplink, late.expected)
        entry["applied"] = outcome == "ok"
        if outcome == "ok":
            self.stats.late_applied += 1
            log.info("round %d: node %d's reply of round %d applied (staleness %d)",
                     j, node, k, staleness)  # fmt: skip
        else:
            entry["reason"] = uplink.detail or "invalid payload or state digest (see log)"
            self.stats.late_refused += 1
        return outcome

    def _take(self, k: int, node: int, uplink: Uplink, pending: PendingReply) -> str:
        """Check and keep client `node`'s reply of round k (`pending`: what the server
        expected from it); the Δ̂_i goes into the current round's ĝ."""
        book = self.books[node]
        try:
            if uplink.status == "resync":
                log.warning("round %d: node %d asks for a resync: %s", k, node, uplink.detail)
                self.stats.resyncs += 1
                book.needs_reset = True
                return "dropped"
            delta_hat, reason = decode_uplink(k, uplink, self.dim, self.max_uplink_bytes)
        except Exception as exc:  # whatever the client's bytes make the decoder do
            delta_hat, reason = None, f"payload failed to decode: {type(exc).__name__}: {exc}"
        if reason or delta_hat is None:
            return self.reject(k, node, reason, pop=False)
        self.stats.digest_checks += 1
        if uplink.digest != pending.expected_digest:
            log.warning(
                "round %d: node %d state digest differs from the server's in %s: resync",
                k,
                node,
                digest_difference(uplink.digest, pending.expected_digest),
            )
            self.stats.digest_mismatches += 1
            self.stats.resyncs += 1
            self.stats.rejected += 1
            book.needs_reset = True
            return "dropped"
        if self.settings.up_scale != 1.0:  # Δ̂_i·1 = Δ̂_i bit for bit: no pass then
            delta_hat = delta_hat * self.settings.up_scale
        book.acked_round = k
        book.version = pending.target_version
        book.needs_reset = False
        self._commit_client(node, pending.commit)
        self._add_to_sum(node, delta_hat)
        return "ok"

    def reject(self, k: int, node: int, reason: str, pop: bool = True) -> str:
        """Refuse a reply that arrived (its content failed a check): log and count it, and
        with `pop` forget what the server expected from `node` this round. Returns 'dropped'
        (the outcome recorded for the client)."""
        if pop:
            self.pending.pop(node, None)
        log.warning("round %d: node %d reply rejected: %s", k, node, reason)
        self.stats.dropped += 1
        self.stats.rejected += 1
        return "dropped"

    def count_payloads(self, *, sent: int = 0, received: int = 0) -> None:
        """Count codec payloads the transport put on the wire this round: `sent` downlink
        payloads, `received` uplink payloads (`RoundStats.downlink_payloads`,
        `uplink_payloads`; each carries a codec header)."""
        self.stats.downlink_payloads += sent
        self.stats.uplink_payloads += received

    def _add_to_sum(self, node: int, delta_hat: torch.Tensor) -> None:
        """Add an accepted Δ̂_i to this round's running sum and update h_i
        (`aggregation.add_uplink`): the server holds O(d) of the round, not pN replies."""
        if self._sum is None:
            self._sum = torch.zeros(self.dim)
        if self._scratch is None:
            self._scratch = torch.empty(self.dim)
        pp1 = self.h_global is None
        s = self.settings
        aggregation.add_uplink(
            self._sum, node, delta_hat, s.up_memory_rate, self.h_store, pp1, self._scratch
        )

    def aggregate(self, expected: float) -> torch.Tensor:
        """ĝ from the accepted Δ̂_i (PP1 / PP2 / no memory); h_i were updated as each reply
        was taken in, h (PP2) is updated here. The round's sum is consumed (divided in place
        by `aggregation.finish_aggregate`): call once per round."""
        total = self._sum if self._sum is not None else torch.zeros(self.dim)
        g_hat, self.h_global = aggregation.finish_aggregate(
            total, expected, self.settings.up_memory_rate, self.h_global
        )
        return g_hat

    @_with_kernels
    def finish_round(self, k: int, expected: float) -> RoundStats:
        """ĝ = aggregate, then the family moves the model and prepares the next downlink."""
        if expected <= 0:
            raise ValueError(f"expected number of participants must be > 0, got {expected}")
        self.stats.expected_participants = expected
        for node in list(self.pending):  # sampled but never answered
            self.pending.pop(node)
        for node, late in list(self.outstanding.items()):  # k + τ was its last round
            if k - late.round >= self.max_staleness:
                del self.outstanding[node]
                self.stats.late_expired += 1
                log.warning(
                    "round %d: node %d's reply of round %d did not arrive within "
                    "max-staleness %d: dropped", k, node, late.round, self.max_staleness,
                )  # fmt: skip
        g_hat = self.aggregate(expected)
        self._advance(g_hat, k)
        if self.h_store is not None:
            self.h_store.flush()
        return self.stats

    def client_memory(self, node: int) -> torch.Tensor | None:
        """h_i as the server holds it (PP1 and PP2), for tests and diagnostics."""
        return None if self.h_store is None else self.h_store.get(node)

    def close(self) -> None:
        if self.h_store is not None:
            self.h_store.close()
