"""`fedsqueeze server start|stop|status`: the SuperLink and the REST service as background
processes of one data directory.

Layout of the data directory (default ``$FEDSQUEEZE_HOME/server``, mode 0700)::

    server.json          addresses and the store URL (written on first start, updated by
                         options given to later starts)
    tls/                 ca.crt ca.key server.crt server.key (made on first start unless the
                         operator brings their own); keys 0600
    admin-token          the REST admin token, 0600; printed once when created
    superlink.db         Flower's SuperLink state (registered nodes, runs)
    flwr-home/           FLWR_HOME of the SuperLink (installed app bundles) and of `fedsqueeze run`
    run/*.pid            PID files (JSON: pid, start time, command line)
    logs/*.log           process output

The SuperLink (``flower-superlink`` of flwr 1.41) serves its Fleet, Control and runtime
APIs on one HTTPS port, with SuperNode authentication on: only keys registered through the
Control API (see `server.deploy.registrar`) may connect. The REST service is H2's FastAPI
app under uvicorn, given a registrar so that enrolment over HTTP registers keys too.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from server.deploy.certs import (
    TlsFiles,
    certificate_names,
    ensure_tls,
    install_tls,
    write_private,
)
from server.deploy.processes import ProcessRecord, start_background, stop_pid_file, tail
from server.flower_env import flower_env, flower_executable

DEFAULT_SUPERLINK_HOST = "127.0.0.1"
DEFAULT_SUPERLINK_PORT = 9092
DEFAULT_API_HOST = "127.0.0.1"
DEFAULT_API_PORT = 8080
CONNECTION_NAME = "fedsqueeze"


def default_data_dir() -> Path:
    """``$FEDSQUEEZE_HOME/server`` (``~/.fedsqueeze/server`` by default)."""
    from api.settings import fedsqueeze_home

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

    @property
    def superlink_address(self) -> str:
        """Where local tools (registrar, `flwr run`) reach the SuperLink."""
        host = self.superlink_host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return f"[{host}]:{self.superlink_port}" if ":" in host else f"{host}:{self.superlink_port}"

    @property
    def device_address(self) -> str:
        return self.public_address or self.superlink_address

    @property
    def api_url(self) -> str:
        host = self.api_host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return f"http://{host}:{self.api_port}"

    def validate(self) -> None:
        for name, port in (("superlink port", self.superlink_port), ("API port", self.api_port)):
            if not 1 <= port <= 65535:
                raise ValueError(f"{name} must be in 1..65535, got {port}")
        if self.superlink_port == self.api_port and self.superlink_host == self.api_host:
            raise ValueError("the SuperLink and the REST service cannot share a port")


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

    def pid_file(self, name: str) -> Path:
        return self.root / "run" / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"


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


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
    return flower_env(paths.flwr_home, {"DATABASE_URL": config.database_url})


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


def start_server(
    data_dir: Path,
    *,
    overrides: dict[str, object] | None = None,
    tls_files: tuple[Path, Path, Path] | None = None,
    timeout: float = 60.0,
    echo: Callable[[str], None] = lambda _m: None,
) -> StartResult:
    """Start (what is not already running of) the SuperLink and the REST service."""
    from api.settings import resolve_database_url
    from api.store import open_store

    paths = ServerPaths(data_dir)
    paths.root.mkdir(parents=True, exist_ok=True)
    paths.root.chmod(0o700)
    saved = load_config(paths)
    config = saved or ServerConfig()
    running = [
        name
        for name in ("superlink", "api")
        if (rec := ProcessRecord.read(paths.pid_file(name))) is not None and rec.alive()
    ]
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if running and saved is not None and getattr(saved, key) != value:
            raise RuntimeError(
                f"{' and '.join(running)} already running with {key}={getattr(saved, key)!r}: "
                f"run `fedsqueeze server stop --data-dir {data_dir}` before changing it"
            )
        setattr(config, key, value)
    if not config.database_url:
        config.database_url = resolve_database_url(None)
    config.validate()
    save_config(paths, config)
    warnings: list[str] = []
    if not _is_loopback(config.superlink_host):
        warnings.append(
            f"the SuperLink listens on {config.superlink_host}:{config.superlink_port}; in "
            "flwr 1.41 its Control API (node registration, run submission) shares that port "
            "with the Fleet API and has no authentication without Flower's enterprise "
            "add-ons: expose only the /v1/fleet/ paths to devices (reverse proxy or firewall)"
        )

    # TLS material
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

    # store and the admin token
    store = open_store(config.database_url)
    admin_token: str | None = None
    if not paths.admin_token.is_file():
        _, admin_token = store.create_token("admin", admin=True)
        write_private(paths.admin_token, (admin_token + "\n").encode())
    store.engine.dispose()

    env = base_env(paths, config)
    paths.flwr_home.mkdir(parents=True, exist_ok=True)
    started: list[str] = []

    sl_pid = paths.pid_file("superlink")
    sl_rec = ProcessRecord.read(sl_pid)
    if sl_rec is None or not sl_rec.alive():
        if not port_free(config.superlink_host, config.superlink_port):
            raise OSError(
                f"port {config.superlink_port} on {config.superlink_host} is in use: choose "
                "another with --superlink-port"
            )
        echo(f"starting the SuperLink on {config.superlink_host}:{config.superlink_port}")
        rec = start_background(
            "superlink",
            superlink_command(paths, config),
            pid_file=sl_pid,
            log_file=paths.log_file("superlink"),
            env=env,
            cwd=paths.root,
        )
        started.append("superlink")
        try:
            wait_until(
                lambda: superlink_ready(config.superlink_address, paths.tls.ca_cert),
                timeout,
                "the SuperLink",
                rec.alive,
                paths.log_file("superlink"),
            )
        except Exception:
            stop_pid_file(sl_pid)
            raise

    api_pid = paths.pid_file("api")
    api_rec = ProcessRecord.read(api_pid)
    if api_rec is None or not api_rec.alive():
        if not port_free(config.api_host, config.api_port):
            raise OSError(
                f"port {config.api_port} on {config.api_host} is in use: choose another with "
                "--api-port"
            )
        echo(f"starting the REST service on {config.api_url}")
        rec = start_background(
            "api",
            api_command(paths),
            pid_file=api_pid,
            log_file=paths.log_file("api"),
            env=env,
            cwd=Path(__file__).resolve().parents[2],
        )
        started.append("api")
        try:
            wait_until(
                lambda: api_ready(config.api_url),
                timeout,
                "the REST service",
                rec.alive,
                paths.log_file("api"),
            )
        except Exception:
            stop_pid_file(api_pid)
            raise
    return StartResult(config, paths, admin_token, started, warnings)


def stop_server(data_dir: Path) -> list[str]:
    """Stop the REST service and the SuperLink of `data_dir`; return what was running."""
    paths = ServerPaths(data_dir)
    stopped = []
    for name in ("api", "superlink"):
        if stop_pid_file(paths.pid_file(name)):
            stopped.append(name)
    return stopped


@dataclass
class ComponentStatus:
    name: str
    running: bool
    pid: int | None
    address: str
    reachable: bool
    log_file: str


def server_status(data_dir: Path) -> list[ComponentStatus]:
    paths, config = require_config(data_dir)
    out = []
    for name, address in (("superlink", config.superlink_address), ("api", config.api_url)):
        rec = ProcessRecord.read(paths.pid_file(name))
        running = rec is not None and rec.alive()
        if name == "superlink":
            reachable = superlink_ready(address, paths.tls.ca_cert) if running else False
        else:
            reachable = api_ready(address) if running else False
        out.append(
            ComponentStatus(
                name,
                running,
                rec.pid if rec is not None and running else None,
                address,
                reachable,
                str(paths.log_file(name)),
            )
        )
    return out
