"""Network exposure of a deployment (issue 8, items 1 and 7): only the Fleet API faces the
devices, through nginx; the Control API stays on loopback; `server start` checks every
argument before it writes anything; `server stop` signals only the processes it started.

Real processes throughout: `fedsqueeze server start` with a Fleet proxy (flower-superlink on
127.0.0.1 + nginx + the REST service), SuperNodes enrolled the normal way and connected
through the proxy, Flower's own Control API client as the attacker. The deployment helpers
(`Deployment`, the `deployment` fixture) are those of tests/test_deploy.py.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import ssl
import stat
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil
import pytest
from test_deploy import (
    APP_DIR,
    FEDSQUEEZE,
    GIVE_UP_AT_ONCE,
    RUN_CONFIG,
    Deployment,
    _rejected,
    _store_run,
    deployment,  # noqa: F401  (the fixture)
    free_port,
    wait_for,
)

from client.enroll import BundleInfo, write_bundle
from core.keys import NodeKeyPair
from server.deploy.launcher import ServerConfig, ServerPaths, save_config
from server.deploy.processes import ProcessRecord
from server.deploy.proxy import BURST, FLEET_PATHS, NGINX_ENV, NGINX_PACKAGE, RATE_PER_S

needs_nginx = pytest.mark.skipif(
    shutil.which("nginx") is None, reason=f"nginx not on PATH (Debian package {NGINX_PACKAGE})"
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("DATABASE_URL", "FEDSQUEEZE_TOKEN", NGINX_ENV):
        env.pop(key, None)
    env.update(FEDSQUEEZE_HOME=str(tmp_path / "home"), FLWR_HOME=str(tmp_path / "flwr-home"))
    return env


def _fedsqueeze(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FEDSQUEEZE, *args], env=env, capture_output=True, text=True, timeout=300)


def _tree(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every path under `root` with its mode and (for files) content."""
    out: dict[str, tuple[int, bytes]] = {}
    for path in [root, *sorted(root.rglob("*"))]:
        st = path.stat()
        out[str(path)] = (st.st_mode, path.read_bytes() if path.is_file() else b"")
    return out


# ------------------------------------------------------------------------ fast checks
def test_fleet_paths_are_those_of_flowers_supernode() -> None:
    """The allow-list is exactly the Fleet API of the installed flwr, as its route table
    and its SuperNode client spell it; nothing of the Control or runtime API is in it."""
    from flwr.supercore.protobuf.translation import PROTOBUF_REQUEST_TYPES
    from flwr.supernode.fleet_http_client import FleetHttpClient

    routes = {path for method, path in PROTOBUF_REQUEST_TYPES if path.startswith("/v1/fleet/")}
    assert {m for m, p in PROTOBUF_REQUEST_TYPES if p in routes} == {"POST"}
    called = set(re.findall(r'path="(/v1/[^"]+)"', inspect.getsource(FleetHttpClient)))
    assert set(FLEET_PATHS) == routes == called
    assert len(FLEET_PATHS) == len(set(FLEET_PATHS))
    assert all(p.startswith("/v1/fleet/") for p in FLEET_PATHS)


