"""The ServerApp: builds the strategy from the run config, evaluates the central model and
records every round.

`flwr run .` uses `app` (run config from pyproject.toml + ``--run-config``). In-process
simulations and tests use `make_server_app(overrides)`, whose overrides are applied on top of
the run config (Flower's `run_simulation` carries none).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from core.records import (
    ClientRoundRecord,
    Recorder,
    ResumableRecorder,
    RoundRecord,
    RunInfo,
    utcnow,
)
from core.runconfig import STORE_URL_ENV, RunConfig, load_config
from server.checkpoints import (
    Checkpointer,
    ResumeError,
    checkpoint_path,
    checkpoint_root,
    find_checkpoint,
    remove_stale,
    reopen_run,
    resume_server,
)
from server.recording import JsonlRecorder
from strategies.flower import FedSqueezeStrategy, wait_for_nodes
from strategies.registry import ALGORITHMS, FLWR_FEDAVG, make_server, settings_from_config
from tasks.base import Task, load_task

log = logging.getLogger("flwr.fedsqueeze.server")

ProgressFn = Callable[[RoundRecord], None]


@dataclass
class RunOutcome:
    """What a finished run leaves for in-process callers (tests, the simulate command)."""

    run_id: int | None = None
    records: list[RoundRecord] = field(default_factory=list)
    final_model: torch.Tensor | None = None
    status: str = "running"
    server: Any = None  # the ServerHalf (None for flwr-fedavg)


def open_recorder(database_url: str | None = None) -> Recorder:
    """The round-history store: `database_url`, else ``$DATABASE_URL`` of the environment
    (the URL never travels in the run config: it may hold a password).

    '' → the default SQL store; 'jsonl:PATH' → a JSON-lines file; else a database URL.
    """
    if database_url is None:
        database_url = os.environ.get(STORE_URL_ENV, "")
    if database_url.startswith("jsonl:"):
        return JsonlRecorder(database_url[len("jsonl:") :])
    from api.store import SqlRecorder

    return SqlRecorder(database_url or None)


def build_task(config: RunConfig, num_partitions: int) -> Task:
    return load_task(config["task"], **config.task_options(num_partitions))


def _flat(model: torch.nn.Module) -> torch.Tensor:
    from client.training import flatten

    return flatten(model).cpu()


def make_evaluate(task: Task) -> Callable[[int, torch.Tensor], dict[str, float]]:
    from client.training import load_flat

    model = task.make_model()
    test = task.load_test()
    device = torch.device("cpu")

    def evaluate(_round: int, w: torch.Tensor) -> dict[str, float]:
        load_flat(model, w)
        return {k: float(v) for k, v in task.evaluate(model, test, device).items()}

    return evaluate


def run_server(
    grid: Grid,
    context: Context,
    overrides: Mapping[str, Any] | None = None,
    outcome: RunOutcome | None = None,
    progress: ProgressFn | None = None,
    recorder: Recorder | None = None,
) -> RunOutcome:
    """The body of the ServerApp (usable with any Grid)."""
    outcome = outcome if outcome is not None else RunOutcome()
    config = load_config(dict(context.run_config), overrides, algorithms=ALGORITHMS)
    n_cfg = int(config["num-partitions"])
    min_nodes = int(config["min-nodes"]) if int(config["min-nodes"]) > 0 else max(n_cfg, 1)
    nodes = wait_for_nodes(grid, min_nodes, float(config["round-timeout"]))
    num_partitions = n_cfg if n_cfg > 0 else len(nodes)
    task = build_task(config, num_partitions)
    w0 = _flat(task.make_model())
    evaluate = make_evaluate(task)
    recorder = recorder if recorder is not None else open_recorder()
    strategy_name = config.strategy
    flower_run_id = int(context.run_id) if context.run_id else None
    settings = (
        None if strategy_name == FLWR_FEDAVG else settings_from_config(config.values, w0.numel())
    )
    info = RunInfo(
        strategy=strategy_name,
        uplink_compressor=settings.uplink if settings else "float32",
        downlink_compressor=settings.downlink if settings else "float32",
        task=str(config["task"]),
        config=config.as_flat(),
        flower_run_id=flower_run_id,
        num_parameters=int(w0.numel()),
    )
    resume_id = int(config["resume-run"])
    if resume_id and settings is None:
        raise ResumeError(f"{FLWR_FEDAVG} runs keep no checkpoint and cannot be resumed")
    stored_rounds = 0
    if resume_id:
        stored_rounds = reopen_run(recorder, resume_id, flower_run_id)
        run_id = resume_id
    else:
        run_id = recorder.start_run(info)
    outcome.run_id = run_id
    log.info("run %s: %s on %s, d = %d, %d nodes", run_id, strategy_name, task.name,
             w0.numel(), len(nodes))  # fmt: skip
    status = "failed"
    try:
        if settings is None:
            _run_fedavg(grid, config, task, evaluate, recorder, run_id, outcome, progress,
                        min_nodes)  # fmt: skip
        else:
            store_dir = str(config["store-dir"]) or None
            server = make_server(settings, w0, store_dir=store_dir, expected_clients=len(nodes))
            outcome.server = server
            strategy = FedSqueezeStrategy(
                server,
                config.as_flat(),
                evaluate_fn=evaluate,
                eval_every=int(config["eval-every"]),
                recorder=recorder,
                run_id=run_id,
                min_nodes=min_nodes,
                progress=_exit_after(int(config["test-server-exit"]), progress),
            )
            outcome.records = strategy.records
            try:
                _checkpointing(strategy, config, recorder, run_id, resume_id, stored_rounds)
                strategy.start(
                    grid,
                    ArrayRecord(),
                    num_rounds=int(config["num-server-rounds"]),
                    timeout=float(config["round-timeout"]),
                )
                outcome.final_model = server.evaluation_model().clone()
            finally:
                server.close()  # flushes and removes spilled per-client memories
        status = "finished"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        outcome.status = status
        recorder.finish_run(run_id, status)
    return outcome


def _checkpointing(
    strategy: FedSqueezeStrategy,
    config: RunConfig,
    recorder: Recorder,
    run_id: int,
    resume_id: int,
    stored_rounds: int,
) -> None:
    """Restore the strategy from run `resume_id`'s checkpoint (if resuming) and make it
    write a checkpoint after every round (unless checkpoint-dir is 'off')."""
    store_key = recorder.store_key if isinstance(recorder, ResumableRecorder) else None
    root = checkpoint_root(str(config["checkpoint-dir"]), store_key or "")
    if resume_id:
        if store_key is None:
            raise ResumeError(f"the store {type(recorder).__name__} cannot resume runs")
        path = find_checkpoint(str(config["checkpoint-dir"]), store_key, resume_id)
        resumed = resume_server(strategy.server, path, recorder, run_id, stored_rounds)
        strategy.rng = resumed.sampler
        strategy.first_round = resumed.last_round + 1
    if root is None or store_key is None:
        return  # no checkpoints: off, or a store that cannot resume runs
    path = checkpoint_path(root, store_key, run_id)
    if not resume_id:
        remove_stale(path)
    strategy.checkpoint = Checkpointer(path, strategy.server, strategy.rng).save


def _exit_after(round_: int, progress: ProgressFn | None) -> ProgressFn | None:
    """TEST ONLY (run-config test-server-exit): end the process hard, as a crash would,
    right after round `round_` is checkpointed and stored."""
    if not round_:
        return progress

    def hook(record: RoundRecord) -> None:
        if progress is not None:
            progress(record)
        if record.round == round_:
            log.warning("test-server-exit: the ServerApp process exits after round %d", round_)
            logging.shutdown()
            os._exit(17)

    return hook


# ----------------------------------------------------------------------------- FedAvg
def _array_bytes(arrays: ArrayRecord) -> int:
    return sum(len(a.data) for a in arrays.values())


class RecordedFedAvg(FedAvg):
    """Flower's FedAvg, unchanged, with the bytes of each message measured and recorded."""

    def __init__(self, client_config: dict[str, Any], min_nodes: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.client_config = client_config
        self.down: dict[int, int] = {}
        self.clients: list[ClientRoundRecord] = []
        self.up_bytes = 0
        self.sampled = 0
        self.min_nodes = min_nodes
        self.configure_s = 0.0  # this round's configure_train, seconds
        self.aggregate_s = 0.0  # this round's aggregate_train, seconds

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        t0 = time.perf_counter()
        for key, value in self.client_config.items():
            config[key] = value
        messages = list(super().configure_train(server_round, arrays, config, grid))
        size = _array_bytes(arrays)
        self.down = {int(m.metadata.dst_node_id): size for m in messages}
        self.sampled = len(messages)
        self.clients, self.up_bytes = [], 0
        self.configure_s = time.perf_counter() - t0
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        t0 = time.perf_counter()
        replies = list(replies)
        for r in replies:
            node = int(r.metadata.src_node_id)
            rec = ClientRoundRecord(
                node_id=node, outcome="ok", downlink_bytes=self.down.get(node, 0)
            )
            if r.has_error():
                rec.outcome, rec.error = "failed", str(r.error.reason)
            else:
                rec.uplink_bytes = _array_bytes(r.content.array_records["arrays"])
                metrics = r.content.metric_records.get("metrics", MetricRecord())
                rec.num_examples = int(metrics.get("num-examples", 0))  # type: ignore[arg-type]
                loss = metrics.get("train-loss")
                rec.local_loss = float(loss) if loss is not None else None  # type: ignore[arg-type]
                self.up_bytes += rec.uplink_bytes
            self.clients.append(rec)
        aggregated = super().aggregate_train(server_round, replies)
        self.aggregate_s = time.perf_counter() - t0
        return aggregated


def _fedavg_phases(strategy: RecordedFedAvg, round_s: float, evaluate_s: float) -> dict[str, float]:
    """The phases of a FedAvg round as FedSqueezeStrategy times them: configure, train
    (push to replies pulled: Flower's `send_and_receive`, its 3 s polls included),
    aggregate, evaluate; "round" is the first three together."""
    train_s = max(0.0, round_s - strategy.configure_s - strategy.aggregate_s)
    return {
        "round": round_s,
        "configure": strategy.configure_s,
        "train": train_s,
        "aggregate": strategy.aggregate_s,
        "evaluate": evaluate_s,
    }


def _run_fedavg(
    grid: Grid,
    config: RunConfig,
    task: Task,
    evaluate: Callable[[int, torch.Tensor], dict[str, float]],
    recorder: Recorder,
    run_id: int,
    outcome: RunOutcome,
    progress: ProgressFn | None,
    min_nodes: int,
) -> None:

    model = task.make_model()
    p = float(config["participation"])
    strategy = RecordedFedAvg(
        config.as_flat(),
        min_nodes,
        fraction_train=p,
        fraction_evaluate=0.0,
        min_train_nodes=1,
        min_evaluate_nodes=0,
        min_available_nodes=min_nodes,
    )
    timing = {"t": time.perf_counter(), "started": utcnow()}

    def central(k: int, arrays: ArrayRecord) -> MetricRecord | None:
        model.load_state_dict(arrays.to_torch_state_dict())
        w = _flat(model)
        t_eval = time.perf_counter()
        ev = evaluate(k, w) if int(config["eval-every"]) else {}
        now = time.perf_counter()
        if k > 0:
            ok = [c for c in strategy.clients if c.outcome == "ok"]
            losses = [(c.local_loss or 0.0, c.num_examples) for c in ok]
            n = sum(c for _, c in losses)
            record = RoundRecord(
                round=k,
                sampled=strategy.sampled,
                replied=len(ok),
                failed=strategy.sampled - len(ok),
                uplink_bytes=strategy.up_bytes,
                downlink_bytes=sum(strategy.down.values()),
                predicted_uplink_bytes=4 * int(w.numel()) * len(ok),
                predicted_downlink_bytes=4 * int(w.numel()) * strategy.sampled,
                train_loss=(sum(a * c for a, c in losses) / n) if n else None,
                eval_loss=ev.get("loss"),
                eval_accuracy=ev.get("accuracy"),
                phase_seconds=_fedavg_phases(strategy, t_eval - timing["t"], now - t_eval),  # type: ignore[operator]
                started_at=timing["started"],  # type: ignore[arg-type]
                clients=list(strategy.clients),
            )
            outcome.records.append(record)
            recorder.record_round(run_id, record)
            if progress is not None:
                progress(record)
        outcome.final_model = w
        timing["t"], timing["started"] = time.perf_counter(), utcnow()
        return MetricRecord(dict(ev)) if ev else None

    strategy.start(
        grid,
        ArrayRecord(model.state_dict()),
        num_rounds=int(config["num-server-rounds"]),
        timeout=float(config["round-timeout"]),
        evaluate_fn=central,
    )


# ----------------------------------------------------------------------------- apps
def make_server_app(
    overrides: Mapping[str, Any] | None = None,
    outcome: RunOutcome | None = None,
    progress: ProgressFn | None = None,
    recorder: Recorder | None = None,
) -> ServerApp:
    """A ServerApp whose run config is the project's, with `overrides` on top."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, context, overrides, outcome, progress, recorder)

    return server_app


app = make_server_app()
