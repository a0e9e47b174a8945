"""The server's check of a run before anything starts (`check_run`).

The keys, defaults and per-key validation of the run configuration are neutral
(`core.runconfig`, shared with the ClientApp); this module adds what needs the task and the
algorithms, which only the server side (the ServerApp, `fedsqueeze simulate` / `run`) builds
before a run.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from core.runconfig import RunConfig, load_config


def check_run(values: Mapping[str, Any], num_partitions: int | None = None) -> RunConfig:
    """Everything the ServerApp would refuse, refused before anything starts.

    This builds what the ServerApp builds, with the same code, so that no second copy of
    the rules can drift: `load_config` (keys, types, ranges, strategy name), the task
    (`tasks.base.load_task` with the run's options: unknown task or option, missing data
    files), and, for the algorithms of `strategies.registry`, the algorithm settings for
    the task's model size d (`settings_from_config`: compressor specs such as
    ``qsgd:s=0``, memory rates, flags). A ``data-dir`` that is not a directory is refused
    for every task. `num_partitions` is the federation size when the caller knows it
    (simulation); else the run config's (``-1``: ``min-nodes``, else 1).

    Raises ValueError with one line naming the key and the value.
    """
    from strategies.registry import ALGORITHMS, FLWR_FEDAVG, settings_from_config
    from tasks.base import load_task

    config = load_config(values, algorithms=ALGORITHMS)
    data_dir = str(config["data-dir"])
    if data_dir and not Path(data_dir).expanduser().is_dir():
        raise ValueError(f"run config: data-dir {data_dir!r} is not a directory")
    n = num_partitions or int(config["num-partitions"])
    if n < 1:
        n = max(int(config["min-nodes"]), 1)
    try:
        task = load_task(config["task"], **config.task_options(n))
    except (OSError, TypeError, ValueError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"run config: task {config['task']!r}: {message}") from None
    if config.strategy != FLWR_FEDAVG:
        dim = sum(p.numel() for p in task.make_model().parameters())
        try:
            settings_from_config(config.values, dim)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"run config: {exc}") from None
    return config
