"""Server checkpoints (fast, no Flower): a server half saved after round r and restored into
a fresh one continues bit for bit like the uninterrupted server, for every registered
strategy; the file is written atomically with private permissions."""

from __future__ import annotations

import os
import stat
from typing import Any

import numpy as np
import pytest
import torch

from strategies import checkpoint
from strategies.client_half import ClientState, client_round, initial_client_state
from strategies.memory_store import TensorStore
from strategies.registry import PRESETS, client_apply, make_server, settings_from_config
from tasks.synthetic import make_lsq_task

N, D = 6, 16


def _problem():
    task = make_lsq_task(num_partitions=N, dim=D, samples_per_client=20, seed=5)
    A = [task.A(i).float() for i in range(N)]
    b = [task.b(i).float() for i in range(N)]

    def compute(i: int):
        def f(w: torch.Tensor) -> tuple[torch.Tensor, float, int]:
            r = A[i] @ w - b[i]
            return A[i].T @ r / A[i].shape[0], float((r * r).mean()), 1

        return f

    return compute


class Federation:
    """The clients of a run (committed and pending states), driven by plain calls."""

    def __init__(self, settings: Any, w0: torch.Tensor) -> None:
        self.settings, self.w0 = settings, w0
        self.committed = {i: initial_client_state(w0, settings) for i in range(N)}
        self.pending: dict[int, ClientState | None] = {i: None for i in range(N)}
        self.compute = _problem()

    def copy(self) -> Federation:
        other = Federation.__new__(Federation)
        other.settings, other.w0, other.compute = self.settings, self.w0, self.compute
        other.committed = {i: s.copy() for i, s in self.committed.items()}
        other.pending = {i: None if s is None else s.copy() for i, s in self.pending.items()}
        return other

    def round(self, server: Any, rng: np.random.Generator, k: int) -> list[Any]:
        """One round; return everything that crossed the wire and the server's model."""
        from strategies.sampling import sample_clients

        s = self.settings
        nodes, expected = sample_clients(list(range(N)), s.participation, "bernoulli", rng)
        server.begin_round(k)
        seen: list[Any] = [nodes]
        for i in nodes:
            down = server.downlink_for(k, i)
            seen.append((down.kind, down.reset, down.payloads))
            step = client_round(
                s, self.committed[i], self.pending[i], down, self.w0, client_apply(s),
                self.compute(i),
            )  # fmt: skip
            self.committed[i], self.pending[i] = step.committed, step.pending
            if i == nodes[0] and k % 3 == 0:  # a lost reply now and then: rollbacks
                server.receive(k, i, None, "lost (test)")
                continue
            seen.append((server.receive(k, i, step.uplink), step.uplink.payload))
        stats = server.finish_round(k, expected)
        seen.append(stats.as_dict())
        seen.append(server.evaluation_model().clone())
        return seen


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("pp", ["pp1", "pp2"])
def test_restored_server_continues_bit_for_bit(name: str, pp: str, tmp_path) -> None:
    config = {"strategy": name, "pp-variant": pp, "participation": 0.5, "seed": 3,
              "client-lr": 0.1}  # fmt: skip
    settings = settings_from_config(config, D)
    w0 = torch.randn(D, generator=torch.Generator().manual_seed(1))
    server = make_server(settings, w0, store_dir=tmp_path / "a", expected_clients=N)
    clients = Federation(settings, w0)
    rng = np.random.default_rng(settings.seed)
    for k in range(1, 6):
        clients.round(server, rng, k)
    path = tmp_path / "ckpt" / "server.ckpt"
    checkpoint.save(checkpoint.capture(server, round=5, sampler=rng), path)

    restored = make_server(settings, w0, store_dir=tmp_path / "b", expected_clients=N)
    extra = checkpoint.restore(restored, checkpoint.load(path))
    assert extra["round"] == 5
    rng_b = extra["sampler"]
    clients_b = clients.copy()
    for k in range(6, 12):
        a = clients.round(server, rng, k)
        b = clients_b.round(restored, rng_b, k)
        assert _same(a, b), f"round {k} differs after the restore"
    # and the state itself: every saved attribute equal
    for attr, value in vars(server).items():
        if checkpoint._keep(server, attr) and isinstance(value, torch.Tensor | int | float):
            assert _same(value, getattr(restored, attr)), attr
    server.close()
    restored.close()


