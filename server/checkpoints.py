"""Where the ServerApp keeps its per-round checkpoints, and how a run resumes from one.

After every committed round k the ServerApp writes one file::

    <checkpoint-dir>/<store>/run-<RUN>/server.ckpt

with ``checkpoint-dir`` from the run config ('' = ``checkpoints/`` beside the SQLite store's
file, e.g. ``$FEDSQUEEZE_HOME/checkpoints`` for the default store, and
``$FEDSQUEEZE_HOME/checkpoints`` for PostgreSQL; 'off' = none), ``<store>`` the first 12
hex digits of the SHA-256 of the store's URL (password hidden), so that run 7 of one store
never overwrites run 7 of another, and ``RUN`` the run's id in that store. The file holds
the server half's whole state (`strategies.checkpoint`), the sampler's random generator, k
and round k's record.
It is replaced atomically each round (0600 in 0700 folders).

Order within a round: the checkpoint is written *before* round k goes to the store. A crash
between the two leaves the store one round behind the checkpoint; `resume_server` then
stores round k from the checkpoint's copy, so the store ends with rounds 1..R exactly once.

Resuming (run-config ``resume-run`` = RUN, set by ``fedsqueeze simulate --resume RUN`` and
``fedsqueeze run --resume RUN``): the ServerApp reopens the run in the store (status back to
``running``), rebuilds the server half from the run config, restores the checkpoint into it
and continues with round k + 1. The new Flower run's ClientApps start with empty state
(Flower keeps a ClientApp's ``context.state`` per run), so every client's memories are reset
on first contact by the existing resync path (reset flag + full-precision snapshot).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.records import (
    Recorder,
    ResumableRecorder,
    RoundRecord,
    round_record_from_json,
    to_jsonable,
)
from strategies import checkpoint
from strategies.server_half import ServerHalf

log = logging.getLogger("flwr.fedsqueeze.checkpoints")

CHECKPOINT_FILE = "server.ckpt"
OFF = "off"


class ResumeError(ValueError):
    """A run that cannot be resumed (no checkpoint, store and checkpoint disagree, ...)."""


def checkpoint_root(value: str, store_key: str) -> Path | None:
    """The run config's ``checkpoint-dir``: 'off' → None; '' → ``checkpoints/`` beside a
    SQLite store's file (``$FEDSQUEEZE_HOME/checkpoints`` for the default store), else
    ``$FEDSQUEEZE_HOME/checkpoints``; anything else is the directory."""
    if value.strip().lower() == OFF:
        return None
    if value.strip():
        return Path(value).expanduser()
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from core.paths import fedsqueeze_home

    with contextlib.suppress(ArgumentError):
        url = make_url(store_key)
        if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
            return Path(str(url.database)).expanduser().resolve().parent / "checkpoints"
    return fedsqueeze_home() / "checkpoints"


def store_folder_name(store_key: str) -> str:
    return hashlib.sha256(store_key.encode("utf-8")).hexdigest()[:12]


def checkpoint_path(root: Path, store_key: str, run_id: int) -> Path:
    return root / store_folder_name(store_key) / f"run-{run_id}" / CHECKPOINT_FILE


def find_checkpoint(config_value: str, store_key: str, run_id: int) -> Path:
    """The checkpoint file of run `run_id`, or `ResumeError` saying why there is none."""
    root = checkpoint_root(config_value, store_key)
    if root is None:
        raise ResumeError(f"run {run_id} was started with checkpoint-dir='off': no checkpoint")
    path = checkpoint_path(root, store_key, run_id)
    if not path.is_file():
        raise ResumeError(f"run {run_id} has no checkpoint (looked for {path})")
    return path


@dataclass
class Checkpointer:
    """Writes the server half's state after each committed round (`save` is the strategy's
    per-round hook)."""

    path: Path
    server: ServerHalf
    sampler: np.random.Generator
    last_bytes: int = 0
    last_seconds: float = 0.0

    def save(self, k: int, record: RoundRecord) -> None:
        t0 = time.perf_counter()
        state = checkpoint.capture(
            self.server,
            round=k,
            sampler=self.sampler,
            record=json.dumps(to_jsonable(record)),
        )
        self.last_bytes = checkpoint.save(state, self.path)
        self.last_seconds = time.perf_counter() - t0
        log.info(
            "round %d: checkpoint %s (%d bytes, %.3f s)",
            k, self.path, self.last_bytes, self.last_seconds,
        )  # fmt: skip


@dataclass
class Resumed:
    """What a restored checkpoint gives the ServerApp."""

    last_round: int
    sampler: np.random.Generator


def reopen_run(recorder: Recorder, run_id: int, flower_run_id: int | None) -> int:
    """Reopen the run in the store; return its last stored round."""
    if not isinstance(recorder, ResumableRecorder):
        raise ResumeError(
            f"the store {type(recorder).__name__} cannot resume runs: use a SQL store"
        )
    return recorder.resume_run(run_id, flower_run_id)


def resume_server(
    server: ServerHalf, path: Path, recorder: Recorder, run_id: int, stored_rounds: int
) -> Resumed:
    """Restore `server` from the checkpoint at `path` and bring the store level with it.

    Every known client is marked for a reset (its state is gone with the old Flower run).
    """
    try:
        state = checkpoint.load(path)
    except FileNotFoundError:
        raise ResumeError(f"run {run_id} has no checkpoint (looked for {path})") from None
    extra: dict[str, Any] = checkpoint.restore(server, state)
    k = int(extra["round"])
    if stored_rounds == k - 1:
        log.warning("run %d: round %d was checkpointed but not stored: storing it now", run_id, k)
        recorder.record_round(run_id, round_record_from_json(json.loads(extra["record"])))
    elif stored_rounds != k:
        raise ResumeError(
            f"run {run_id}: the store holds {stored_rounds} rounds, the checkpoint is of round "
            f"{k}: they do not belong together"
        )
    for book in server.books.values():
        book.needs_reset = True
    sampler = extra["sampler"]
    if not isinstance(sampler, np.random.Generator):
        raise ResumeError(f"{path}: the checkpoint lacks the sampler's state")
    log.info(
        "run %d: resumed from %s after round %d (%d clients will be resynced)",
        run_id, path, k, len(server.books),
    )  # fmt: skip
    return Resumed(k, sampler)


def remove_stale(path: Path) -> None:
    """Remove a checkpoint left by an earlier store with the same run id (a fresh run)."""
    if path.is_file():
        log.warning("removing a checkpoint of an earlier run with the same id: %s", path)
        os.unlink(path)


def stored_run_to_resume(database_url: str | None, run_id: int) -> tuple[dict[str, Any], Path]:
    """For the command lines: run `run_id`'s stored run config and its checkpoint file, or
    `ResumeError` with one line saying why it cannot be resumed (checked before anything
    starts)."""
    from api.errors import ConflictError, NotFoundError
    from api.store import open_store

    if run_id < 1:
        raise ResumeError(f"--resume: run ids start at 1, got {run_id}")
    try:
        store = open_store(database_url)
    except Exception as exc:
        from core.secrets import redact_text

        raise ResumeError(f"cannot open the store: {redact_text(str(exc))}") from None
    try:
        run = store.check_resumable(run_id)
    except (NotFoundError, ConflictError) as exc:
        raise ResumeError(f"--resume {run_id}: {exc}") from None
    finally:
        key = store.engine.url.render_as_string(hide_password=True)
        store.engine.dispose()
    config = dict(run.config or {})
    if config.get("strategy") == "flwr-fedavg":
        raise ResumeError(f"--resume {run_id}: flwr-fedavg runs keep no checkpoint")
    path = find_checkpoint(str(config.get("checkpoint-dir", "")), key, run_id)
    return config, path
