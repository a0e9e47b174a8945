"""`fedsqueeze server start|stop|status`: the SuperLink, its Fleet proxy and the REST
service as background processes of one data directory.

Layout of the data directory (default ``$FEDSQUEEZE_HOME/server``, mode 0700)::

    server.json          addresses and the store URL (written on first start, updated by
                         options given to later starts)
    tls/                 ca.crt ca.key server.crt server.key (made on first start unless the
                         operator brings their own); keys 0600
    admin-token          the REST admin token, 0600; printed once when created
    superlink.db         Flower's SuperLink state (registered nodes, runs), with its -wal and
                         -shm: 0600 (every process starts with umask 077)
    flwr-home/           FLWR_HOME of the SuperLink (installed app bundles) and of `fedsqueeze run`
    proxy/               nginx's prefix: nginx.conf, nginx.pid, temp/ (only with --fleet-host)
    run/*.pid            PID files (JSON: pid, start time, command line), 0600
    logs/*.log           process output, 0600

The SuperLink (``flower-superlink`` of flwr 1.42) serves its Fleet, Control and runtime
APIs on one HTTPS port, with SuperNode authentication on: only keys registered through the
Control API (see `server.deploy.registrar`) may connect. The Control API has no
authentication in Flower's open-source edition, so the SuperLink only ever binds to
loopback; devices on other hosts reach it through the Fleet proxy (`server.deploy.proxy`,
nginx on ``--fleet-host``/``--fleet-port``), which forwards the Fleet paths only. The REST
service is H2's FastAPI app under uvicorn, given a registrar so that enrolment over HTTP
registers keys too (over loopback, like `fedsqueeze run`).

Every argument is checked (`ServerConfig.validate`, the TLS files, nginx when a proxy is
asked for) before anything is written or a directory created: a bad one raises
`BadServerConfig` (the command line exits 2).
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from core.files import write_private
from core.flower_env import flower_env, flower_executable
from core.net import is_loopback
from core.superexec import task_poll_env
from server.deploy.certs import TlsFiles, certificate_names, ensure_tls, install_tls
from server.deploy.processes import (
    ForeignProcessError,
    ProcessRecord,
    start_background,
    stop_process,
    tail,
)
from server.deploy.proxy import (
    DEFAULT_MAX_BODY_MB,
    ProxyFiles,
    ProxySettings,
    nginx_command,
    proxy_ready,
    require_nginx,
    write_config,
)

DEFAULT_SUPERLINK_HOST = "127.0.0.1"
DEFAULT_SUPERLINK_PORT = 9092
DEFAULT_API_HOST = "127.0.0.1"
DEFAULT_API_PORT = 8080
DEFAULT_FLEET_PORT = 9443
#: the background processes, in start order (stopped in reverse)
COMPONENTS = ("superlink", "proxy", "api")


class BadServerConfig(ValueError):
    """An argument of `server start` (or a value of server.json) is invalid; one line."""


def _check_port(name: str, port: int) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise BadServerConfig(f"{name} must be in 1..65535, got {port!r}")


def _check_bind_host(name: str, host: str) -> None:
    if host == "localhost":
        return
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise BadServerConfig(
            f"{name} must be an IP address to bind to (e.g. 127.0.0.1, or 0.0.0.0 for all "
            f"IPv4 interfaces), got {host!r}"
        ) from None


def default_data_dir() -> Path:
    """``$FEDSQUEEZE_HOME/server`` (``~/.fedsqueeze/server`` by default)."""
    from core.paths import fedsqueeze_home

    return fedsqueeze_home() / "server"


@dataclass
class ServerConfig:
    """What `server start` binds to and where it keeps things (saved in server.json)."""

    superlink_host: str = DEFAULT_SUPERLINK_HOST
    superlink_port: int = DEFAULT_SUPERLINK_PORT
    api_host: str = DEFAULT_API_HOST
    api_port: int = DEFAULT_API_PORT
    #: the SuperLink address written into client bundles (what devices dial)
    public_address: str = ""
    #: extra DNS names / IPs in the server certificate
    server_names: list[str] = field(default_factory=list)
    database_url: str = ""
    #: where the Fleet proxy (nginx) listens for devices; "" = no proxy (devices on this
    #: host dial the loopback SuperLink directly)
    fleet_host: str = ""
    fleet_port: int = DEFAULT_FLEET_PORT
    #: the proxy's request body cap (MiB)
    fleet_max_body_mb: int = DEFAULT_MAX_BODY_MB

    @property
    def proxied(self) -> bool:
        """Whether devices reach the SuperLink through the Fleet proxy."""
        return bool(self.fleet_host)

    @property
    def superlink_address(self) -> str:
        """Where local tools (registrar, `flwr run`) reach the SuperLink (loopback)."""
        return _local_address(self.superlink_host, self.superlink_port)

    @property
    def fleet_address(self) -> str:
        """Where a process on this host reaches the Fleet proxy."""
        return _local_address(self.fleet_host, self.fleet_port)

    @property
    def device_address(self) -> str:
        """The address written into bundles: --public-address, else the proxy's, else
        (no proxy: devices on this host only) the SuperLink's."""
        if self.public_address:
            return self.public_address
        return self.fleet_address if self.proxied else self.superlink_address

    @property
    def api_url(self) -> str:
        host = self.api_host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return f"http://{host}:{self.api_port}"

    def validate(self) -> None:
        """Check every field; raise BadServerConfig naming the first bad one."""
        ports = {"--superlink-port": self.superlink_port, "--api-port": self.api_port}
        if self.proxied:
            ports["--fleet-port"] = self.fleet_port
        for name, port in ports.items():
            _check_port(name, port)
        _check_bind_host("--superlink-host", self.superlink_host)
        if not is_loopback(self.superlink_host):
            raise BadServerConfig(
                f"--superlink-host must be a loopback address, got {self.superlink_host!r}: "
                "the SuperLink's Control API has no authentication, so devices reach it "
                "through the Fleet proxy: pass --superlink-host 127.0.0.1 --fleet-host 0.0.0.0"
            )
        _check_bind_host("--api-host", self.api_host)
        if self.proxied:
            _check_bind_host("--fleet-host", self.fleet_host)
        names = {port: name for name, port in ports.items()}
        if len(names) < len(ports):
            raise BadServerConfig(
                f"{', '.join(ports)} must differ, got {', '.join(map(str, ports.values()))}"
            )
        if self.public_address:
            host, sep, port_text = self.public_address.rpartition(":")
            if not sep or not host.strip("[]") or not port_text.isdigit():
                raise BadServerConfig(
                    f"--public-address must be HOST:PORT, got {self.public_address!r}"
                )
            _check_port("the port of --public-address", int(port_text))
        if not 1 <= self.fleet_max_body_mb <= 4096:
            raise BadServerConfig(
                f"--fleet-max-body-mb must be in 1..4096, got {self.fleet_max_body_mb}"
            )