def test_state_added_later_is_covered_without_more_code(tmp_path) -> None:
    """A new tensor, a dict of residuals per client, a generator and a second store on a
    server half are saved and restored by the same walk."""
    settings = settings_from_config({"strategy": "dore", "pp-variant": "pp1"}, D)
    server = make_server(settings, torch.zeros(D))
    server.e_client = {3: torch.arange(D, dtype=torch.float32), 7: torch.ones(D)}  # type: ignore[attr-defined]
    server.new_tensor = torch.full((D,), 2.5)  # type: ignore[attr-defined]
    server.noise = torch.Generator().manual_seed(9)  # type: ignore[attr-defined]
    server.h_i_pp2 = TensorStore(D)  # type: ignore[attr-defined]
    server.h_i_pp2.set(4, torch.full((D,), -1.0))  # type: ignore[attr-defined]
    path = tmp_path / "s.ckpt"
    checkpoint.save(checkpoint.capture(server), path)
    fresh = make_server(settings, torch.zeros(D))
    fresh.e_client, fresh.new_tensor = {}, torch.zeros(D)  # type: ignore[attr-defined]
    fresh.noise, fresh.h_i_pp2 = torch.Generator(), TensorStore(D)  # type: ignore[attr-defined]
    checkpoint.restore(fresh, checkpoint.load(path))
    assert torch.equal(fresh.e_client[3], torch.arange(D, dtype=torch.float32))  # type: ignore[attr-defined]
    assert torch.equal(fresh.new_tensor, torch.full((D,), 2.5))  # type: ignore[attr-defined]
    assert torch.equal(fresh.noise.get_state(), server.noise.get_state())  # type: ignore[attr-defined]
    assert torch.equal(fresh.h_i_pp2.get(4), torch.full((D,), -1.0))  # type: ignore[attr-defined]


def test_state_of_an_unknown_kind_is_refused_by_name() -> None:
    settings = settings_from_config({"strategy": "artemis"}, D)
    server = make_server(settings, torch.zeros(D))
    with open(os.devnull) as handle:
        server.handle = handle  # type: ignore[attr-defined]
        with pytest.raises(checkpoint.CheckpointError, match="handle: cannot save"):
            checkpoint.capture(server)


def test_checkpoint_of_other_settings_is_refused(tmp_path) -> None:
    server = make_server(settings_from_config({"strategy": "artemis"}, D), torch.zeros(D))
    checkpoint.save(checkpoint.capture(server), tmp_path / "c")
    other = make_server(
        settings_from_config({"strategy": "artemis", "server-lr": 0.3}, D), torch.zeros(D)
    )
    with pytest.raises(checkpoint.CheckpointError, match="other algorithm settings"):
        checkpoint.restore(other, checkpoint.load(tmp_path / "c"))
    mcm = make_server(settings_from_config({"strategy": "mcm"}, D), torch.zeros(D))
    with pytest.raises(checkpoint.CheckpointError, match="PreservedServer"):
        checkpoint.restore(mcm, checkpoint.load(tmp_path / "c"))


