"""The Fleet proxy: nginx in front of the loopback SuperLink, the only port devices reach.

In flwr 1.42 the SuperLink serves its Fleet API (SuperNodes), its Control API (node
registration, run submission, run and node listings) and its runtime API (ServerApp,
SuperExec) on one HTTPS port, and the Control API has no authentication in Flower's
open-source edition. `fedsqueeze server start` therefore binds the SuperLink to loopback
and, for devices, starts nginx (Debian package `nginx`) on the public address with:

* TLS terminated with the server's certificate (the CA in every device bundle verifies it);
* exactly the Fleet paths a SuperNode calls (`FLEET_PATHS`, the calls of
  ``flwr.supernode.fleet_http_client.FleetHttpClient``), POST only, each forwarded over
  HTTPS (verified against the same CA) to the same path on the loopback SuperLink; every
  other path answers 404 and other methods 403, so ``/v1/control/*`` (Control API),
  ``/v1/runtime/*``, ``/docs`` and ``/openapi.json`` never reach Flower;
* a request body cap (`DEFAULT_MAX_BODY_MB`) and a per-client-IP request rate
  (`RATE_PER_S`, `BURST`) and connection cap (`CONNECTIONS_PER_IP`).

nginx runs as the invoking user (``daemon off``, under our PID-file management like the
SuperLink), with its prefix, configuration, pid file and temporary files under
``<data dir>/proxy/`` and its logs under ``<data dir>/logs/`` (nothing in /etc/nginx,
/var/log or /var/lib). SuperNode authentication is unchanged: the signed headers
(``flwr-public-key``, ``flwr-signature``, ``flwr-timestamp``) pass through untouched.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

#: the Debian package that provides /usr/sbin/nginx (bookworm: `nginx`; `nginx-light` is a
#: transitional package that pulls it in)
NGINX_PACKAGE = "nginx"
#: set to an nginx executable (path or name on PATH) to use that one instead of PATH's
NGINX_ENV = "FEDSQUEEZE_NGINX"

#: Every path ``FleetHttpClient`` (flwr 1.42) calls; all POST, protobuf bodies. Checked
#: against flwr's own route table by tests/test_security_proxy.py, so a Flower upgrade that
#: adds a Fleet call fails a test instead of silently breaking SuperNodes.
FLEET_PATHS: tuple[str, ...] = (
    "/v1/fleet/register-node",
    "/v1/fleet/activate-node",
    "/v1/fleet/deactivate-node",
    "/v1/fleet/unregister-node",
    "/v1/fleet/send-node-heartbeat",
    "/v1/fleet/pull-messages",
    "/v1/fleet/push-messages",
    "/v1/fleet/get-run",
    "/v1/fleet/get-fab",
    "/v1/fleet/push-object",
    "/v1/fleet/pull-object",
    "/v1/fleet/confirm-message-received",
)

#: Request body cap (MiB). One request carries one Flower object: Flower splits arrays into
#: 5 MiB chunks (FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE), but fedsqueeze's compressed uplink and
#: downlink travel as bytes in a ConfigRecord, which is one object: an uncompressed float32
#: payload of d parameters is 4d bytes. 64 MiB holds 16 M parameters uncompressed (the
#: Fashion-MNIST CNN has 20,522: 82 KB) and still stops a client from streaming gigabytes
#: into the SuperLink. Raise it with `server start --fleet-max-body-mb` for larger models.
DEFAULT_MAX_BODY_MB = 64
#: Sustained requests per second per client IP. An idle SuperNode sends one pull-messages
#: every 3 s and a heartbeat about every 24 s; a round adds get-run, get-fab and one
#: pull-object / push-object per Flower object of the message (a handful for fedsqueeze's
#: ConfigRecord messages), i.e. well under 1 request/s on average. 20/s leaves room for
#: ~20 SuperNodes behind one NAT address.
RATE_PER_S = 20
#: Requests beyond the rate served at once before 429 (nginx `burst ... nodelay`): a round's
#: worst burst of one SuperNode is ~10-20 requests in a second (measured in
#: tests/test_security_proxy.py from the access log), 200 is ten times that.
BURST = 200
#: Open connections per client IP: a SuperNode keeps one keep-alive connection (httpx).
CONNECTIONS_PER_IP = 64


class ProxyUnavailable(RuntimeError):
    """nginx is needed (a device-facing address was asked for) but not installed."""


def find_nginx() -> str | None:
    """The nginx executable: ``$FEDSQUEEZE_NGINX`` if set, else ``nginx`` on PATH."""
    wanted = os.environ.get(NGINX_ENV) or "nginx"
    return shutil.which(wanted)


def require_nginx() -> str:
    found = find_nginx()
    if found is None:
        raise ProxyUnavailable(
            "a device-facing --fleet-host needs nginx, which is not on PATH: install the "
            f"Debian package `{NGINX_PACKAGE}` (apt-get install {NGINX_PACKAGE}; it is "
            f"/usr/sbin/nginx, put /usr/sbin on PATH) or set {NGINX_ENV}"
        )
    return found


@dataclass(frozen=True)
class ProxyFiles:
    """Where the proxy keeps its files inside the server data directory."""

    prefix: Path  # <data dir>/proxy (nginx -p), 0700
    access_log: Path

    @property
    def config(self) -> Path:
        return self.prefix / "nginx.conf"

    @property
    def nginx_pid(self) -> Path:
        return self.prefix / "nginx.pid"

    @property
    def temp(self) -> Path:
        return self.prefix / "temp"


@dataclass(frozen=True)
class ProxySettings:
    """What the proxy listens on and forwards to."""

    listen_host: str
    listen_port: int
    #: the SuperLink's loopback address, host:port ("127.0.0.1:9092", "[::1]:9092")
    upstream: str
    server_cert: Path
    server_key: Path
    ca_cert: Path
    #: a DNS name of the server certificate, checked on the upstream TLS connection
    upstream_name: str
    max_body_mb: int = DEFAULT_MAX_BODY_MB


def _listen(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _user_directive() -> str:
    """nginx's workers run as the invoking user: as root nginx would switch them to
    `nobody` unless told; otherwise the directive is ignored (and warned about)."""
    if os.geteuid() != 0:
        return ""
    user = pwd.getpwuid(os.geteuid()).pw_name
    group = grp.getgrgid(os.getegid()).gr_name
    return f"user {user} {group};\n"


def render_config(settings: ProxySettings, files: ProxyFiles) -> str:
    """The complete nginx.conf (no include of the system's /etc/nginx)."""
    s = settings
    temp = files.temp
    fleet = "".join(
        f"        location = {path} {{\n"
        "            limit_except POST { deny all; }\n"
        f"            proxy_pass https://superlink{path};\n"
        "        }\n"
        for path in FLEET_PATHS
    )
    return f"""# Written by `fedsqueeze server start` at every start (server/deploy/proxy.py).
daemon off;
master_process on;
worker_processes 1;
{_user_directive()}pid {files.nginx_pid};
error_log stderr notice;

events {{
    worker_connections 1024;
}}

http {{
    server_tokens off;
    log_format fleet '$remote_addr [$time_iso8601] "$request" $status '
                     '$request_length $body_bytes_sent $request_time';
    access_log {files.access_log} fleet;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;

    client_max_body_size {s.max_body_mb}m;
    client_body_buffer_size 1m;
    client_header_timeout 30s;
    client_body_timeout 60s;
    limit_req_zone $binary_remote_addr zone=fleet_rate:10m rate={RATE_PER_S}r/s;
    limit_req_status 429;
    limit_conn_zone $binary_remote_addr zone=fleet_conn:10m;
    limit_conn_status 429;

    upstream superlink {{
        server {s.upstream};
        keepalive 16;
    }}

    server {{
        listen {_listen(s.listen_host, s.listen_port)} ssl;
        ssl_certificate {s.server_cert};
        ssl_certificate_key {s.server_key};
        ssl_protocols TLSv1.2 TLSv1.3;

        limit_req zone=fleet_rate burst={BURST} nodelay;
        limit_conn fleet_conn {CONNECTIONS_PER_IP};

        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host localhost;
        proxy_ssl_trusted_certificate {s.ca_cert};
        proxy_ssl_verify on;
        proxy_ssl_name {s.upstream_name};
        proxy_ssl_server_name on;
        proxy_ssl_session_reuse on;
        proxy_read_timeout 120s;
        proxy_send_timeout 120s;

{fleet}
        location / {{
            return 404;
        }}
    }}
}}
"""


def nginx_command(nginx: str, files: ProxyFiles) -> list[str]:
    """``nginx -p PREFIX -c CONF -e stderr``: everything relative to our prefix, the
    start-up error log to stderr (our log file), never the compiled-in /var/log path."""
    return [nginx, "-p", f"{files.prefix}/", "-c", str(files.config), "-e", "stderr"]


def write_config(settings: ProxySettings, files: ProxyFiles) -> None:
    """Create the prefix (0700) and its temp folder, write nginx.conf (0600)."""
    from core.files import write_private

    files.prefix.mkdir(mode=0o700, parents=True, exist_ok=True)
    files.prefix.chmod(0o700)
    files.temp.mkdir(mode=0o700, exist_ok=True)
    write_private(files.config, render_config(settings, files).encode())


def proxy_ready(address: str, ca_cert: Path) -> bool:
    """True when the proxy answers HTTPS, verified by `ca_cert`, with its own 404 for a
    path outside the Fleet API (i.e. nginx, not something else, holds the port)."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    ctx = ssl.create_default_context(cafile=str(ca_cert))
    request = f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    try:
        with (
            socket.create_connection((host, int(port)), timeout=2) as raw,
            ctx.wrap_socket(raw, server_hostname=host) as tls,
        ):
            tls.sendall(request)
            head = tls.recv(64)
    except (OSError, ssl.SSLError):
        return False
    return head.startswith(b"HTTP/1.1 404")
