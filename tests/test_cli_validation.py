"""Bad input on the command line is refused before anything starts (issue 9).

Each case runs the real `fedsqueeze` command and must exit 2 with one error line naming
what was wrong, without a traceback, and without having started anything: `simulate` is
given its own ``--flwr-home``, which a started SuperLink would create (its config.toml,
state database and logs); `run` is pointed at a server data directory that does not exist,
so that refusing the input must come before looking for the server.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

FEDSQUEEZE = str(Path(sys.executable).with_name("fedsqueeze"))
ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FEDSQUEEZE_HOME": str(tmp_path / "home"), "COLUMNS": "300"}
    env.pop("DATABASE_URL", None)
    return subprocess.run(
        [FEDSQUEEZE, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def _refused(done: subprocess.CompletedProcess[str], says: str) -> str:
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ") and says in lines[0], lines[0]
    assert "Traceback" not in done.stdout + done.stderr
    return lines[0]


SIMULATE_CASES = [
    (("--uplink", "qsgd:s=0"), "qsgd needs s >= 1"),
    (("--downlink", "qsgd:s=1,bucket=-1"), "bucket must be >= 0"),
    (("--uplink", "topk:k=0"), "topk needs k >= 1"),
    (("--uplink", "nosuch:k=1"), "unknown compressor 'nosuch'"),
    (("-s", "artemis", "-s", "nosuch"), "unknown strategy 'nosuch'"),
    (("--participation", "1.5"), "participation must be in (0, 1]"),
    (("--participation", "0"), "participation must be in (0, 1]"),
    (("--alpha", "-1"), "dirichlet-alpha must be > 0"),
    (("--client-lr", "0"), "client-lr must be > 0"),
    (("--local-steps", "0"), "local-steps must be >= 1"),
    (("--rounds", "0"), "--rounds"),
    (("--clients", "0"), "--clients"),
    (("--partitioning", "zipf"), "partitioning must be"),
    (("--device", "tpu"), "device must be"),
    (("--task", "nosuch"), "unknown task 'nosuch'"),
    (("--task", "fashion-mnist", "--data-dir", "EMPTY"), "Fashion-MNIST data not found"),
    (("--task", "synthetic-lsq", "--data-dir", "MISSING"), "is not a directory"),
    (("-c", "down-memory-rate=2.0"), "memory-rate"),
    (("-c", "task-options='dim=0'"), "dim must be >= 1"),
    (("-c", "pp-variant='pp3'"), "pp-variant"),
    (("-c", "no-such-key=1"), "unknown run-config key 'no-such-key'"),
    (("-c", "database-url='sqlite:///x.db'"), "'database-url' is refused"),
    (("--database-url", "mysql://u:SECRETPW@h/db"), "--database-url"),
    (("-c", "server-opt='nadam'"), "server-opt must be one of"),
    (("-c", "server-momentum=0.5"), "server-momentum: server-opt='sgd' does not use it"),
    (("-s", "signsgd-mv", "-c", "server-opt='adam'"), "server-opt='adam' with strategy"),
]


@pytest.mark.parametrize(("args", "says"), SIMULATE_CASES, ids=lambda v: str(v)[:40])
def test_simulate_refuses_bad_input_before_starting_a_superlink(
    tmp_path: Path, args: tuple[str, ...], says: str
) -> None:
    (tmp_path / "empty").mkdir()
    args = tuple(
        {"EMPTY": str(tmp_path / "empty"), "MISSING": str(tmp_path / "missing")}.get(a, a)
        for a in args
    )
    home = tmp_path / "flwr-home"
    done = _run(tmp_path, "simulate", *args, "--flwr-home", str(home), "--no-progress")
    line = _refused(done, says)
    assert "SECRETPW" not in done.stdout + done.stderr, line
    assert not home.exists(), "a SuperLink was started"
    assert "SuperLink" not in done.stdout


RUN_CASES = [
    (("--strategy", "nosuch"), "unknown strategy 'nosuch'"),
    (("--strategy", "artemis", "-c", "uplink='qsgd:s=0'"), "qsgd needs s >= 1"),
    (("--strategy", "artemis", "--rounds", "0"), "--rounds"),
    (("--strategy", "artemis", "--min-nodes", "0"), "--min-nodes"),
    (("--strategy", "artemis", "-c", "participation=2.0"), "participation must be"),
    (("--strategy", "artemis", "--task", "fashion-mnist", "-c", "data-dir='EMPTY'"),
     "Fashion-MNIST data not found"),
    (("--strategy", "artemis", "-c", "database-url='postgresql://u:SECRETPW@h/db'"),
     "'database-url' is refused"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "says"), RUN_CASES, ids=lambda v: str(v)[:40])
def test_run_refuses_bad_input_before_submitting(
    tmp_path: Path, args: tuple[str, ...], says: str
) -> None:
    (tmp_path / "empty").mkdir()
    args = tuple(a.replace("EMPTY", str(tmp_path / "empty")) for a in args)
    server = tmp_path / "no-server"
    done = _run(tmp_path, "run", *args, "--data-dir", str(server))
    _refused(done, says)
    assert "SECRETPW" not in done.stdout + done.stderr
    assert not server.exists()


def test_good_input_gets_past_validation(tmp_path: Path) -> None:
    """The same checks accept a valid run: `run` then fails only for want of a server."""
    done = _run(tmp_path, "run", "--strategy", "artemis", "-c", "uplink='qsgd:s=2'",
                "--data-dir", str(tmp_path / "no-server"))  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "no-server" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (("--superexec-poll-interval", "0"), {}),
        (("--superexec-poll-interval", "61"), {}),
        ((), {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "soon"}),
    ],
    ids=["zero", "above-60", "env-not-a-number"],
)
def test_client_start_refuses_a_bad_superexec_poll_interval(
    tmp_path: Path, args: tuple[str, ...], env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checked before the bundle is even opened (there is none here) or a node starts."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    done = _run(tmp_path, "client", "start", "--bundle", str(tmp_path / "no-bundle"), *args)
    _refused(done, "superexec-poll-interval")
    assert not (tmp_path / "home").exists()
