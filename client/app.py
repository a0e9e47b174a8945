"""The ClientApp: every algorithm's client half, and plain FedAvg for the baseline.

A train message either carries ``"fedsqueeze.down"`` (our protocol: apply the downlink, train,
encode the uplink, keep the algorithm state in ``context.state``) or Flower's usual
``"arrays"`` + ``"config"`` (strategy flwr-fedavg: train and return the float32 arrays).

The client's partition comes from the node config (``partition-id``, ``num-partitions``), as
Flower sets it in simulation and as SuperNodes are started in deployment
(``--node-config "partition-id=0 num-partitions=20"``). State (committed and pending, with
their round stamps) lives in ``context.state`` so that it survives between rounds in both.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from torch import nn
from torch.utils.data import Dataset

from client.timing import HandlerTiming
from client.training import flatten, local_update, resolve_device
from core.runconfig import RunConfig, load_config, parse_delay, parse_failure
from strategies.client_half import ClientState, client_round
from strategies.encoding import derive_seed
from strategies.flower import (
    CONFIG_KEY,
    DOWN_KEY,
    UP_KEY,
    downlink_from_record,
    uplink_to_record,
)
from strategies.partitions import PARTITION_ACTION, partition_reply
from strategies.registry import ALGORITHMS, FLWR_FEDAVG, client_apply, settings_from_config
from strategies.settings import AlgorithmSettings
from tasks.base import Task, load_task

log = logging.getLogger("flwr.fedsqueeze.client")

app = ClientApp()

STATE_PREFIX = "fedsqueeze.state."
_TENSORS = ("model", "down_memory", "up_memory", "up_residual", "momentum")


class InjectedFailure(RuntimeError):
    """Raised by the test-only `test-fail` run-config key."""


@dataclass
class _Setup:
    config: RunConfig
    task: Task
    model: nn.Module
    data: Dataset[Any]
    w0: torch.Tensor
    device: torch.device
    partition_id: int


_CACHE: dict[tuple[Any, ...], _Setup] = {}


def _partition(context: Context, config: RunConfig) -> tuple[int, int]:
    node_config = context.node_config
    if "partition-id" not in node_config:
        raise ValueError(
            "node config lacks 'partition-id': start the SuperNode with "
            "--node-config 'partition-id=I num-partitions=N'"
        )
    pid = int(node_config["partition-id"])
    n = int(config["num-partitions"])
    if n == -1:
        n = int(node_config.get("num-partitions", 0))
        if n < 1:
            raise ValueError("num-partitions is neither in the run config nor the node config")
    if not 0 <= pid < n:
        raise ValueError(f"partition-id {pid} out of range for {n} partitions")
    return pid, n


#: run-config keys a SuperNode's own node config overrides: they describe the device
#: (`fedsqueeze client start --device ... --data ...`), not the run
NODE_OVERRIDES = ("device", "data-dir")


def _setup(msg_config: ConfigRecord, context: Context) -> _Setup:
    node = {k: context.node_config[k] for k in NODE_OVERRIDES if k in context.node_config}
    run_config = {k: v for k, v in msg_config.items() if k != "server-round"}
    config = load_config(run_config, node, algorithms=ALGORITHMS)
    pid, n = _partition(context, config)
    key = (tuple(sorted(config.values.items())), pid, n)
    cached = _CACHE.get(key)
    if cached is not None:
        return cached
    task = load_task(config["task"], **config.task_options(n))
    model = task.make_model()
    w0 = flatten(model).cpu().clone()
    device = resolve_device(config["device"])
    setup = _Setup(config, task, model, task.load_partition(pid), w0, device, pid)
    _CACHE.clear()  # one run at a time per process
    _CACHE[key] = setup
    return setup


def _maybe_fail(config: RunConfig, pid: int, k: int) -> None:
    failure = parse_failure(config["test-fail"])
    if failure is not None and failure == (pid, k):
        raise InjectedFailure(f"test-fail: partition {pid} fails in round {k} (as configured)")


def _maybe_delay(config: RunConfig, pid: int, k: int) -> None:
    """TEST ONLY (`test-delay`): sleep before replying, so that the reply arrives late."""
    delay = parse_delay(config["test-delay"])
    if delay is not None and delay[:2] == (pid, k):
        log.info("test-delay: partition %d replies to round %d %.1f s late", pid, k, delay[2])
        time.sleep(delay[2])


# ----------------------------------------------------------------------------- state I/O
def _save_state(context: Context, key: str, state: ClientState | None) -> None:
    for suffix in (".arrays", ".meta"):
        if key + suffix in context.state:
            del context.state[key + suffix]
    if state is None:
        return
    arrays = {
        name: Array(getattr(state, name).detach().cpu().numpy())
        for name in _TENSORS
        if getattr(state, name) is not None
    }
    context.state[key + ".arrays"] = ArrayRecord(arrays)
    context.state[key + ".meta"] = ConfigRecord({"stamp": state.stamp, "version": state.version})


def _load_state(context: Context, key: str, device: torch.device) -> ClientState | None:
    if key + ".meta" not in context.state:
        return None
    meta = context.state.config_records[key + ".meta"]
    arrays = context.state.array_records[key + ".arrays"]
    tensors = {
        name: torch.from_numpy(np.array(arrays[name].numpy())).to(device)
        for name in _TENSORS
        if name in arrays
    }
    return ClientState(
        stamp=int(meta["stamp"]),  # type: ignore[arg-type]
        version=int(meta["version"]),  # type: ignore[arg-type]
        **tensors,
    )


def _initial_state(settings: AlgorithmSettings, w0: torch.Tensor) -> ClientState:
    from strategies.client_half import initial_client_state

    return initial_client_state(w0, settings)


# ----------------------------------------------------------------------------- query
@app.query(PARTITION_ACTION)
def query_partition(msg: Message, context: Context) -> Message:
    """Name the partition this node serves (the server samples by it, not by node id; see
    `strategies.partitions`). Loads no data."""
    return Message(partition_reply(context.node_config), reply_to=msg)


# ----------------------------------------------------------------------------- train
@app.train()
def train(msg: Message, context: Context) -> Message:
    started = time.perf_counter()
    timing = HandlerTiming()
    content = msg.content
    if DOWN_KEY in content.config_records:
        reply = _train_fedsqueeze(msg, context, started, timing)
    else:
        reply = _train_fedavg(msg, context, timing)
    timing.log(log, int(context.run_id), _message_round(msg))
    return reply


def _message_round(msg: Message) -> int:
    """The server round of a train message: its group id (fedsqueeze sets it), else the
    ``server-round`` of Flower's FedAvg config, else 0."""
    group = msg.metadata.group_id
    if group.isdigit():
        return int(group)
    config = msg.content.config_records.get("config")
    value = config.get("server-round", 0) if config is not None else 0
    return int(value) if isinstance(value, int) else 0


