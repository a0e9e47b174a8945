"""Deployment on Flower's engine with real processes on 127.0.0.1: `fedsqueeze server
start` (SuperLink with TLS and SuperNode authentication + the REST service), enrolment,
SuperNodes started from bundles, runs submitted with `fedsqueeze run`, and what must be
refused (unenrolled, removed or disabled keys; a wrong CA).

Every test uses free ports, its own FEDSQUEEZE_HOME / FLWR_HOME / data directory, ends
every process it started by PID (the SuperNodes it spawned, the server through
`fedsqueeze server stop`), and checks that none is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from client.enroll import BundleInfo, write_bundle
from core.keys import NodeKeyPair
from server.deploy.certs import make_ca
from server.deploy.registrar import SuperLinkRegistrar

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parent.parent
FEDSQUEEZE = str(Path(sys.executable).parent / "fedsqueeze")
#: `client start` options for a SuperNode that must be refused: one try, no rejoin wait
GIVE_UP_AT_ONCE = ("--max-retries", "1", "--rejoin-wait", "0")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], Any], timeout: float, what: str, every: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@dataclass
class Node:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Deployment:
    """A server data directory and everything a test started against it."""

    root: Path
    env: dict[str, str]
    data_dir: Path
    superlink_port: int
    api_port: int
    database_url: str
    nodes: list[Node] = field(default_factory=list)
    seen_pids: set[int] = field(default_factory=set)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def ca_cert(self) -> Path:
        return self.data_dir / "tls" / "ca.crt"

    def token(self) -> str:
        return (self.data_dir / "admin-token").read_text().strip()

    def cli(
        self, *args: str, check: bool = True, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [FEDSQUEEZE, *args],
            env=self.env,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"fedsqueeze {' '.join(args)} exited {result.returncode}\n"
                f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
            )
        return result

    def start_server(self, *extra: str) -> subprocess.CompletedProcess[str]:
        out = self.cli(
            "server", "start", "--data-dir", str(self.data_dir),
            "--superlink-port", str(self.superlink_port), "--api-port", str(self.api_port),
            "--database-url", self.database_url, *extra,
        )  # fmt: skip
        self._remember_server_pids()
        return out

    def _remember_server_pids(self) -> None:
        for name in ("superlink", "proxy", "api"):
            pid_file = self.data_dir / "run" / f"{name}.pid"
            if pid_file.exists():
                self.seen_pids.add(int(json.loads(pid_file.read_text())["pid"]))
        self._remember_descendants()

    def _remember_descendants(self) -> None:
        for pid in list(self.seen_pids):
            with contextlib.suppress(psutil.NoSuchProcess):
                self.seen_pids.update(c.pid for c in psutil.Process(pid).children(recursive=True))

    def enroll(self, name: str, out: Path, partition_id: int, num_partitions: int) -> BundleInfo:
        self.cli(
            "client", "enroll", "--name", name, "--out", str(out), "--data-dir", str(self.data_dir),
            "--partition-id", str(partition_id), "--num-partitions", str(num_partitions),
        )  # fmt: skip
        from client.enroll import open_bundle

        return open_bundle(out, unpack_dir=self.root / "unpacked" / name).info

    def start_node(self, name: str, bundle: Path, *extra: str) -> Node:
        log = self.root / "logs" / f"node-{name}-{len(self.nodes)}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        # each SuperNode has its own FLWR_HOME, as each device has: SuperNodes sharing one
        # unpack the same app bundle into the same folder at once, and one of them may find
        # it half written (a ClientApp failed with "Cannot find pyproject.toml" that way)
        home = self.root / f"flwr-home-{name}-{len(self.nodes)}"
        with open(log, "wb") as fh:
            proc = subprocess.Popen(
                [FEDSQUEEZE, "client", "start", "--bundle", str(bundle),
                 "--clientappio-port", str(free_port()), "--device", "cpu", *extra],
                env=self.env | {"FLWR_HOME": str(home)}, cwd=self.root, stdout=fh,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        node = Node(name, proc, log)
        self.nodes.append(node)
        self.seen_pids.add(proc.pid)
        return node

    def kill_node(self, node: Node, sig: int = signal.SIGTERM) -> None:
        """End a SuperNode we started and its descendants (SuperExec, ClientApp)."""
        with contextlib.suppress(psutil.NoSuchProcess):
            family = [psutil.Process(node.proc.pid)]
            family += family[0].children(recursive=True)
            self.seen_pids.update(p.pid for p in family)
            for p in family:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.send_signal(sig)
            _, left = psutil.wait_procs(family, timeout=15)
            for p in left:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.proc.wait(timeout=15)

    def registrar(self) -> SuperLinkRegistrar:
        return SuperLinkRegistrar(f"127.0.0.1:{self.superlink_port}", self.ca_cert)

    def node_status(self, node_id: int) -> str | None:
        for n in self.registrar().list_nodes():
            if n.node_id == node_id:
                return n.status
        return None

    def get(self, path: str, **params: Any) -> Any:
        r = httpx.get(self.api_url + path, params=params, timeout=30)
        r.raise_for_status()
        return r.json()

    def shutdown(self) -> None:
        self._remember_descendants()
        for node in self.nodes:
            if node.proc.poll() is None:
                self.kill_node(node)
        if (self.data_dir / "server.json").exists():
            self._remember_server_pids()
            self.cli("server", "stop", "--data-dir", str(self.data_dir), check=False)


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    env = dict(os.environ)
    env.pop("DATABASE_URL", None)
    env.update(
        FEDSQUEEZE_HOME=str(tmp_path / "home"),
        FLWR_HOME=str(tmp_path / "flwr-home"),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        PYTHONUNBUFFERED="1",
    )
    env.pop("FEDSQUEEZE_TOKEN", None)
    dep = Deployment(
        root=tmp_path,
        env=env,
        data_dir=tmp_path / "server",
        superlink_port=free_port(),
        api_port=free_port(),
        database_url=f"sqlite:///{tmp_path / 'store.db'}",
    )
    try:
        yield dep
    finally:
        dep.shutdown()
        deadline = time.monotonic() + 30
        while [p for p in dep.seen_pids if alive(p)] and time.monotonic() < deadline:
            time.sleep(0.25)
        still = [p for p in dep.seen_pids if alive(p)]
        assert not still, f"processes left behind: {still}"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _assert_no_secrets_in(paths: list[Path], secrets: list[str]) -> None:
    for path in paths:
        text = path.read_text(errors="replace")
        for secret in secrets:
            assert secret not in text, f"a secret appears in {path}"


def _key_body(private_key: Path) -> str:
    lines = private_key.read_text().strip().splitlines()
    return "".join(lines[1:-1])[20:80]  # a slice of the base64 body


def _rejected(node: Node, timeout: float = 90) -> str:
    """Wait until a SuperNode started with --max-retries gives up; return its log."""
    try:
        code = node.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"SuperNode {node.name} was not refused:\n{node.text()[-3000:]}"
        ) from None
    assert code != 0, node.text()[-3000:]
    return node.text()


# ----------------------------------------------------------------------------- tests
def test_server_enrolment_and_refusals(deployment: Deployment) -> None:
    dep = deployment
    out = dep.start_server()
    token = dep.token()
    assert token in out.stdout  # printed once, on first start ...
    assert _mode(dep.data_dir / "admin-token") == 0o600
    assert _mode(dep.data_dir / "tls" / "server.key") == 0o600
    assert _mode(dep.data_dir / "tls" / "ca.key") == 0o600
    again = dep.start_server()  # ... and not again
    assert "already running" in again.stdout and token not in again.stdout
    moved = dep.cli("server", "start", "--data-dir", str(dep.data_dir), "--api-port",
                    str(free_port()), check=False)  # fmt: skip
    assert moved.returncode != 0 and "server stop" in moved.stderr
    status = dep.cli("server", "status", "--data-dir", str(dep.data_dir), "--json")
    assert all(c["running"] and c["reachable"] for c in json.loads(status.stdout))

    # enrol two clients: a bundle directory and a tarball
    alpha = dep.enroll("alpha", dep.root / "alpha.bundle", 0, 2)
    beta = dep.enroll("beta", dep.root / "beta.tar.gz", 1, 2)
    assert _mode(dep.root / "alpha.bundle" / "node.key") == 0o600
    assert _mode(dep.root / "beta.tar.gz") == 0o600
    clients = {c["name"]: c for c in dep.get("/clients")["items"]}
    assert clients["alpha"]["node_id"] == alpha.node_id
    assert clients["beta"]["node_id"] == beta.node_id
    assert {alpha.node_id, beta.node_id} <= {n.node_id for n in dep.registrar().list_nodes()}
    # enrolling the same name twice is refused and registers nothing
    dup = dep.cli("client", "enroll", "--name", "alpha", "--out", str(dep.root / "dup"),
                  "--data-dir", str(dep.data_dir), check=False)  # fmt: skip
    assert dup.returncode != 0 and "409" in dup.stderr
    assert len(dep.registrar().list_nodes()) == 2
    # an unusable --out is refused before the server is asked: nothing registered, no key lost
    (dep.root / "a-file").write_text("not a folder")
    bad = dep.cli("client", "enroll", "--name", "gamma", "--out", str(dep.root / "a-file" / "g"),
                  "--data-dir", str(dep.data_dir), check=False)  # fmt: skip
    assert bad.returncode == 2 and "a-file" in bad.stderr and "Traceback" not in bad.stderr
    assert len(dep.registrar().list_nodes()) == 2
    assert "gamma" not in {c["name"] for c in dep.get("/clients")["items"]}

    # an enrolled key is accepted: the SuperLink reports the node online
    a = dep.start_node("alpha", dep.root / "alpha.bundle")
    wait_for(lambda: dep.node_status(alpha.node_id) == "online", 60, "alpha online")

    # an unenrolled key is refused
    rogue = dep.root / "rogue.bundle"
    info = BundleInfo(name="rogue", superlink=f"127.0.0.1:{dep.superlink_port}", node_id=1,
                      partition_id=0, num_partitions=2)  # fmt: skip
    write_bundle(rogue, info, NodeKeyPair.generate(), dep.ca_cert.read_bytes())
    log = _rejected(dep.start_node("rogue", rogue, *GIVE_UP_AT_ONCE))
    assert "Failed to activate SuperNode" in log

    # a device that trusts another CA cannot connect (TLS verification fails)
    other_ca, _ = make_ca("someone else's CA")
    wrong = dep.root / "wrong-ca.bundle"
    import shutil

    shutil.copytree(dep.root / "alpha.bundle", wrong)
    (wrong / "ca.crt").write_bytes(other_ca)
    log = _rejected(dep.start_node("wrong-ca", wrong, *GIVE_UP_AT_ONCE))
    assert "CERTIFICATE_VERIFY_FAILED" in log or "certificate verify failed" in log

    # a removed client can no longer join
    dep.cli("client", "remove", "beta", "--data-dir", str(dep.data_dir))
    assert "beta" not in {c["name"] for c in dep.get("/clients")["items"]}
    assert dep.node_status(beta.node_id) in (None, "unregistered")
    log = _rejected(dep.start_node("beta", dep.root / "beta.tar.gz", *GIVE_UP_AT_ONCE))
    assert "Failed to activate SuperNode" in log

    # disabling a running client cuts it off, and it cannot come back
    dep.cli("client", "disable", str(alpha.node_id), "--data-dir", str(dep.data_dir))
    assert {c["name"]: c for c in dep.get("/clients")["items"]}["alpha"]["status"] == "disabled"
    wait_for(lambda: a.proc.poll() is not None or dep.node_status(alpha.node_id) != "online",
             60, "alpha cut off")  # fmt: skip
    dep.kill_node(a)
    log = _rejected(dep.start_node("alpha", dep.root / "alpha.bundle", *GIVE_UP_AT_ONCE))
    assert "Failed to activate SuperNode" in log

    # keys and the token never reach a log
    logs = sorted((dep.data_dir / "logs").glob("*.log")) + sorted((dep.root / "logs").glob("*.log"))
    assert len(logs) >= 6
    secrets = [token, _key_body(dep.root / "alpha.bundle" / "node.key"),
               _key_body(dep.data_dir / "tls" / "server.key")]  # fmt: skip
    _assert_no_secrets_in(logs, secrets)

    # stop: everything we started ends
    stop = dep.cli("server", "stop", "--data-dir", str(dep.data_dir))
    assert "superlink" in stop.stdout and "api" in stop.stdout
    dep._remember_descendants()
    wait_for(lambda: not [p for p in dep.seen_pids if alive(p)], 30, "all processes to end")
    status = dep.cli("server", "status", "--data-dir", str(dep.data_dir), check=False)
    assert status.returncode == 3


# ----------------------------------------------------------------------------- runs
#: the Flower app submitted by the run tests (the repository; overridable for debugging)
APP_DIR = Path(os.environ.get("FSQ_TEST_APP_DIR", str(REPO_ROOT)))
RUN_CONFIG = ["-c", "task='synthetic-lsq'", "-c", "num-partitions=2", "-c", "min-nodes=2",
              "-c", "device='cpu'"]  # fmt: skip


def _two_nodes(dep: Deployment) -> tuple[list[BundleInfo], list[Node]]:
    dep.start_server()
    infos = [dep.enroll(n, dep.root / f"{n}.bundle", i, 2) for i, n in enumerate(("n0", "n1"))]
    nodes = [dep.start_node(i.name, dep.root / f"{i.name}.bundle") for i in infos]
    ids = [i.node_id for i in infos]
    wait_for(lambda: all(dep.node_status(n) == "online" for n in ids), 60, "both nodes online")
    return infos, nodes


def _store_run(dep: Deployment, strategy: str) -> dict[str, Any]:
    runs = [r for r in dep.get("/runs", limit=100)["items"] if r["strategy"] == strategy]
    assert len(runs) == 1, runs
    return runs[0]


def test_runs_artemis_and_mcm_on_supernodes(deployment: Deployment) -> None:
    dep = deployment
    infos, _ = _two_nodes(dep)
    node_ids = {i.node_id for i in infos}
    for strategy in ("artemis", "mcm"):
        out = dep.cli("run", "--strategy", strategy, "--rounds", "3", "--app", str(APP_DIR),
                      "--data-dir", str(dep.data_dir), *RUN_CONFIG)  # fmt: skip
        assert "run finished" in out.stdout
        run = _store_run(dep, strategy)
        assert run["status"] == "finished"
        assert run["flower_run_id"] is not None
        assert str(run["flower_run_id"]) in out.stdout
        rounds = dep.get(f"/runs/{run['id']}/rounds")["items"]
        assert [r["round"] for r in rounds] == [1, 2, 3]
        # measured bytes: every round sends uplink payloads; the downlink starts once the
        # model has moved (round 1's clients all start from the same seeded w0)
        assert all(r["downlink_bytes"] > 0 for r in rounds[1:])
        for r in rounds:
            assert r["sampled"] == r["replied"] == 2 and r["failed"] == 0
            assert r["uplink_bytes"] > 0 and r["predicted_uplink_bytes"] > 0
            detail = dep.get(f"/runs/{run['id']}/rounds/{r['round']}")
            clients = detail["clients"]
            assert {c["node_id"] for c in clients} == node_ids
            assert all(c["outcome"] == "ok" and c["uplink_bytes"] > 0 for c in clients)
            assert sum(c["uplink_bytes"] for c in clients) == r["uplink_bytes"]
    # the clients' participation is visible over REST
    for c in dep.get("/clients")["items"]:
        assert c["participation"]["rounds"] == 6 and c["participation"]["ok"] == 6


def test_supernode_killed_mid_run_then_rejoins(deployment: Deployment) -> None:
    dep = deployment
    infos, nodes = _two_nodes(dep)
    victim, victim_node = infos[1], nodes[1]
    # the victim is back about 30-75 s after the kill (the SuperLink releases a crashed
    # node after two missed 30 s heartbeats), then needs one round to resync: 8 rounds
    last = 8  # rounds
    log = dep.root / "logs" / "run.log"
    with open(log, "wb") as fh:
        run_proc = subprocess.Popen(
            [FEDSQUEEZE, "run", "--strategy", "artemis", "--rounds", str(last),
             "--app", str(APP_DIR), "--data-dir", str(dep.data_dir), *RUN_CONFIG,
             "-c", "round-timeout=45.0"],
            env=dep.env, cwd=dep.root, stdout=fh, stderr=subprocess.STDOUT,
        )  # fmt: skip
    dep.seen_pids.add(run_proc.pid)
    try:

        def rounds_done() -> int:
            items = dep.get("/runs", limit=10)["items"]
            if not items:
                return 0
            return int(items[0]["summary"]["rounds_done"])

        wait_for(lambda: rounds_done() >= 1, 180, "round 1 recorded", every=0.1)
        dep.kill_node(victim_node, signal.SIGKILL)  # round 2 is under way
        wait_for(lambda: rounds_done() >= 2, 120, "round 2 recorded without the victim")
        dep.start_node(victim.name, dep.root / f"{victim.name}.bundle")  # same bundle
        code = run_proc.wait(timeout=300)
    finally:
        if run_proc.poll() is None:
            run_proc.kill()
            run_proc.wait()
    text = log.read_text(errors="replace")
    assert code == 0, text[-4000:]
    run = _store_run(dep, "artemis")
    assert run["status"] == "finished"
    rounds = {r["round"]: r for r in dep.get(f"/runs/{run['id']}/rounds")["items"]}
    assert sorted(rounds) == list(range(1, last + 1))

    def outcome(k: int) -> str | None:
        clients = dep.get(f"/runs/{run['id']}/rounds/{k}")["clients"]
        return next((c["outcome"] for c in clients if c["node_id"] == victim.node_id), None)

    # the round in flight recorded the victim's failure and went on with the other node
    assert rounds[2]["failed"] >= 1 and rounds[2]["replied"] >= 1
    assert outcome(2) not in (None, "ok")
    assert all(r["replied"] >= 1 for r in rounds.values())  # the run never stalled
    # the restarted node rejoined and its replies are accepted again, to the last round
    assert any(outcome(k) == "ok" for k in range(3, last + 1))
    assert rounds[last]["replied"] == rounds[last]["sampled"] == 2
    assert outcome(last) == "ok"
    # and its state was brought back in step with the server's (a resync was counted)
    assert sum(int(r["extra"].get("resyncs", 0)) for r in rounds.values()) >= 1


@pytest.mark.postgres
def test_deployment_records_to_postgresql(deployment: Deployment) -> None:
    """The server's store on PostgreSQL: the ServerApp (started by the SuperLink) records
    there and the REST service serves it. The URL carries a password (trust auth ignores
    it): it reaches the ServerApp through the SuperLink's environment, never through the
    run config, and appears in no file but the server's own 0600 server.json (not in
    Flower's state, logs, bundles), in no REST answer and in no command output, including
    the output of commands that fail."""
    from conftest import throwaway_postgres
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    dep = deployment
    password = "pw-" + os.urandom(8).hex()
    with throwaway_postgres() as plain_url:
        url = make_url(plain_url).set(password=password).render_as_string(hide_password=False)
        dep.database_url = url
        infos, _ = _two_nodes(dep)
        assert _mode(dep.data_dir / "server.json") == 0o600
        out = dep.cli("run", "--strategy", "artemis", "--rounds", "2", "--app", str(APP_DIR),
                      "--data-dir", str(dep.data_dir), *RUN_CONFIG)  # fmt: skip
        run = _store_run(dep, "artemis")
        assert run["status"] == "finished" and run["summary"]["rounds_done"] == 2
        engine = create_engine(plain_url)
        try:
            with engine.connect() as conn:
                n_rounds = conn.execute(
                    text("SELECT count(*) FROM rounds WHERE run_id = :r"), {"r": run["id"]}
                ).scalar_one()
                # node ids are unsigned 64-bit; the column stores them as signed BIGINT
                rows = conn.execute(text("SELECT node_id FROM clients")).scalars()
                nodes = {int(n) % 2**64 for n in rows}
        finally:
            engine.dispose()
        assert n_rounds == 2
        assert nodes == {i.node_id for i in infos}
        answers = [
            httpx.get(dep.api_url + path, timeout=30)
            for path in ("/runs", f"/runs/{run['id']}", f"/runs/{run['id']}/rounds", "/health")
        ]
        assert all(a.status_code == 200 for a in answers)
        # commands that fail: each one error line, no traceback, no password
        missing = make_url(url).set(database=f"fsq_missing_{os.urandom(4).hex()}")
        missing_url = missing.render_as_string(hide_password=False)
        failing = [
            dep.cli("run", "--strategy", "artemis", "-c", f"database-url='{url}'",
                    "--data-dir", str(dep.data_dir), check=False),
            dep.cli("db", "upgrade", "--database-url", missing_url, check=False),
            dep.cli("server", "start", "--data-dir", str(dep.root / "second"),
                    "--database-url", missing_url, "--superlink-port", str(free_port()),
                    "--api-port", str(free_port()), check=False),
        ]  # fmt: skip
        assert [f.returncode for f in failing] == [2, 1, 1]
        dep.shutdown()  # before the database is dropped
        if (dep.root / "second" / "server.json").exists():
            dep.cli("server", "stop", "--data-dir", str(dep.root / "second"), check=False)
    for done in [out, *failing]:
        assert password not in done.stdout + done.stderr
        assert "Traceback" not in done.stdout + done.stderr
    for done in failing:
        assert done.stderr.strip().splitlines()[-1].startswith("error: "), done.stderr
    assert password not in json.dumps(run["config"]) and "database-url" not in run["config"]
    assert not [a.request.url for a in answers if password in a.text]
    # no file holds it but the servers' own 0600 configurations: not Flower's state (and
    # WAL), not the logs of the SuperLink, the REST service, the SuperNodes, not FLWR_HOME
    assert list(dep.data_dir.glob("superlink.db*"))
    holding = [p for p in dep.root.rglob("*") if p.is_file() and not p.is_symlink()
               and password.encode() in p.read_bytes()]  # fmt: skip
    assert all(p.name == "server.json" and _mode(p) == 0o600 for p in holding), holding


def test_serverapp_killed_mid_run_is_resumed(deployment: Deployment) -> None:
    """The ServerApp process exits hard after round 1 of 3 (test-server-exit); `fedsqueeze
    run --resume RUN` continues the same store run from the checkpoint: the SuperNodes keep
    their node ids, so the server resets both clients' memories on first contact and sends
    snapshots; the run ends with rounds 1..3 once each."""
    dep = deployment
    _two_nodes(dep)
    crashed = dep.cli("run", "--strategy", "artemis", "--rounds", "3", "--app", str(APP_DIR),
                      "--data-dir", str(dep.data_dir), *RUN_CONFIG, "-c", "pp-variant='pp1'",
                      "-c", "test-server-exit=1", check=False)  # fmt: skip
    assert crashed.returncode != 0, crashed.stdout[-3000:]
    run = _store_run(dep, "artemis")
    assert run["status"] in ("running", "interrupted") and run["summary"]["rounds_done"] == 1
    first_flower_run = run["flower_run_id"]
    resumed = dep.cli("run", "--resume", str(run["id"]), "--app", str(APP_DIR),
                      "--data-dir", str(dep.data_dir))  # fmt: skip
    assert "run finished" in resumed.stdout
    run = _store_run(dep, "artemis")  # still one run: the same one, continued
    assert run["status"] == "finished" and run["flower_run_id"] != first_flower_run
    rounds = {r["round"]: r for r in dep.get(f"/runs/{run['id']}/rounds")["items"]}
    assert sorted(rounds) == [1, 2, 3]
    assert all(r["replied"] == r["sampled"] == 2 for r in rounds.values())
    assert rounds[2]["extra"]["resets_sent"] == 2 and rounds[3]["extra"]["resets_sent"] == 0
    assert rounds[3]["eval_loss"] < rounds[1]["eval_loss"]
    checkpoints = list((dep.root / "checkpoints").glob(f"*/run-{run['id']}/server.ckpt"))
    assert len(checkpoints) == 1 and _mode(checkpoints[0]) == 0o600