@dataclass(frozen=True)
class ServerPaths:
    """Every file of a server data directory."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "server.json"

    @property
    def tls_dir(self) -> Path:
        return self.root / "tls"

    @property
    def tls(self) -> TlsFiles:
        return TlsFiles.in_dir(self.tls_dir)

    @property
    def admin_token(self) -> Path:
        return self.root / "admin-token"

    @property
    def superlink_db(self) -> Path:
        return self.root / "superlink.db"

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr-home"

    @property
    def proxy(self) -> ProxyFiles:
        return ProxyFiles(self.root / "proxy", self.log_file("proxy-access"))

    def pid_file(self, name: str) -> Path:
        return self.root / "run" / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"


def _local_address(host: str, port: int) -> str:
    if host in ("0.0.0.0", "::", "", "localhost"):
        host = "127.0.0.1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def load_config(paths: ServerPaths) -> ServerConfig | None:
    if not paths.config.is_file():
        return None
    try:
        data = json.loads(paths.config.read_text(encoding="utf-8"))
        return ServerConfig(**data)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{paths.config} is not a valid server configuration: {exc}") from exc


def save_config(paths: ServerPaths, config: ServerConfig) -> None:
    """Write server.json, mode 0600 (the store URL may hold a password)."""
    paths.root.mkdir(parents=True, exist_ok=True)
    write_private(paths.config, (json.dumps(asdict(config), indent=2) + "\n").encode())


def require_config(data_dir: Path) -> tuple[ServerPaths, ServerConfig]:
    paths = ServerPaths(data_dir)
    config = load_config(paths)
    if config is None:
        raise FileNotFoundError(
            f"no server in {data_dir}: run `fedsqueeze server start --data-dir {data_dir}` first"
        )
    return paths, config


def read_admin_token(paths: ServerPaths) -> str:
    try:
        return paths.admin_token.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no admin token in {paths.root}: start the server once, or pass --token"
        ) from None


def port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def base_env(paths: ServerPaths, config: ServerConfig) -> dict[str, str]:
    """Flower's environment (server.flower_env) plus the store's URL and the SuperLink's
    SuperExec task-poll interval (core.superexec: $FLWR_SUPEREXEC_TASK_POLL_INTERVAL, else
    0.1 s), which is how soon a submitted run's ServerApp process starts."""
    return flower_env(paths.flwr_home, {"DATABASE_URL": config.database_url, **task_poll_env()})


