"""Resuming a run after a crash of its ServerApp: the store and the checkpoint brought level
(fast), bad --resume input refused before anything starts (fast), and a real simulation
whose ServerApp process dies after round 2, resumed to the end (slow)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from api.errors import ConflictError, NotFoundError
from api.store import SqlRecorder
from core.records import RoundRecord, RunInfo
from server.checkpoints import (
    Checkpointer,
    ResumeError,
    checkpoint_path,
    reopen_run,
    resume_server,
    stored_run_to_resume,
)
from strategies.registry import make_server, settings_from_config
from strategies.server_half import ClientBook

ROOT = Path(__file__).resolve().parents[1]
FEDSQUEEZE = str(Path(sys.executable).with_name("fedsqueeze"))
D = 8


def _info(**config: Any) -> RunInfo:
    return RunInfo("artemis", "q", "q", "synthetic-lsq", {"strategy": "artemis", **config})


def _record(k: int) -> RoundRecord:
    return RoundRecord(round=k, sampled=2, replied=2, failed=0, uplink_bytes=10 * k,
                       downlink_bytes=5, predicted_uplink_bytes=10, predicted_downlink_bytes=5,
                       train_loss=1.0 / k)  # fmt: skip


def _crashed_run(tmp_path: Path, stored: int, checkpointed: int) -> tuple[str, int, Path]:
    """A run whose ServerApp stored `stored` rounds and checkpointed round `checkpointed`,
    then died (its recorder closed as the stale-run check would)."""
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    recorder = SqlRecorder(url)
    run_id = recorder.start_run(_info())
    server = make_server(settings_from_config({"strategy": "artemis"}, D), torch.zeros(D))
    server.books[11] = ClientBook()
    path = checkpoint_path(tmp_path / "ckpt", recorder.store_key, run_id)
    saver = Checkpointer(path, server, np.random.default_rng(7))
    for k in range(1, checkpointed + 1):
        saver.save(k, _record(k))
        if k <= stored:
            recorder.record_round(run_id, _record(k))
    recorder.close("interrupted")
    return url, run_id, path


def test_resume_stores_the_round_the_crash_left_out(tmp_path: Path) -> None:
    url, run_id, path = _crashed_run(tmp_path, stored=2, checkpointed=3)
    recorder = SqlRecorder(url)
    stored = reopen_run(recorder, run_id, flower_run_id=99)
    assert stored == 2
    server = make_server(settings_from_config({"strategy": "artemis"}, D), torch.zeros(D))
    resumed = resume_server(server, path, recorder, run_id, stored)
    assert resumed.last_round == 3
    assert resumed.sampler.random() == np.random.default_rng(7).random()
    assert all(book.needs_reset for book in server.books.values()) and 11 in server.books
    run = recorder.store.get_run(run_id)
    assert (run.status, run.flower_run_id, run.rounds_done) == ("running", 99, 3)
    rounds = recorder.store.list_rounds(run_id).items
    assert [r.round for r in rounds] == [1, 2, 3]
    assert rounds[2].uplink_bytes == 30  # round 3 as the checkpoint recorded it
    recorder.finish_run(run_id, "finished")


def test_store_and_checkpoint_that_do_not_belong_together_are_refused(tmp_path: Path) -> None:
    url, run_id, path = _crashed_run(tmp_path, stored=1, checkpointed=3)
    recorder = SqlRecorder(url)
    stored = reopen_run(recorder, run_id, None)
    server = make_server(settings_from_config({"strategy": "artemis"}, D), torch.zeros(D))
    with pytest.raises(ResumeError, match="holds 1 rounds, the checkpoint is of round 3"):
        resume_server(server, path, recorder, run_id, stored)
    recorder.close()


def test_only_a_crashed_run_with_a_checkpoint_can_be_resumed(tmp_path: Path) -> None:
    url, run_id, _ = _crashed_run(tmp_path, stored=2, checkpointed=2)
    store_dir = str(tmp_path / "ckpt")
    recorder = SqlRecorder(url)
    with pytest.raises(NotFoundError):
        recorder.store.check_resumable(run_id + 5)
    live = recorder.start_run(_info())  # recorded by this (live) process
    with pytest.raises(ConflictError, match="still running"):
        recorder.store.check_resumable(live)
    recorder.finish_run(live, "finished")
    with pytest.raises(ConflictError, match="finished"):
        recorder.store.check_resumable(live)
    # the run config names where its checkpoints are; this run's has none there
    with pytest.raises(ResumeError, match="has no checkpoint"):
        stored_run_to_resume(url, run_id)
    with recorder.store.engine.begin() as conn:
        conn.exec_driver_sql(
            "UPDATE runs SET config = ? WHERE id = ?",
            (json.dumps({"strategy": "artemis", "checkpoint-dir": store_dir}), run_id),
        )
    config, path = stored_run_to_resume(url, run_id)
    assert config["checkpoint-dir"] == store_dir and path.is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--resume", "42"], "--resume 42: run 42 not found"),
        (["--resume", "1"], "run 1 has no checkpoint"),
        (["--resume", "1", "--rounds", "3"], "drop --rounds"),
        (["--resume", "0"], "run ids start at 1"),
    ],
)
def test_simulate_resume_refuses_bad_input_in_one_line(
    tmp_path: Path, args: list[str], message: str
) -> None:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    recorder = SqlRecorder(url)
    recorder.finish_run(recorder.start_run(_info()), "interrupted")
    from typer.testing import CliRunner

    from server.cli import app

    env = {"COLUMNS": "300", "FEDSQUEEZE_HOME": str(tmp_path / "home")}
    done = CliRunner().invoke(app, ["simulate", *args, "--database-url", url], env=env)
    assert done.exit_code == 2, done.output
    lines = [line for line in done.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], done.output
    assert "SuperLink" not in done.output


# ----------------------------------------------------------------------------- slow
def _store(db: Path) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    with sqlite3.connect(db) as conn:
        runs = conn.execute("SELECT id, status, rounds_done FROM runs ORDER BY id").fetchall()
        rounds = conn.execute(
            "SELECT run_id, round, eval_loss, extra FROM rounds ORDER BY id"
        ).fetchall()
    return runs, rounds


CONFIG = {
    "strategy": "artemis",
    "pp-variant": "pp1",
    # deterministic compressors: runs differ only where resuming changes the computation
    "uplink": "scaled_sign:bucket=64",
    "downlink": "scaled_sign:bucket=64",
    "client-lr": 0.1,
    "seed": 2,
    "task": "synthetic-lsq",
    "task-options": "dim=12,samples_per_client=30",
    "num-partitions": 3,
    "device": "cpu",
}
ROUNDS, CRASH = 4, 2
#: eval losses of the in-process reference and Flower differ only in the order in which
#: floats are summed (replies arrive in any order)
EXACT = 1e-3
#: a resumed run restarts the clients' memories (h_i = 0, as a resync does), which moves its
#: loss by 1.5% against the uninterrupted run here (2.100 vs 2.069 after round 4)
NOISE = 0.10


def reference_losses(resume_after: int = 0) -> dict[int, float]:
    """Eval loss after each round of the same config driven in-process by the same server
    and client code (`client_round`, `client.training.local_update`). With `resume_after`
    = r the server half is checkpointed after round r, restored into a fresh one, and the
    clients start again with empty state under new node ids, as in a resumed Flower run."""
    from client.training import flatten, local_update
    from core.runconfig import load_config
    from server.app import make_evaluate
    from strategies import checkpoint
    from strategies.client_half import client_round, initial_client_state
    from strategies.encoding import derive_seed
    from strategies.registry import ALGORITHMS, client_apply
    from tasks.base import load_task

    config = load_config(CONFIG, algorithms=ALGORITHMS)
    task = load_task("synthetic-lsq", **config.task_options(3))
    evaluate = make_evaluate(task)
    model = task.make_model()
    w0 = flatten(model).clone()
    settings = settings_from_config(config.values, w0.numel())
    data = [task.load_partition(i) for i in range(3)]
    server = make_server(settings, w0)
    nodes = [101, 102, 103]  # node id -> partition: index in this list
    state: dict[int, Any] = {}
    losses: dict[int, float] = {}
    for k in range(1, ROUNDS + 1):
        if k == resume_after + 1 and resume_after:
            fresh = make_server(settings, w0)
            checkpoint.restore(fresh, checkpoint.capture(server))
            server, nodes, state = fresh, [201, 202, 203], {}
        server.begin_round(k)
        for pid, node in enumerate(nodes):
            committed, pending = state.get(node, (initial_client_state(w0, settings), None))

            def compute(w: torch.Tensor, pid: int = pid, k: int = k) -> Any:
                seed = derive_seed(settings.seed, k, pid, 3)
                return local_update(task, model, data[pid], w, float(config["client-lr"]), 1,
                                    32, torch.device("cpu"), seed)  # fmt: skip

            down = server.downlink_for(k, node)
            step = client_round(settings, committed, pending, down, w0, client_apply(settings),
                                compute)  # fmt: skip
            state[node] = (step.committed, step.pending)
            assert server.receive(k, node, step.uplink) == "ok"
        server.finish_round(k, 3.0)
        losses[k] = evaluate(k, server.evaluation_model())["loss"]
    return losses


@pytest.mark.slow
def test_a_crashed_serverapp_is_resumed_to_the_end(tmp_path: Path) -> None:
    """The ServerApp process exits hard after round 2 of 4 (test-server-exit): the run
    cannot go on by itself; `simulate --resume` continues it on the same store run, which
    ends with rounds 1..4 once each and the loss an uninterrupted run reaches."""
    db = tmp_path / "runs.db"
    url = f"sqlite:///{db}"
    env = {**os.environ, "FEDSQUEEZE_HOME": str(tmp_path / "home"), "COLUMNS": "200"}
    env.pop("DATABASE_URL", None)
    raw = " ".join(f"{k}={json.dumps(v)}" for k, v in CONFIG.items())

    def simulate(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [FEDSQUEEZE, "simulate", "--database-url", url, "--no-progress",
             "--timeout", "600", *args],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip

    crashed = simulate("--rounds", str(ROUNDS), "-c", raw, "-c", f"test-server-exit={CRASH}")
    assert crashed.returncode == 1, crashed.stdout + crashed.stderr
    assert "failed" in crashed.stdout
    runs, rounds = _store(db)
    assert [r[:1] for r in runs] == [(1,)] and runs[0][1] in ("running", "interrupted")
    assert [r[1] for r in rounds] == [1, 2]
    # beside the SQLite store's file
    checkpoints = list((tmp_path / "checkpoints").glob("*/run-1/server.ckpt"))
    assert len(checkpoints) == 1
    folder = checkpoints[0].parent
    assert oct(folder.stat().st_mode & 0o777) == "0o700"
    assert oct(checkpoints[0].stat().st_mode & 0o777) == "0o600"

    resumed = simulate("--resume", "1")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    runs, rounds = _store(db)
    assert runs == [(1, "finished", ROUNDS)]
    assert [(r[0], r[1]) for r in rounds] == [(1, k) for k in range(1, ROUNDS + 1)]
    losses = {k: loss for _, k, loss, _ in rounds}
    uninterrupted, resumed_here = reference_losses(), reference_losses(resume_after=CRASH)
    for k in range(1, CRASH + 1):
        assert losses[k] == pytest.approx(uninterrupted[k], rel=EXACT)
    # the server went on exactly from its round-2 state ...
    for k in range(CRASH + 1, ROUNDS + 1):
        assert losses[k] == pytest.approx(resumed_here[k], rel=EXACT)
    # ... to the loss of the uninterrupted run, within noise; a restart from w0 would
    # have ended where round ROUNDS - CRASH was
    assert losses[ROUNDS] == pytest.approx(uninterrupted[ROUNDS], rel=NOISE)
    assert losses[ROUNDS] < uninterrupted[ROUNDS - CRASH] * (1 - NOISE)
    # the new Flower run's clients came with empty state and were brought level with the
    # server (broadcast log replay, or a reset and snapshot) in the first resumed round
    extra = json.loads(next(r[3] for r in rounds if r[1] == CRASH + 1))
    assert extra["accepted"] == 3
    assert extra["catchup_messages"] + extra["resets_sent"] + extra["snapshots"] >= 3