@needs_nginx
def test_rendered_nginx_config_is_valid_and_forwards_only_fleet_paths(tmp_path: Path) -> None:
    """The configuration nginx gets: accepted by `nginx -t`; one exact location per Fleet
    path, each forwarding that literal path (so the SuperLink never sees another one)."""
    from server.deploy.certs import ensure_tls
    from server.deploy.proxy import ProxyFiles, ProxySettings, nginx_command, write_config

    tls = ensure_tls(tmp_path / "tls")
    files = ProxyFiles(tmp_path / "proxy", tmp_path / "access.log")
    settings = ProxySettings("0.0.0.0", 9443, "[::1]:9092", tls.server_cert, tls.server_key,
                             tls.ca_cert, "localhost", max_body_mb=7)  # fmt: skip
    write_config(settings, files)
    text = files.config.read_text()
    assert _mode(files.config) == 0o600 and _mode(files.prefix) == 0o700
    assert "/etc/nginx" not in text and "include" not in text
    assert "client_max_body_size 7m;" in text and "server [::1]:9092;" in text
    forwarded = re.findall(r"proxy_pass https://superlink(\S*);", text)
    assert forwarded == list(FLEET_PATHS)
    assert re.findall(r"location = (\S+) \{", text) == list(FLEET_PATHS)
    nginx = shutil.which("nginx")
    assert nginx is not None
    check = subprocess.run([*nginx_command(nginx, files), "-t"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_device_facing_start_without_nginx_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    env = _env(tmp_path)
    env["PATH"] = os.pathsep.join(
        d for d in env["PATH"].split(os.pathsep) if d and not (Path(d) / "nginx").exists()
    )
    before = _tree(tmp_path)
    data_dir = tmp_path / "server"
    out = _fedsqueeze(env, "server", "start", "--data-dir", str(data_dir),
                      "--fleet-host", "0.0.0.0", "--fleet-port", str(free_port()))  # fmt: skip
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "nginx" in lines[0] and f"`{NGINX_PACKAGE}`" in lines[0], lines
    assert "Traceback" not in out.stderr
    assert _tree(tmp_path) == before  # no data dir, no FEDSQUEEZE_HOME, nothing
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(data_dir) in " ".join(
        p.info["cmdline"] or [])]  # fmt: skip


@pytest.mark.parametrize(
    "args",
    [
        ["--api-port", "70000"],
        ["--superlink-port", "0"],
        ["--fleet-host", "127.0.0.1", "--fleet-port", "65536"],
        ["--superlink-host", "0.0.0.0"],  # the Control API never leaves loopback
        ["--api-host", "not-an-address"],
        ["--public-address", "fl.example.org:99999"],
        ["--public-address", "fl.example.org"],
        ["--fleet-host", "127.0.0.1", "--fleet-port", "9092", "--superlink-port", "9092"],
        ["--ca-cert", "missing-ca.crt", "--server-cert", "x.crt", "--server-key", "x.key"],
    ],
)
def test_bad_server_start_arguments_exit_2_and_write_nothing(
    tmp_path: Path, args: list[str]
) -> None:
    env = _env(tmp_path)
    # an existing data directory with a configuration and loose modes: left as it is
    data_dir = tmp_path / "server"
    save_config(ServerPaths(data_dir), ServerConfig(superlink_port=9100, api_port=8181))
    data_dir.chmod(0o755)
    before = _tree(tmp_path)
    out = _fedsqueeze(env, "server", "start", "--data-dir", str(data_dir), *args)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    assert _tree(tmp_path) == before
    assert _mode(data_dir) == 0o755


def test_client_start_refuses_a_bad_port(tmp_path: Path) -> None:
    env = _env(tmp_path)
    for args in (["--clientappio-port", "70000"], ["--superlink", "127.0.0.1:0"]):
        out = _fedsqueeze(env, "client", "start", "--bundle", str(tmp_path / "b"), *args)
        assert out.returncode == 2, (args, out.stderr)
        assert "Traceback" not in out.stderr


def test_server_stop_refuses_a_pid_file_naming_another_command(tmp_path: Path) -> None:
    env = _env(tmp_path)
    data_dir = tmp_path / "server"
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        proc = psutil.Process(victim.pid)
        pid_file = data_dir / "run" / "superlink.pid"
        pid_file.parent.mkdir(parents=True)
        # same PID and start time, but the command line of a SuperLink: not ours to kill
        forged = ProcessRecord("superlink", victim.pid, proc.create_time(),
                               ["/usr/bin/flower-superlink", "--port", "9092"], "")  # fmt: skip
        pid_file.write_text(forged.to_json())
        out = _fedsqueeze(env, "server", "stop", "--data-dir", str(data_dir))
        assert out.returncode == 1, out.stdout
        assert f"PID {victim.pid}" in out.stderr and "not the superlink we started" in out.stderr
        assert "Traceback" not in out.stderr
        assert victim.poll() is None and pid_file.exists()
        save_config(ServerPaths(data_dir), ServerConfig())
        status = _fedsqueeze(env, "server", "status", "--data-dir", str(data_dir), "--json")
        assert status.returncode == 3
        row = next(r for r in json.loads(status.stdout) if r["name"] == "superlink")
        assert not row["running"] and "not the superlink we started" in row["note"]
        # the same PID file with the process's own command line: stopped, file removed
        ours = ProcessRecord("superlink", victim.pid, proc.create_time(), proc.cmdline(), "")
        pid_file.write_text(ours.to_json())
        out = _fedsqueeze(env, "server", "stop", "--data-dir", str(data_dir))
        assert out.returncode == 0 and "superlink" in out.stdout, out.stderr
        assert victim.wait(timeout=30) is not None and not pid_file.exists()
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()


# ------------------------------------------------------------------------ end to end
def _control_attacks(address: str, ca_cert: Path) -> dict[str, int | str]:
    """Flower's own Control API client against `address`: {call: HTTP status or 'ok'}."""
    from flwr.proto.control_pb2 import (
        ListNodesRequest,
        ListRunsRequest,
        RegisterNodeRequest,
        StartRunRequest,
    )
    from flwr.proto.fab_pb2 import Fab
    from flwr.supercore.control import ControlHttpClient

    client = ControlHttpClient.from_server_address(
        address, insecure=False, root_certificates=ca_cert.read_bytes(), interceptors=[]
    )
    key = NodeKeyPair.generate().public_pem
    calls = {
        "RegisterNode": lambda: client.RegisterNode(RegisterNodeRequest(public_key=key)),
        "ListNodes": lambda: client.ListNodes(ListNodesRequest()),
        "ListRuns": lambda: client.ListRuns(ListRunsRequest()),
        "StartRun": lambda: client.StartRun(
            StartRunRequest(fab=Fab(hash_str="0" * 64, content=b"PK"))
        ),
    }
    out: dict[str, int | str] = {}
    try:
        for name, call in calls.items():
            try:
                call()
                out[name] = "ok"
            except httpx.HTTPStatusError as exc:
                out[name] = exc.response.status_code
    finally:
        client.close()
    return out


def _fleet_requests_per_second(access_log: Path) -> int:
    """The most Fleet requests the proxy served in one second (all from 127.0.0.1)."""
    seconds = Counter(
        m.group(1)
        for line in access_log.read_text().splitlines()
        if (m := re.search(r'\[(\S+)\] "POST /v1/fleet/\S+ HTTP/1.1" 200', line))
    )
    return max(seconds.values())


@needs_nginx
@pytest.mark.slow
def test_only_the_fleet_api_faces_devices(deployment: Deployment) -> None:  # noqa: F811
    dep = deployment
    fleet_port = free_port()
    fleet = f"127.0.0.1:{fleet_port}"
    dep.start_server("--fleet-host", "127.0.0.1", "--fleet-port", str(fleet_port),
                     "--fleet-max-body-mb", "1")  # fmt: skip
    data = dep.data_dir
    status = json.loads(dep.cli("server", "status", "--data-dir", str(data), "--json").stdout)
    assert [(c["name"], c["running"], c["reachable"]) for c in status] == [
        ("superlink", True, True), ("proxy", True, True), ("api", True, True)]  # fmt: skip
    # processes: PID files with the command line; nginx runs as us, from our data dir
    for name in ("superlink", "proxy", "api"):
        record = json.loads((data / "run" / f"{name}.pid").read_text())
        assert record["cmdline"] and record["create_time"] > 0
        assert _mode(data / "run" / f"{name}.pid") == 0o600
    nginx = psutil.Process(json.loads((data / "run" / "proxy.pid").read_text())["pid"])
    assert str(data / "proxy" / "nginx.conf") in " ".join(nginx.cmdline())
    assert {p.uids().effective for p in [nginx, *nginx.children()]} == {os.geteuid()}
    assert (data / "proxy" / "nginx.pid").read_text().strip() == str(nginx.pid)
    # the SuperLink listens on loopback only; nginx holds the Fleet port
    superlink = psutil.Process(json.loads((data / "run" / "superlink.pid").read_text())["pid"])
    listening = {c.laddr for c in superlink.net_connections("tcp") if c.status == "LISTEN"}
    assert {(a.ip, a.port) for a in listening} == {("127.0.0.1", dep.superlink_port)}

    # the Control API through the public address: refused by nginx, never reaching Flower
    before = {n.node_id for n in dep.registrar().list_nodes()}
    assert _control_attacks(fleet, dep.ca_cert) == {
        "RegisterNode": 404, "ListNodes": 404, "ListRuns": 404, "StartRun": 404}  # fmt: skip
    # ... and on loopback it answers (this host only: `fedsqueeze run`, enrolment)
    assert {n.node_id for n in dep.registrar().list_nodes()} == before == set()
    with httpx.Client(verify=ssl.create_default_context(cafile=dep.ca_cert), timeout=30) as web:
        base = f"https://{fleet}"
        for path in ("/", "/docs", "/openapi.json", "/health", "/v1/runtime/get-nodes",
                     "/v1/fleet/", "/v1/fleet/get-run/../../control/list-nodes",
                     "/v1/fleet/%2e%2e/control/list-runs"):  # fmt: skip
            assert web.post(base + path, content=b"").status_code == 404, path
            assert web.get(base + path).status_code == 404, path
        assert web.get(base + "/v1/fleet/get-run").status_code == 403  # POST only
        # a Fleet path reaches the SuperLink, which wants a signed request
        protobuf = {"content-type": "application/protobuf"}
        assert (
            web.post(base + "/v1/fleet/get-run", content=b"", headers=protobuf).status_code == 401
        )
        # the body cap (1 MiB here): 413 from nginx
        big = web.post(base + "/v1/fleet/push-object", content=b"\0" * (2 << 20))
        assert big.status_code == 413

    # enrolled the normal way (REST service -> registrar on loopback); bundles dial the proxy
    infos = [dep.enroll(n, dep.root / f"{n}.bundle", i, 2) for i, n in enumerate(("n0", "n1"))]
    assert all(i.superlink == fleet for i in infos)
    assert {n.node_id for n in dep.registrar().list_nodes()} == {i.node_id for i in infos}
    for i in infos:
        dep.start_node(i.name, dep.root / f"{i.name}.bundle")
    wait_for(lambda: all(dep.node_status(i.node_id) == "online" for i in infos), 90,
             "both nodes online through the proxy")  # fmt: skip
    out = dep.cli("run", "--strategy", "artemis", "--rounds", "2", "--app", str(APP_DIR),
                  "--data-dir", str(data), *RUN_CONFIG)  # fmt: skip
    assert "run finished" in out.stdout
    # a key nobody enrolled cannot join through the proxy: Fleet's own registration is off
    # (SuperNode authentication), and activation of an unknown key is refused
    from flwr.proto.fleet_pb2 import RegisterNodeFleetRequest

    rogue_key = NodeKeyPair.generate()
    with httpx.Client(verify=ssl.create_default_context(cafile=dep.ca_cert), timeout=30) as web:
        answer = web.post(
            f"https://{fleet}/v1/fleet/register-node",
            content=RegisterNodeFleetRequest(public_key=rogue_key.public_pem).SerializeToString(),
            headers={"content-type": "application/protobuf"},
        )
    assert 400 <= answer.status_code < 500, answer.status_code
    rogue = dep.root / "rogue.bundle"
    info = BundleInfo(name="rogue", superlink=fleet, node_id=1, partition_id=0, num_partitions=2)
    write_bundle(rogue, info, rogue_key, dep.ca_cert.read_bytes())
    assert "Failed to activate SuperNode" in _rejected(
        dep.start_node("rogue", rogue, *GIVE_UP_AT_ONCE)
    )
    assert {n.node_id for n in dep.registrar().list_nodes()} == {i.node_id for i in infos}
    run = _store_run(dep, "artemis")
    assert run["status"] == "finished" and run["summary"]["rounds_done"] == 2
    rounds = dep.get(f"/runs/{run['id']}/rounds")["items"]
    assert [r["replied"] for r in rounds] == [2, 2]
    # the nodes' traffic went through nginx, and never near its rate limit
    access = (data / "logs" / "proxy-access.log").read_text()
    for path in ("activate-node", "pull-messages", "push-messages", "push-object", "get-fab"):
        assert f'"POST /v1/fleet/{path} HTTP/1.1" 200' in access, path
    assert '" 429 ' not in access
    peak = _fleet_requests_per_second(data / "logs" / "proxy-access.log")
    print(f"peak Fleet requests in one second through the proxy (2 SuperNodes): {peak}")
    assert peak < BURST

    # Flower's state: 0600 in the 0700 data directory
    assert _mode(data) == 0o700
    states = sorted(data.glob("superlink.db*"))
    assert states and all(_mode(p) == 0o600 for p in states), [(p, _mode(p)) for p in states]
    for folder in ("run", "logs", "proxy", "flwr-home"):
        assert _mode(data / folder) == 0o700, folder

    # a flood from one address: 429 once it exceeds the burst (bounded by the rate since)
    sent, started, refused = 0, time.monotonic(), False
    with httpx.Client(verify=ssl.create_default_context(cafile=dep.ca_cert), timeout=30) as web:
        while not refused:
            sent += 1
            code = web.get(f"https://{fleet}/v1/fleet/get-run").status_code
            assert code in (403, 429), code
            refused = code == 429
            elapsed = time.monotonic() - started
            assert refused or sent <= BURST + RATE_PER_S * (elapsed + 1) + 10, sent
            assert elapsed < 600, f"{sent} requests in {elapsed:.0f} s and no 429"

    stop = dep.cli("server", "stop", "--data-dir", str(data))
    assert stop.stdout.strip() == "stopped: api, proxy, superlink"
    assert not nginx.is_running() and not superlink.is_running()