def superlink_command(paths: ServerPaths, config: ServerConfig) -> list[str]:
    tls = paths.tls
    return [
        flower_executable("flower-superlink"),
        "--ssl-ca-certfile",
        str(tls.ca_cert),
        "--ssl-certfile",
        str(tls.server_cert),
        "--ssl-keyfile",
        str(tls.server_key),
        "--enable-supernode-auth",
        "--database",
        str(paths.superlink_db),
        "--host",
        config.superlink_host,
        "--port",
        str(config.superlink_port),
        "--disable-runtime-dependency-installation",
    ]


def api_command(paths: ServerPaths) -> list[str]:
    return [sys.executable, "-m", "server.deploy.service", "--data-dir", str(paths.root)]


def wait_until(
    check: Callable[[], bool], timeout: float, what: str, alive: Callable[[], bool], log: Path
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if not alive():
            raise RuntimeError(f"{what} exited during start-up; last log lines:\n{tail(log)}")
        time.sleep(0.2)
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s; last log lines:\n{tail(log)}")


def superlink_ready(address: str, ca_cert: Path) -> bool:
    """True when the SuperLink answers a TLS handshake verified by `ca_cert`."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    ctx = ssl.create_default_context(cafile=str(ca_cert))
    try:
        with (
            socket.create_connection((host, int(port)), timeout=2) as raw,
            ctx.wrap_socket(raw, server_hostname=host),
        ):
            return True
    except (OSError, ssl.SSLError):
        return False


def api_ready(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class StartResult:
    config: ServerConfig
    paths: ServerPaths
    admin_token: str | None  # set only when it was created by this start
    started: list[str]
    warnings: list[str]


def _check_tls_files(ca_cert: Path, server_cert: Path, server_key: Path) -> None:
    """The operator's TLS files exist and parse (before anything is written)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    for option, path in (
        ("--ca-cert", ca_cert),
        ("--server-cert", server_cert),
        ("--server-key", server_key),
    ):
        if not path.is_file():
            raise BadServerConfig(f"{option} {path} is not a file")
        try:
            data = path.read_bytes()
            if option == "--server-key":
                serialization.load_pem_private_key(data, password=None)
            else:
                x509.load_pem_x509_certificate(data)
        except (OSError, ValueError, TypeError) as exc:
            raise BadServerConfig(f"{option} {path} is not a usable PEM file: {exc}") from None


def _running(paths: ServerPaths) -> list[str]:
    """The components of `paths` that run now (ForeignProcessError if a PID file names a
    process we did not start)."""
    return [
        name
        for name in COMPONENTS
        if (rec := ProcessRecord.read(paths.pid_file(name))) is not None and rec.alive()
    ]


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)


def _protect_state(paths: ServerPaths) -> None:
    """Flower's state files 0600 (those of a data directory made before umask 077)."""
    for state in paths.root.glob(paths.superlink_db.name + "*"):
        if state.is_file():
            state.chmod(0o600)


