"""Client selection: which clients take part in round k, and how many are expected to.

Two modes (ALGORITHMS.md, "Sampling"), over the N clients the server counts::

    "bernoulli"  each client joins S_k independently with probability p (redrawn while
                 S_k = ∅), as in the papers; the expected number of participants is pN = p·N
    "fraction"   a uniform sample of max(1, round(p·N)) clients (Flower's usual fraction);
                 pN = |S_k|

The aggregation divides by pN, not by |S_k| (`strategies.aggregation`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def sample_clients(
    nodes: Sequence[int],
    participation: float,
    mode: str,
    rng: np.random.Generator,
) -> tuple[list[int], float]:
    """Draw S_k and return (S_k, pN), the expected number of participants.

    "bernoulli": each client joins independently with probability p (redrawn while S_k is
    empty), pN = p·N as in the papers; "fraction": a uniform sample of max(1, round(p·N))
    clients, pN = |S_k|.
    """
    nodes = sorted(nodes)
    n = len(nodes)
    if n == 0:
        raise ValueError("no clients to sample from")
    expected = expected_participants(n, participation, mode)
    if mode == "fraction":
        picked = rng.choice(n, size=int(expected), replace=False)
        return [nodes[i] for i in sorted(picked.tolist())], expected
    while True:
        mask = rng.random(n) < participation
        if mask.any():
            return [nodes[i] for i in np.flatnonzero(mask).tolist()], expected


def expected_participants(n: int, participation: float, mode: str) -> float:
    """pN of `sample_clients`: p·N ("bernoulli") or max(1, round(p·N)) ("fraction")."""
    if mode == "fraction":
        return float(max(1, round(participation * n)))
    if mode != "bernoulli":
        raise ValueError(f"participation-mode must be 'bernoulli' or 'fraction', got {mode!r}")
    return participation * n