def _train_fedsqueeze(
    msg: Message, context: Context, started: float, timing: HandlerTiming
) -> Message:
    content = msg.content
    with timing.setup():
        setup = _setup(content.config_records[CONFIG_KEY], context)
    config, device = setup.config, setup.device
    down = downlink_from_record(content.config_records[DOWN_KEY])
    settings = settings_from_config(config.values, setup.w0.numel())
    w0 = setup.w0.to(device)
    session = str(content.config_records[DOWN_KEY].get("session", ""))
    prefix = f"{STATE_PREFIX}{session}."
    for key in [k for k in context.state if k.startswith(STATE_PREFIX)]:
        if not key.startswith(prefix):  # state of an earlier run on this node
            del context.state[key]
    committed = _load_state(context, prefix + "committed", device) or _initial_state(settings, w0)
    pending = _load_state(context, prefix + "pending", device)

    def compute(w: torch.Tensor) -> tuple[torch.Tensor, float, int]:
        seed = derive_seed(settings.seed, down.round, setup.partition_id, 3)
        with timing.training():
            return local_update(
                setup.task,
                setup.model,
                setup.data,
                w,
                float(config["client-lr"]),
                int(config["local-steps"]),
                int(config["batch-size"]),
                device,
                seed,
            )

    step = client_round(
        settings, committed, pending, down, w0, client_apply(settings), compute, device
    )
    _save_state(context, prefix + "committed", step.committed)
    _save_state(context, prefix + "pending", step.pending)
    _maybe_fail(config, setup.partition_id, down.round)
    _maybe_delay(config, setup.partition_id, down.round)
    record = uplink_to_record(step.uplink, time.perf_counter() - started)
    return Message(RecordDict({UP_KEY: record}), reply_to=msg)


def _train_fedavg(msg: Message, context: Context, timing: HandlerTiming) -> Message:
    """Flower's FedAvg baseline: load the arrays, K local steps, send the arrays back."""
    content = msg.content
    arrays = content.array_records["arrays"]
    with timing.setup():
        setup = _setup(content.config_records["config"], context)
    config = setup.config
    if config.strategy != FLWR_FEDAVG:
        raise ValueError(f"plain FedAvg message but strategy is {config.strategy!r}")
    setup.model.load_state_dict(arrays.to_torch_state_dict())
    w = flatten(setup.model).to(setup.device)
    k = int(content.config_records["config"].get("server-round", 0))  # type: ignore[arg-type]
    lr = float(config["client-lr"])
    with timing.training():
        _g, loss, n = local_update(
            setup.task,
            setup.model,
            setup.data,
            w,
            lr,
            int(config["local-steps"]),
            int(config["batch-size"]),
            setup.device,
            derive_seed(int(config["seed"]), k, setup.partition_id, 3),
        )
    _maybe_fail(config, setup.partition_id, k)
    reply = RecordDict(
        {
            "arrays": ArrayRecord(setup.model.cpu().state_dict()),
            "metrics": MetricRecord({"num-examples": n, "train-loss": loss}),
        }
    )
    return Message(reply, reply_to=msg)
