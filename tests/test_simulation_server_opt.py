"""A server optimiser through a real Flower simulation (run_simulation, the project's
ServerApp logic and ClientApp): AMSGrad on artemis, whose clients replay the compressed
broadcast of the optimiser's step; under partial participation idle clients catch up from
the broadcast log or a snapshot, and every reply's exact state digest (h_i, model) matches
the server's, every round. signum-mv runs in the same simulation, its client momentum kept
in Flower's context.state."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from conftest import simulate_in_process
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from test_simulation import _base as simulation_base

from server.app import RunOutcome, run_server

pytestmark = pytest.mark.slow

N_CLIENTS = 5
ROUNDS = 6


def _base() -> dict[str, Any]:
    """test_simulation's workload, for more rounds and with a longer round timeout (an upper
    bound only: a loaded machine starts Ray slowly)."""
    return {**simulation_base(), "num-server-rounds": ROUNDS, "round-timeout": 600.0}


@pytest.fixture(scope="module")
def simulated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, RunOutcome]:

    from client.app import app as client_app

    tmp: Path = tmp_path_factory.mktemp("sim-opt")
    outcomes: dict[str, RunOutcome] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        runs = {
            "artemis-amsgrad": {"strategy": "artemis", "server-opt": "amsgrad",
                                "server-lr": 0.05},
            "signum-mv": {"strategy": "signum-mv", "server-lr": 0.005},
        }  # fmt: skip
        for label, overrides in runs.items():
            outcomes[label] = run_server(grid, context, {**_base(), **overrides}, RunOutcome())

    simulate_in_process(server_app, client_app, N_CLIENTS, tmp)
    return outcomes


@pytest.mark.parametrize("label", ["artemis-amsgrad", "signum-mv"])
def test_digests_match_every_round_and_the_loss_falls(
    simulated: dict[str, RunOutcome], label: str
) -> None:
    out = simulated[label]
    assert out.status == "finished"
    records = out.records
    assert [r.round for r in records] == list(range(1, ROUNDS + 1))
    for r in records:
        assert r.replied == r.sampled >= 1 and r.failed == 0, [c.error for c in r.clients]
        assert r.extra["digest_checks"] == r.replied, r.extra
        assert r.extra["digest_mismatches"] == 0 and r.extra["resyncs"] == 0, r.extra
        assert r.eval_loss is not None and math.isfinite(r.eval_loss)
    assert records[-1].eval_loss < records[0].eval_loss  # type: ignore[operator]
    # idle clients were caught up at least once (participation 0.6)
    assert sum(r.extra["catchup_messages"] + r.extra["snapshots"] for r in records) > 0


def test_amsgrad_state_moved_on_the_server(simulated: dict[str, RunOutcome]) -> None:
    server = simulated["artemis-amsgrad"].server
    state = server.opt_state
    assert state.mu is not None and state.nu_max is not None
    assert float(state.mu.abs().sum()) > 0
    assert bool((state.nu_max >= state.nu).all())


def test_signum_mv_sends_one_bit_per_coordinate(simulated: dict[str, RunOutcome]) -> None:
    for r in simulated["signum-mv"].records:
        per_reply = r.uplink_bytes / r.replied
        assert 24 / 8 <= per_reply <= 24 / 8 + 64, per_reply  # d = 24: 3 bytes + header