def _upstream_name(server_cert: Path) -> str:
    """The name nginx checks on the loopback SuperLink's certificate: localhost when the
    certificate has it (ours always does), else its first DNS name."""
    names = certificate_names(server_cert.read_bytes())
    if "localhost" in names:
        return "localhost"
    dns = [n for n in names if not _is_ip(n)]
    if not dns:
        raise BadServerConfig(
            f"the server certificate {server_cert} has no DNS name for the proxy to verify"
        )
    return dns[0]


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _start_component(
    name: str,
    cmd: list[str],
    paths: ServerPaths,
    *,
    bind: tuple[str, int],
    option: str,
    ready: Callable[[], bool],
    what: str,
    env: dict[str, str],
    cwd: Path,
    timeout: float,
    echo: Callable[[str], None],
) -> bool:
    """Start `name` unless it runs; wait until `ready`; True when started here."""
    pid_file = paths.pid_file(name)
    existing = ProcessRecord.read(pid_file)
    if existing is not None and existing.alive():
        return False
    host, port = bind
    if not port_free(host, port):
        raise OSError(f"port {port} on {host} is in use: choose another with {option}")
    echo(f"starting {what} on {_local_address(host, port) if host else port}")
    rec = start_background(
        name, cmd, pid_file=pid_file, log_file=paths.log_file(name), env=env, cwd=cwd
    )
    try:
        wait_until(ready, timeout, what, rec.alive, paths.log_file(name))
    except Exception:
        stop_process(rec)
        pid_file.unlink(missing_ok=True)
        raise
    return True


def start_server(
    data_dir: Path,
    *,
    overrides: dict[str, object] | None = None,
    tls_files: tuple[Path, Path, Path] | None = None,
    timeout: float = 60.0,
    echo: Callable[[str], None] = lambda _m: None,
) -> StartResult:
    """Start (what is not already running of) the SuperLink, the Fleet proxy (when
    ``fleet_host`` is set) and the REST service.

    Steps: 1. check everything (configuration, TLS files, nginx) -- a bad value raises
    BadServerConfig and nothing is written; 2. write server.json, the TLS files and the
    admin token; 3. start the SuperLink on loopback, then nginx, then the REST service,
    each checked to answer before the next.
    """
    import subprocess

    from api.settings import resolve_database_url
    from api.store import open_store

    # 1. check, write nothing
    paths = ServerPaths(data_dir)
    saved = load_config(paths)
    config = ServerConfig(**asdict(saved)) if saved is not None else ServerConfig()
    running = _running(paths) if saved is not None else []
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if running and saved is not None and getattr(saved, key) != value:
            raise RuntimeError(
                f"{' and '.join(running)} already running with {key}={getattr(saved, key)!r}: "
                f"run `fedsqueeze server stop --data-dir {data_dir}` before changing it"
            )
        setattr(config, key, value)
    config.validate()
    nginx = require_nginx() if config.proxied else None
    if tls_files is not None:
        _check_tls_files(*tls_files)
    if not config.database_url:
        config.database_url = resolve_database_url(None)

    # 2. files
    _private_dir(paths.root)
    save_config(paths, config)
    warnings: list[str] = []
    if tls_files is not None:
        install_tls(paths.tls_dir, *tls_files)
        echo(f"installed the operator's TLS files in {paths.tls_dir}")
    elif not paths.tls.exist():
        ensure_tls(paths.tls_dir, config.server_names)
        echo(f"created a CA and a server certificate in {paths.tls_dir}")
    else:
        ensure_tls(paths.tls_dir, config.server_names)

    host = config.device_address.rpartition(":")[0].strip("[]")
    names = certificate_names(paths.tls.server_cert.read_bytes())
    if host and host not in names:
        warnings.append(
            f"devices will dial {host!r} but the server certificate is only valid for "
            f"{', '.join(names)}: they will fail TLS verification. Add the name with "
            "--server-name on a fresh data directory, or bring a certificate that has it"
        )

    store = open_store(config.database_url)
    admin_token: str | None = None
    if not paths.admin_token.is_file():
        _, admin_token = store.create_token("admin", admin=True)
        write_private(paths.admin_token, (admin_token + "\n").encode())
    store.engine.dispose()

    env = base_env(paths, config)
    for folder in (paths.flwr_home, paths.root / "run", paths.root / "logs"):
        _private_dir(folder)
    _protect_state(paths)
    started: list[str] = []

    # 3. processes
    if _start_component(
        "superlink",
        superlink_command(paths, config),
        paths,
        bind=(config.superlink_host, config.superlink_port),
        option="--superlink-port",
        ready=lambda: superlink_ready(config.superlink_address, paths.tls.ca_cert),
        what="the SuperLink",
        env=env,
        cwd=paths.root,
        timeout=timeout,
        echo=echo,
    ):
        started.append("superlink")

    if nginx is not None:
        files = paths.proxy
        settings = ProxySettings(
            listen_host=config.fleet_host,
            listen_port=config.fleet_port,
            upstream=config.superlink_address,
            server_cert=paths.tls.server_cert,
            server_key=paths.tls.server_key,
            ca_cert=paths.tls.ca_cert,
            upstream_name=_upstream_name(paths.tls.server_cert),
            max_body_mb=config.fleet_max_body_mb,
        )
        proxy_rec = ProcessRecord.read(paths.pid_file("proxy"))
        if proxy_rec is None or not proxy_rec.alive():
            write_config(settings, files)
            check = subprocess.run(
                [*nginx_command(nginx, files), "-t", "-q"],
                capture_output=True,
                text=True,
                umask=0o077,
            )
            if check.returncode != 0:
                raise RuntimeError(
                    f"nginx refused its configuration {files.config}: "
                    f"{(check.stderr or check.stdout).strip()}"
                )
        if _start_component(
            "proxy",
            nginx_command(nginx, files),
            paths,
            bind=(config.fleet_host, config.fleet_port),
            option="--fleet-port",
            ready=lambda: proxy_ready(config.fleet_address, paths.tls.ca_cert),
            what="the Fleet proxy (nginx)",
            env=dict(os.environ),
            cwd=files.prefix,
            timeout=timeout,
            echo=echo,
        ):
            started.append("proxy")

    if _start_component(
        "api",
        api_command(paths),
        paths,
        bind=(config.api_host, config.api_port),
        option="--api-port",
        ready=lambda: api_ready(config.api_url),
        what="the REST service",
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        timeout=timeout,
        echo=echo,
    ):
        started.append("api")
    _protect_state(paths)
    return StartResult(config, paths, admin_token, started, warnings)


