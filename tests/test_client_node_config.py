"""A SuperNode's node config (what `fedsqueeze client start --device --data` sets) overrides
the run config's device and data directory, since those describe the device, not the run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict

from client import app as client_app


def _context(node_config: dict[str, bool | float | int | str]) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def test_node_device_overrides_run_config_device() -> None:
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA, where the run config's 'cuda' would fail")
    run = ConfigRecord({"task": "synthetic-lsq", "device": "cuda", "num-partitions": 4})
    with pytest.raises(ValueError, match="CUDA is not available"):
        client_app._setup(run, _context({"partition-id": 1}))
    setup = client_app._setup(run, _context({"partition-id": 1, "device": "cpu"}))
    assert setup.device == torch.device("cpu")
    assert setup.partition_id == 1


def test_node_data_dir_overrides_run_config_data_dir(tmp_path: Path) -> None:
    node_dir = tmp_path / "on-the-device"
    node_dir.mkdir()
    run = ConfigRecord(
        {"task": "fashion-mnist", "data-dir": "/nonexistent/run-config-dir", "num-partitions": 2}
    )
    # The device's directory is the one read (and reported missing), not the run config's.
    with pytest.raises(Exception, match="on-the-device") as info:
        client_app._setup(run, _context({"partition-id": 0, "data-dir": str(node_dir)}))
    assert "run-config-dir" not in str(info.value)