def test_save_is_atomic_and_private(tmp_path) -> None:
    server = make_server(settings_from_config({"strategy": "artemis"}, D), torch.zeros(D))
    path = tmp_path / "run" / "server.ckpt"
    size = checkpoint.save(checkpoint.capture(server, round=1), path)
    assert size == path.stat().st_size > 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    before = path.read_bytes()

    class Boom(RuntimeError):
        pass

    def failing_save(*_a: Any, **_k: Any) -> None:
        raise Boom

    original = torch.save
    torch.save = failing_save  # a crash half-way through writing
    try:
        with pytest.raises(Boom):
            checkpoint.save(checkpoint.capture(server, round=2), path)
    finally:
        torch.save = original
    assert path.read_bytes() == before  # the previous checkpoint is intact
    assert [p.name for p in path.parent.iterdir()] == ["server.ckpt"]  # no temp file left
    (tmp_path / "junk").write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError, match="not a readable checkpoint"):
        checkpoint.load(tmp_path / "junk")


def test_spilled_tensor_store_round_trips(tmp_path) -> None:
    store = TensorStore(D, ram_budget_bytes=4 * D * 2, cache_rows=1, directory=tmp_path / "a")
    for key in (5, 1, 9, 3):
        store.set(key, torch.full((D,), float(key)))
    assert store.on_disk
    keys, rows = store.export()
    other = TensorStore(D, ram_budget_bytes=4 * D * 2, cache_rows=1, directory=tmp_path / "b")
    other.load(keys, rows.clone())
    for key in (5, 1, 9, 3):
        assert torch.equal(other.get(key), torch.full((D,), float(key)))
    assert 2 not in other
    store.close()
    other.close()


def test_compressors_are_rebuilt_not_saved(tmp_path) -> None:
    from strategies.encoding import get_compressor

    server = make_server(settings_from_config({"strategy": "dore"}, D), torch.zeros(D))
    server.ef_compressor = get_compressor("topk:k=3")  # type: ignore[attr-defined]
    state = checkpoint.capture(server)
    assert "ef_compressor" not in state["attributes"]
    assert "up_compressor" not in state["attributes"] and "w" in state["attributes"]


def _rename_classes(tree: Any, renames: dict[str, str], seen: set[str]) -> Any:
    """`tree` with every saved object's class path renamed by `renames`."""
    if isinstance(tree, list):
        return [_rename_classes(v, renames, seen) for v in tree]
    if not isinstance(tree, dict):
        return tree
    out = {k: _rename_classes(v, renames, seen) for k, v in tree.items()}
    path = tree.get("__object__")
    if isinstance(path, str) and path in renames:
        seen.add(path)
        out["__object__"] = renames[path]
    return out


def test_checkpoint_written_before_the_split_of_common_restores(tmp_path) -> None:
    """Checkpoints written when ClientBook, RoundStats, BroadcastLog and Wire lived in
    `strategies.common` name them so; they restore into the classes' new modules."""
    settings = settings_from_config({"strategy": "artemis", "participation": 0.5}, D)
    w0 = torch.randn(D, generator=torch.Generator().manual_seed(2))
    server = make_server(settings, w0, expected_clients=N)
    clients = Federation(settings, w0)
    rng = np.random.default_rng(settings.seed)
    for k in range(1, 4):
        clients.round(server, rng, k)
    old_names = {new: old for old, new in checkpoint._MOVED.items()}
    seen: set[str] = set()
    state = _rename_classes(checkpoint.capture(server), old_names, seen)
    assert {p.split(":")[1] for p in seen} == {"ClientBook", "RoundStats", "BroadcastLog", "Wire"}
    path = tmp_path / "old.ckpt"
    checkpoint.save(state, path)
    restored = make_server(settings, w0, expected_clients=N)
    checkpoint.restore(restored, checkpoint.load(path))
    assert restored.books == server.books and restored.stats == server.stats
    assert type(restored.log) is type(server.log)  # type: ignore[attr-defined]
    assert list(restored.log._entries) == list(server.log._entries)  # type: ignore[attr-defined]
    a, b = clients.copy(), clients
    assert _same(
        a.round(restored, np.random.default_rng(7), 4), b.round(server, np.random.default_rng(7), 4)
    )