def stop_server(data_dir: Path) -> list[str]:
    """Stop the REST service, the proxy and the SuperLink of `data_dir`; return what was
    running. Every PID file is checked first: if one names a process we did not start
    (ForeignProcessError), nothing is stopped."""
    paths = ServerPaths(data_dir)
    records = {name: ProcessRecord.read(paths.pid_file(name)) for name in COMPONENTS}
    live = {name: rec for name, rec in records.items() if rec is not None and rec.alive()}
    stopped = []
    for name in reversed(COMPONENTS):
        rec = live.get(name)
        if rec is not None and stop_process(rec):
            stopped.append(name)
        paths.pid_file(name).unlink(missing_ok=True)
    return stopped


@dataclass
class ComponentStatus:
    name: str
    running: bool
    pid: int | None
    address: str
    reachable: bool
    log_file: str
    note: str = ""


def server_status(data_dir: Path) -> list[ComponentStatus]:
    paths, config = require_config(data_dir)
    checks: list[tuple[str, str, Callable[[str], bool]]] = [
        ("superlink", config.superlink_address, lambda a: superlink_ready(a, paths.tls.ca_cert))
    ]
    if config.proxied:
        checks.append(("proxy", config.fleet_address, lambda a: proxy_ready(a, paths.tls.ca_cert)))
    checks.append(("api", config.api_url, api_ready))
    out = []
    for name, address, answers in checks:
        rec = ProcessRecord.read(paths.pid_file(name))
        note = ""
        try:
            running = rec is not None and rec.alive()
        except ForeignProcessError as exc:
            running, note = False, str(exc)
        out.append(
            ComponentStatus(
                name,
                running,
                rec.pid if rec is not None and running else None,
                address,
                answers(address) if running else False,
                str(paths.log_file(name)),
                note,
            )
        )
    return out
