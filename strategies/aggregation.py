"""The server's aggregation of the uplink (PP1 / PP2) and the memory invariant of PP2.

Notation (ALGORITHMS.md): N = |C| clients counted, sampled set S_k, expected number of
participants pN (`strategies.sampling`), uplink memory rate α_up, accepted messages Δ̂_i.
The aggregation divides by pN, as the papers do, not by |S_k|::

    PP1:  ĝ = (1/(pN)) Σ_{i∈S_k} (Δ̂_i + h_i),  then h_i ← h_i + α_up Δ̂_i  (one h_i per client)
    PP2:  ĝ = (1/(pN)) Σ_{i∈S_k} Δ̂_i + h,      then h ← h + α_up (1/(pN)) Σ_{i∈S_k} Δ̂_i
    no uplink memory:  ĝ = (1/(pN)) Σ_{i∈S_k} Δ̂_i

Memory invariant. The server keeps every client's h_i (PP1 and PP2 alike, in a
`strategies.memory_store.TensorStore`). PP2's update adds α (1/(pN)) Σ_{i∈S_k} Δ̂_i to h
while the h_i add up to α Σ_{i∈S_k} Δ̂_i, and all start at 0, so at every round::

    h = (1/(pN)) Σ_{i∈C} h_i            (h = (1/N) Σ_{i∈C} h_i at p = 1)

When a client's h_i or C changes outside that update, the server restores the invariant
from the h_i it keeps (with Σ = pN·h before the change; `pp2_reset`, `pp2_leave`,
`pp2_join`)::

    reset of client j (h_j ← 0):        h ← h − h_j / (pN)
    client j leaves C (N ← N − 1):      h ← (pN·h − h_j) / (pN)'   (h ← 0 when C is empty)
    client j joins C (N ← N + 1):       h ← (pN·h + h_j) / (pN)'   (h_j = 0 if new)

where (pN)' is the expected number of participants after the change. A run then goes on
exactly as a fault-free PP2 run of the clients in C with those memories, whose fixed point
(h_i = ∇f_i(w*), h = 0) is unbiased. PP1 needs no correction: its ĝ sums Δ̂_i + h_i, unbiased
whatever the h_i.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from strategies.consistency import tensor_digest
from strategies.memory_store import TensorStore

#: n ↦ pN, the expected number of participants among n counted clients
ExpectedFn = Callable[[int], float]


def add_uplink(
    total: torch.Tensor,
    node: int,
    delta_hat: torch.Tensor,
    alpha: float,
    h_store: TensorStore | None,
    pp1: bool,
    scratch: torch.Tensor,
) -> None:
    """Take in one accepted reply (i, Δ̂_i) as it arrives: Σ += Δ̂_i (PP1: Δ̂_i + h_i), then
    h_i ← h_i + α_up Δ̂_i (PP1 and PP2). The round's aggregate is this running sum, so the
    server holds O(d) of it, not the pN decoded replies (O(pN·d)); summed in the order the
    replies are taken in, it is the same floats as summing them all at the end.

    In place, with no d-vector allocated: h_i is changed where the store keeps it
    (`TensorStore.modify`), the sums go through `scratch`, and the store is given the new
    h_i's `tensor_digest` (`TensorStore.set_digest`: the digest the next downlink to client
    i expects, without reading h_i again). Each float is the one ``h_i + α·Δ̂_i`` and
    ``Σ + (Δ̂_i + h_i)`` make out of place (one rounding per operation, in the same order).

    Args:
        total: Σ so far, updated in place.
        node: i.
        delta_hat: Δ̂_i (not changed).
        alpha: α_up.
        h_store: every client's h_i, updated in place; None without uplink memory.
        pp1: add h_i to the sum (PP1; ignored without uplink memory).
        scratch: a float32 d-vector the function may overwrite.
    """
    if h_store is None:
        total += delta_hat
        return
    h_i = h_store.modify(node)
    if pp1:  # PP1: ĝ sums Δ̂_i + h_i (h_i before its update)
        torch.add(delta_hat, h_i, out=scratch)
        total += scratch
    else:
        total += delta_hat
    torch.mul(delta_hat, alpha, out=scratch)  # h_i ← h_i + α Δ̂_i (PP1 and PP2)
    h_i += scratch
    h_store.set_digest(node, tensor_digest(h_i))


def finish_aggregate(
    total: torch.Tensor, expected: float, alpha: float, h_global: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ĝ from the round's sum (`add_uplink`), and the new single memory h (PP2; None otherwise).

    Args:
        total: Σ_{i∈S_k} Δ̂_i (PP1: Σ (Δ̂_i + h_i)) over the accepted replies; consumed: it
            is divided in place (it becomes Σ/(pN), PP1's ĝ), so that the round allocates
            no d-vector for the mean.
        expected: pN, the expected number of participants (> 0).
        alpha: α_up.
        h_global: PP2's h (not changed: h' is a new tensor), or None (PP1, or no uplink
            memory).

    Returns:
        (ĝ, h') with ĝ = Σ/(pN) (+ h under PP2) and h' = h + α_up Σ/(pN) under PP2, else
        (ĝ, None).
    """
    mean = total.div_(expected)
    if h_global is not None:  # PP2: ĝ = mean + h, h ← h + α mean
        g_hat = mean + h_global
        return g_hat, h_global + mean.mul_(alpha)
    return mean, None


def pp2_reset(h_global: torch.Tensor, h_j: torch.Tensor, expected: float) -> torch.Tensor:
    """Client j's h_j is reset to 0: h ← h − h_j / (pN)."""
    return h_global - h_j / expected


def pp2_leave(
    h_global: torch.Tensor, h_j: torch.Tensor, n: int, expected: ExpectedFn
) -> torch.Tensor:
    """Client j leaves the n counted clients: h ← (pN·h − h_j) / (pN)', 0 when none remain."""
    if n == 1:
        return torch.zeros(h_global.numel())
    return (h_global * expected(n) - h_j) / expected(n - 1)


def pp2_join(
    h_global: torch.Tensor, h_j: torch.Tensor, n: int, expected: ExpectedFn
) -> torch.Tensor:
    """Client j joins the n counted clients: h ← (pN·h + h_j) / (pN)' (pN·h = 0 when n = 0)."""
    total = h_global * expected(n) if n else torch.zeros(h_global.numel())
    return (total + h_j) / expected(n + 1)
