"""The server's store of one d-vector per client, in RAM or spilled to disk.

What it holds: every client's uplink memory h_i (PP1 and PP2 alike; PP2 needs them to keep
its single h = (1/(pN)) Σ_{i∈C} h_i exact when a client resets, leaves or joins, see
`strategies.aggregation`) and Rand-MCM's downlink memories H_i. PP1 costs O(N·d) server
memory, so the store must scale past RAM (ALGORITHMS.md)::

    N·d·4 bytes ≤ budget   →  a dict of N tensors in RAM
    N·d·4 bytes > budget   →  a float32 file (row j = client j; sparse, grown by doubling)
                              read and written with pread/pwrite, and an LRU cache of at most
                              `cache_rows` rows and `cache_bytes` bytes in RAM: resident
                              memory O(cache), not O(N·d)

The file is read and written with positioned I/O, not memory-mapped: the pages of a shared
mapping that a round touched stay in the process's resident set (a server that wrote the
memories of 100 clients per round for 20 rounds held 2000 rows resident), while written
pages live in the kernel's page cache, which the kernel reclaims as it needs.

Costs per d-vector at d = 10^7 (one 40 MB row), what the server's hot path avoids: a fresh
d-vector costs its page faults (~2-3 ns/coordinate, twice to 10x the pass that fills it), so
`get` (a copy) is for callers that keep the vector, `view` (the vector itself, read-only)
and `modify` (the vector itself, changed in place) for the server's receive path, and the
cache reuses the tensor of the row it evicts. The store also keeps each vector's state
digest (`digest`, `set_digest`; `strategies.consistency`) while it is known, so that the
digest a downlink expects needs no read of h_i.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from strategies.consistency import tensor_digest

log = logging.getLogger("flwr.fedsqueeze.strategies")


class TensorStore:
    """One d-vector per client (uplink memories h_i in PP1, downlink memories H_i in Rand-MCM).

    Kept in RAM while N·d·4 bytes stay under `ram_budget_bytes`; beyond that the vectors live
    in a float32 file (one row per client, grown on demand) with an LRU cache of at most
    `cache_rows` rows and `cache_bytes` bytes (at least one row) in RAM, so the server's
    resident memory stays O(cache), not O(N·d). Missing clients read as `initial` (zeros when
    not given; Rand-MCM's H_i start at w_0).
    """

    def __init__(
        self,
        dim: int,
        ram_budget_bytes: int = 512 * 2**20,
        cache_rows: int = 64,
        directory: str | Path | None = None,
        expected_clients: int = 0,
        initial: torch.Tensor | None = None,
        cache_bytes: int = 128 * 2**20,
    ) -> None:
        self.dim = dim
        self.initial = (
            torch.zeros(dim)
            if initial is None
            else initial.detach().to("cpu", torch.float32).reshape(-1).clone()
        )
        if self.initial.numel() != dim:
            raise ValueError(f"initial vector has {self.initial.numel()} values, expected {dim}")
        self.cache_rows = max(1, min(cache_rows, cache_bytes // (4 * max(dim, 1))))
        self._row_bytes = 4 * dim
        self._ram: dict[int, torch.Tensor] | None = {}
        self._rows: dict[int, int] = {}
        self._fd: int | None = None  # the file's descriptor once on disk
        self._file: Path | None = None
        self._capacity = 0  # rows the file holds
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._dirty: set[int] = set()
        #: `tensor_digest` of stored vectors, while known (`set_digest`, `digest`)
        self._digests: dict[int, bytes] = {}
        self._initial_digest: bytes | None = None
        self._budget = ram_budget_bytes
        self._dir = Path(directory) if directory else None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if expected_clients * dim * 4 > ram_budget_bytes:
            self._to_disk(max(expected_clients, 1))

    @property
    def on_disk(self) -> bool:
        return self._fd is not None

    def __len__(self) -> int:
        return len(self._ram) if self._ram is not None else len(self._rows)

    def __contains__(self, key: int) -> bool:
        return key in (self._ram if self._ram is not None else self._rows)

    def _path(self) -> Path:
        if self._dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="fedsqueeze-store-")
            self._dir = Path(self._tmp.name)
        self._dir.mkdir(parents=True, exist_ok=True)
        return self._dir / "memories.f32"

    def _to_disk(self, capacity: int) -> None:
        self._file = self._path()
        self._fd = os.open(self._file, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self._resize(capacity)
        log.info("client memories moved to disk: %s (%d rows x %d)", self._file, capacity, self.dim)
        ram, self._ram = self._ram or {}, None
        digests = dict(self._digests)
        for key, value in ram.items():
            self.set(key, value)
        self._digests.update(digests)  # the same vectors

    def _disk(self) -> int:
        """The file descriptor of a store that has moved to disk."""
        if self._fd is None:
            raise RuntimeError("TensorStore: the file is closed")
        return self._fd

    def _resize(self, capacity: int) -> None:
        os.ftruncate(self._disk(), capacity * self._row_bytes)  # sparse: no blocks written
        self._capacity = capacity

    def _grow(self) -> None:
        self._resize(self._capacity * 2)

    def get(self, key: int) -> torch.Tensor:
        """Client `key`'s vector, a copy (`initial` for a key never set)."""
        return self.view(key).clone()

    def view(self, key: int) -> torch.Tensor:
        """Client `key`'s vector itself, not a copy: to be read, not changed, and only until
        the next call on the store (on disk, a cached row's tensor is reused for another row
        once the row leaves the cache). `initial` for a key never set."""
        if self._ram is not None:
            value = self._ram.get(key)
            return self.initial if value is None else value
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        row = self._rows.get(key)
        if row is None:
            return self.initial
        value = self._slot()
        self._read_row(row, value.numpy())
        self._cache[key] = value
        return value

    def modify(self, key: int) -> torch.Tensor:
        """Client `key`'s vector itself (`initial` for a key never set), for the caller to
        change in place before its next call on the store; the store counts it as changed
        (on disk: written back when it leaves the cache, or by `flush`) and forgets its
        digest (`set_digest`)."""
        if key not in self:
            self.set(key, self.initial)
        self._digests.pop(key, None)
        if self._ram is not None:
            return self._ram[key]
        value = self.view(key)
        self._dirty.add(key)
        return value

    def digest(self, key: int) -> bytes:
        """`tensor_digest` of client `key`'s vector: the one given to `set_digest` since the
        vector last changed, else computed (and kept) now."""
        known = self._digests.get(key)
        if known is not None:
            return known
        if key not in self:
            if self._initial_digest is None:
                self._initial_digest = tensor_digest(self.initial)
            return self._initial_digest
        known = self._digests[key] = tensor_digest(self.view(key))
        return known

    def set_digest(self, key: int, digest: bytes) -> None:
        """Remember `digest`, the `tensor_digest` of client `key`'s vector as it is now
        (computed by the caller while the vector is at hand, so that `digest` need not read
        it again)."""
        if key not in self:
            raise KeyError(f"TensorStore: no vector for client {key}")
        self._digests[key] = digest

    def _read_row(self, row: int, out: np.ndarray) -> None:
        view, offset = out.data.cast("B"), row * self._row_bytes
        while view:  # pread may return fewer bytes than asked
            n = os.preadv(self._disk(), [view], offset)
            if n <= 0:
                raise OSError(f"TensorStore: short read of row {row} in {self._file}")
            view, offset = view[n:], offset + n

    def set(self, key: int, value: torch.Tensor) -> None:
        """Store a copy of `value` as client `key`'s vector."""
        self._digests.pop(key, None)
        value, d = value.detach().to("cpu", torch.float32).reshape(-1), self.dim
        if value.numel() != d:
            raise ValueError(f"TensorStore: {value.numel()} values for client {key}, not {d}")
        if self._ram is not None:
            self._ram[key] = value.clone()
            if len(self._ram) * self.dim * 4 > self._budget:
                self._to_disk(len(self._ram) * 2)
            return
        if key not in self._rows:
            if len(self._rows) >= self._capacity:
                self._grow()
            self._rows[key] = len(self._rows)
        slot = self._cache.get(key)
        if slot is None:  # (when `value` is the evicted row's tensor, it is copied onto itself)
            slot = self._cache[key] = self._slot()
        slot.copy_(value)
        self._cache.move_to_end(key)
        self._dirty.add(key)

    def _slot(self) -> torch.Tensor:
        """A tensor for one more cached row: when the cache is full, the least recently used
        row's (written to the file first if it changed), else a new one. Reusing the rows'
        tensors spares the page faults of a fresh d-vector per row read (~2 ns/coordinate)."""
        if len(self._cache) < self.cache_rows:
            return torch.empty(self.dim)
        old_key, old_value = self._cache.popitem(last=False)
        if old_key in self._dirty:
            self._write(old_key, old_value)
        return old_value

    def _write(self, key: int, value: torch.Tensor) -> None:
        view, offset = value.numpy().data.cast("B"), self._rows[key] * self._row_bytes
        while view:  # pwrite may write fewer bytes than given
            n = os.pwrite(self._disk(), view, offset)
            view, offset = view[n:], offset + n
        self._dirty.discard(key)

    def export(self) -> tuple[list[int], torch.Tensor]:
        """(keys, rows): every stored vector, row j belonging to keys[j] (for checkpoints).
        On disk the rows are a copy-on-write memory map of the flushed file, not a copy in
        RAM."""
        if self._ram is not None:
            keys = list(self._ram)
            rows = [self._ram[k] for k in keys]
            return keys, torch.stack(rows) if rows else torch.zeros(0, self.dim)
        self.flush()
        keys = sorted(self._rows, key=self._rows.__getitem__)  # rows are 0..n-1 in this order
        if not keys:
            return keys, torch.zeros(0, self.dim)
        self._disk()
        file = str(self._file)
        mapped = np.memmap(file, dtype=np.float32, mode="c", shape=(len(keys), self.dim))
        return keys, torch.from_numpy(mapped)

    def load(self, keys: Sequence[int], rows: torch.Tensor) -> None:
        """Replace the contents with `export`'s (keys, rows) (restoring a checkpoint)."""
        if rows.shape != (len(keys), self.dim):
            raise ValueError(
                f"rows of shape {tuple(rows.shape)} for {len(keys)} keys of {self.dim}"
            )
        self._digests.clear()
        if self._ram is not None:
            self._ram = {}
        else:
            self._rows.clear()
            self._cache.clear()
            self._dirty.clear()
        for key, row in zip(keys, rows, strict=True):
            self.set(int(key), row)
        self.flush()

    def flush(self) -> None:
        """Write the cached rows that changed to the file (into the kernel's page cache: the
        store is scratch, a checkpoint holds the durable copy)."""
        if self._fd is not None:
            for key in list(self._dirty):
                self._write(key, self._cache[key])

    def close(self) -> None:
        self.flush()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
