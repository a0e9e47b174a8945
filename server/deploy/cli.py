"""Command groups `fedsqueeze server ...`, `fedsqueeze client ...` and `fedsqueeze run`.

Heavy imports stay inside the commands so that ``--help`` is fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NoReturn

import typer

from core.superexec import (
    DEFAULT_TASK_POLL_INTERVAL_S,
    MAX_TASK_POLL_INTERVAL_S,
    MIN_TASK_POLL_INTERVAL_S,
    TASK_POLL_INTERVAL_ENV,
    task_poll_env,
)

server_app = typer.Typer(
    help="Run the deployment server: Flower SuperLink (TLS, SuperNode authentication, on "
    "loopback), its Fleet proxy for devices (nginx) and the REST service.",
    no_args_is_help=True,
)
client_app = typer.Typer(
    help="Enrol edge devices and run their Flower SuperNodes.", no_args_is_help=True
)

DATA_DIR_HELP = "Server data directory (default: $FEDSQUEEZE_HOME/server)."


def _data_dir(value: Path | None) -> Path:
    from server.deploy.launcher import default_data_dir

    return (value or default_data_dir()).expanduser().resolve()


def _fail(message: str, code: int = 1) -> typer.Exit:
    """Print one redacted error line; the Exit to raise (1 failure, 2 bad input)."""
    from core.secrets import redact_text

    typer.secho(f"error: {redact_text(message)}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=code)


def _bad_input(message: str) -> typer.Exit:
    return _fail(message, code=2)


# ------------------------------------------------------------------------------- server


@server_app.command("start")
def server_start(
    data_dir: Path | None = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
    superlink_host: str | None = typer.Option(
        None,
        help="Loopback address the SuperLink binds to (default: 127.0.0.1). Devices on "
        "other hosts reach it only through the Fleet proxy (--fleet-host).",
    ),
    superlink_port: int | None = typer.Option(
        None, min=1, max=65535, help="SuperLink HTTPS port on loopback (default: 9092)."
    ),
    fleet_host: str | None = typer.Option(
        None,
        help="Address the Fleet proxy (nginx) listens on for devices, e.g. 0.0.0.0 "
        "(default: none: no proxy, devices on this host dial the SuperLink directly). "
        "Needs nginx (Debian package nginx).",
    ),
    fleet_port: int | None = typer.Option(
        None, min=1, max=65535, help="Fleet proxy HTTPS port (default: 9443)."
    ),
    fleet_max_body_mb: int | None = typer.Option(
        None,
        min=1,
        max=4096,
        help="Largest request the proxy accepts, MiB (default: 64; one Flower object, e.g. "
        "a round's payload of one client).",
    ),
    api_host: str | None = typer.Option(
        None, help="REST service bind address (default: 127.0.0.1)."
    ),
    api_port: int | None = typer.Option(
        None, min=1, max=65535, help="REST service port (default: 8080)."
    ),
    public_address: str | None = typer.Option(
        None,
        help="host:port devices dial, written into bundles (default: the proxy's address, "
        "else the SuperLink's).",
    ),
    server_name: list[str] = typer.Option(
        [], "--server-name", help="Extra DNS name or IP for the server certificate (repeat)."
    ),
    database_url: str | None = typer.Option(
        None, help="Store URL (default: $DATABASE_URL, else SQLite under $FEDSQUEEZE_HOME)."
    ),
    ca_cert: Path | None = typer.Option(
        None, help="Your own CA certificate (with --server-cert/--server-key)."
    ),
    server_cert: Path | None = typer.Option(None, help="Your own server certificate (PEM)."),
    server_key: Path | None = typer.Option(None, help="Your own server private key (PEM)."),
    timeout: float = typer.Option(60.0, help="Seconds to wait for each process to be ready."),
) -> None:
    """Start the SuperLink (loopback), the Fleet proxy and the REST service in the background.

    The first start makes the CA, the server certificate and the admin API token.

    Every argument is checked before anything is written; a bad one exits 2.
    """
    from server.deploy.launcher import BadServerConfig, start_server
    from server.deploy.processes import ForeignProcessError
    from server.deploy.proxy import ProxyUnavailable

    own = [ca_cert, server_cert, server_key]
    if any(own) and not all(own):
        raise _bad_input("--ca-cert, --server-cert and --server-key go together")
    overrides: dict[str, object] = {
        "superlink_host": superlink_host,
        "superlink_port": superlink_port,
        "fleet_host": fleet_host,
        "fleet_port": fleet_port,
        "fleet_max_body_mb": fleet_max_body_mb,
        "api_host": api_host,
        "api_port": api_port,
        "public_address": public_address,
        "server_names": list(server_name) or None,
        "database_url": database_url,
    }
    try:  # the SuperExec setting from the environment, refused before anything starts
        task_poll_env()
    except ValueError as exc:
        raise _bad_input(str(exc)) from None
    directory = _data_dir(data_dir)
    try:
        result = start_server(
            directory,
            overrides=overrides,
            tls_files=(ca_cert, server_cert, server_key) if all(own) else None,  # type: ignore[arg-type]
            timeout=timeout,
            echo=typer.echo,
        )
    except (BadServerConfig, ProxyUnavailable) as exc:
        raise _bad_input(str(exc)) from None
    except (OSError, ValueError, RuntimeError, TimeoutError, ForeignProcessError) as exc:
        raise _fail(str(exc)) from None
    for warning in result.warnings:
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)
    cfg = result.config
    if not result.started:
        typer.echo(f"already running (data dir {directory})")
    typer.echo(f"SuperLink      {cfg.superlink_address}  (loopback: Control API, runs, enrolment)")
    if cfg.proxied:
        typer.echo(
            f"Fleet proxy    {cfg.fleet_host}:{cfg.fleet_port}  (nginx, Fleet API only; "
            f"devices dial {cfg.device_address})"
        )
    else:
        typer.echo(f"               devices on this host dial {cfg.device_address} (no proxy)")
    typer.echo(f"REST service   {cfg.api_url}")
    typer.echo(f"CA certificate {result.paths.tls.ca_cert}")
    if result.admin_token is not None:
        typer.echo("")
        typer.secho(
            f"Admin API token (shown once; also kept, mode 0600, in {result.paths.admin_token}):",
            bold=True,
        )
        typer.echo(result.admin_token)


@server_app.command("stop")
def server_stop(
    data_dir: Path | None = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
) -> None:
    """Stop the REST service, the Fleet proxy and the SuperLink started from this data
    directory (by PID, only when the PID still runs the command line we started)."""
    from server.deploy.launcher import stop_server
    from server.deploy.processes import ForeignProcessError

    try:
        stopped = stop_server(_data_dir(data_dir))
    except ForeignProcessError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@server_app.command("status")
def server_status_cmd(
    data_dir: Path | None = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show whether the SuperLink, the Fleet proxy and the REST service run and answer."""
    from dataclasses import asdict

    from rich.console import Console
    from rich.table import Table

    from server.deploy.launcher import server_status

    try:
        rows = server_status(_data_dir(data_dir))
    except (FileNotFoundError, ValueError) as exc:
        raise _fail(str(exc)) from None
    if as_json:
        typer.echo(json.dumps([asdict(r) for r in rows], indent=2))
    else:
        table = Table(title="fedsqueeze server")
        for col in ("component", "running", "pid", "address", "answers", "log"):
            table.add_column(col)
        for r in rows:
            table.add_row(
                r.name,
                "yes" if r.running else ("foreign PID" if r.note else "no"),
                str(r.pid or "-"),
                r.address,
                "yes" if r.reachable else "no",
                r.log_file,
            )
        Console().print(table)
    if not all(r.running and r.reachable for r in rows):
        raise typer.Exit(code=3)


# ------------------------------------------------------------------------------- clients
def _rest(data_dir: Path | None, api_url: str | None, token: str | None) -> tuple[str, str]:
    from server.deploy.launcher import read_admin_token, require_config

    if api_url and token:
        return api_url, token
    try:
        paths, config = require_config(_data_dir(data_dir))
        return api_url or config.api_url, token or read_admin_token(paths)
    except (FileNotFoundError, ValueError) as exc:
        raise _fail(f"{exc} (or give --api-url and --token)") from None


@client_app.command("enroll")
def client_enroll(
    name: str = typer.Option(..., help="Unique name of the device."),
    location: str | None = typer.Option(None, help='Where it is, "<latitude>,<longitude>".'),
    partition_id: int | None = typer.Option(
        None, help="Its data partition (default: the number of clients already enrolled)."
    ),
    num_partitions: int = typer.Option(20, help="How many partitions the data is split into."),
    out: Path | None = typer.Option(
        None, help="Bundle path: a directory, or a file ending .tar.gz (default: ./NAME.bundle)."
    ),
    data_dir: Path | None = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
    api_url: str | None = typer.Option(None, help="REST service URL (default: from the data dir)."),
    token: str | None = typer.Option(
        None,
        envvar="FEDSQUEEZE_TOKEN",
        help="Admin token, or an enrolment-only token (scope 'enrol': it may only create "
        "clients, so give --partition-id with it). Env FEDSQUEEZE_TOKEN; default: the "
        "data dir's admin token.",
    ),
    superlink: str | None = typer.Option(
        None, help="SuperLink host:port for the bundle (default: the server's public address)."
    ),
    ca_cert: Path | None = typer.Option(
        None, help="CA certificate for the bundle (default: the data dir's)."
    ),
    force: bool = typer.Option(False, help="Overwrite an existing bundle."),
) -> None:
    """Make the device's key pair, register it, record the client, write its bundle.

    Run it on the device itself (with --api-url, --token, --superlink, --ca-cert and an
    enrolment-only token) to keep the private key there, or on the server host and copy
    the bundle. The bundle path is checked and the key written before the key is
    registered; if the bundle cannot be completed, the registration is rolled back.
    """
    from client.enroll import EnrollError, RestClients, check_name, enroll, prepare_destination
    from server.deploy.launcher import ServerPaths, load_config

    try:
        check_name(name)
    except ValueError as exc:
        raise _bad_input(str(exc)) from None
    if num_partitions < 1 or (partition_id is not None and not 0 <= partition_id < num_partitions):
        raise _bad_input(
            f"--partition-id must be in 0..{num_partitions - 1} and --num-partitions >= 1"
        )
    dest = (out or Path(f"{name}.bundle")).expanduser().resolve()
    try:  # refuse an unusable --out before anything is asked of the server
        probe = prepare_destination(dest, force=force)
        probe.rmdir()
    except (EnrollError, OSError) as exc:
        raise _bad_input(str(exc)) from None
    url, tok = _rest(data_dir, api_url, token)
    paths = ServerPaths(_data_dir(data_dir))
    config = load_config(paths) if paths.config.is_file() else None
    address = superlink or (config.device_address if config else None)
    ca_path = ca_cert or (paths.tls.ca_cert if config else None)
    if not address or ca_path is None or not ca_path.is_file():
        raise _fail("need the SuperLink address and CA certificate: pass --superlink and --ca-cert")
    try:
        if partition_id is None:
            with RestClients(url, tok) as api:
                try:
                    partition_id = len(api.list())
                except EnrollError as exc:
                    if exc.status_code not in (401, 403):
                        raise
                    raise EnrollError(
                        "this token may not list the enrolled clients (an enrolment-only "
                        "token?): pass --partition-id"
                    ) from None
        bundle, info = enroll(
            name=name,
            api_url=url,
            token=tok,
            superlink=address,
            ca_cert_pem=ca_path.read_bytes(),
            dest=dest,
            partition_id=partition_id,
            num_partitions=num_partitions,
            location=location,
            force=force,
        )
    except (EnrollError, OSError, ValueError) as exc:
        raise _fail(str(exc)) from None
    typer.echo(
        f"enrolled {info.name}: client {info.client_id}, Flower node {info.node_id}, "
        f"partition {info.partition_id}/{info.num_partitions}"
    )
    typer.echo(f"bundle: {bundle}  (holds the private key: copy it to the device only)")
    typer.echo(f"on the device: fedsqueeze client start --bundle {bundle.name}")


@client_app.command("start")
def client_start(
    bundle: Path = typer.Option(..., help="The enrolment bundle (directory or .tar.gz)."),
    device: str = typer.Option(
        "auto", help="Where the ClientApp trains: auto (cuda if present), cpu, cuda."
    ),
    data: Path | None = typer.Option(None, "--data", help="Local data directory for the task."),
    clientappio_port: int = typer.Option(
        9094,
        min=1,
        max=65535,
        help="Local port of the SuperNode's ClientApp API (one per SuperNode on a host).",
    ),
    superlink: str | None = typer.Option(None, help="Override the bundle's SuperLink host:port."),
    max_retries: int | None = typer.Option(
        None, help="Give up after this many failed connection attempts (default: never)."
    ),
    max_wait_time: float | None = typer.Option(
        None, help="Give up reconnecting after this many seconds (default: never)."
    ),
    rejoin_wait: float = typer.Option(
        75.0,
        help="When the SuperLink refuses the key, retry for this many seconds (a node "
        "restarted after a crash is refused until the SuperLink notices it went away, "
        "about 60 s); 0 = give up at once.",
    ),
    superexec_poll_interval: float = typer.Option(
        DEFAULT_TASK_POLL_INTERVAL_S,
        min=MIN_TASK_POLL_INTERVAL_S,
        max=MAX_TASK_POLL_INTERVAL_S,
        envvar=TASK_POLL_INTERVAL_ENV,
        help="Seconds between the SuperNode's SuperExec's polls for a message to start a "
        "ClientApp for (Flower's default is 1.0).",
    ),
    print_command: bool = typer.Option(
        False,
        help="Print the flower-supernode command instead of running it (checks the bundle, "
        "unpacks nothing).",
    ),
) -> None:
    """Start a Flower SuperNode with the bundle's key and CA (runs in the foreground)."""
    import shlex

    from client.enroll import open_bundle
    from client.supernode import run_supernode, supernode_command, supernode_env

    if superlink is not None:
        _host, sep, port_text = superlink.rpartition(":")
        if not sep or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise _bad_input(
                f"--superlink must be HOST:PORT with a port in 1..65535, got {superlink!r}"
            )
    try:
        # --print-command only shows: it checks the bundle and writes nothing
        opened = open_bundle(bundle.expanduser().resolve(), unpack=not print_command)
        cmd = supernode_command(
            opened,
            device=device,
            data_dir=data,
            clientappio_port=clientappio_port,
            superlink=superlink,
            max_retries=max_retries,
            max_wait_time=max_wait_time,
        )
    except (ValueError, FileNotFoundError, PermissionError) as exc:  # the bundle or an option
        raise _bad_input(str(exc)) from None
    except OSError as exc:
        raise _fail(str(exc)) from None
    if print_command:
        typer.echo(shlex.join(cmd))
        if not opened.root.is_dir():
            typer.echo(
                f"(the tarball is unpacked to {opened.root} by `fedsqueeze client start`; "
                "nothing was unpacked now)",
                err=True,
            )
        return
    typer.echo(
        f"starting SuperNode {opened.info.name} (node {opened.info.node_id}) -> "
        f"{superlink or opened.info.superlink}"
    )
    env = supernode_env(superexec_poll_interval=superexec_poll_interval)
    code = run_supernode(cmd, env, rejoin_wait=rejoin_wait)
    raise typer.Exit(code=code)


def _client_action(
    ref: str, action: str, data_dir: Path | None, api_url: str | None, token: str | None
) -> dict[str, Any]:
    from client.enroll import EnrollError, RestClients

    url, tok = _rest(data_dir, api_url, token)
    try:
        with RestClients(url, tok) as api:
            client = api.find(ref)
            if action == "disable":
                api.disable(int(client["id"]))
            else:
                api.remove(int(client["id"]))
    except EnrollError as exc:
        raise _fail(str(exc)) from None
    return client


@client_app.command("disable")
def client_disable(
    ref: str = typer.Argument(..., help="Client id, name or Flower node id."),
    data_dir: Path | None = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
    api_url: str | None = typer.Option(None, help="REST service URL."),
    token: str | None = typer.Option(None, envvar="FEDSQUEEZE_TOKEN", help="Admin token."),
) -> None:
    """Disable a client: its key is unregistered from the SuperLink, its record kept."""
    c = _client_action(ref, "disable", data_dir, api_url, token)
    typer.echo(f"disabled {c.get('name')} (node {c.get('node_id')})")


@client_app.command("remove")
def client_remove(
    ref: str = typer.Argument(..., help="Client id, name or Flower node id."),
    data_dir: Path | None = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
    api_url: str | None = typer.Option(None, help="REST service URL."),
    token: str | None = typer.Option(None, envvar="FEDSQUEEZE_TOKEN", help="Admin token."),
) -> None:
    """Remove a client: unregistered from the SuperLink, its enrolment deleted.

    Its round history stays.
    """
    c = _client_action(ref, "remove", data_dir, api_url, token)
    typer.echo(f"removed {c.get('name')} (node {c.get('node_id')})")


# ------------------------------------------------------------------------------- run
def run_command(
    strategy: str | None = typer.Option(
        None, help="Algorithm name (artemis, mcm, sgd, ...); required unless --resume."
    ),
    rounds: int | None = typer.Option(None, min=1, help="Rounds (run config num-server-rounds)."),
    task: str | None = typer.Option(None, help="Task (run config task)."),
    num_partitions: int | None = typer.Option(
        None,
        help="Data partitions (run config num-partitions): the --num-partitions the clients "
        "were enrolled with (default: the app's, -1 = each node's own).",
    ),
    min_nodes: int | None = typer.Option(
        None,
        min=1,
        help="Connected SuperNodes to wait for before round 1 (run config min-nodes).",
    ),
    run_config: list[str] = typer.Option(
        [],
        "--run-config",
        "-c",
        help="More run-config entries: \"key=value key2='text'\" (TOML values; repeatable).",
    ),
    app_dir: Path | None = typer.Option(
        None, "--app", help="Flower app directory (default: this repository)."
    ),
    data_dir: Path | None = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
    quiet: bool = typer.Option(False, help="Do not print the streamed logs."),
    resume: int | None = typer.Option(
        None,
        "--resume",
        metavar="RUN",
        help="Resume store run RUN after a crash of its ServerApp, from its last checkpoint "
        "(same run id; the run config is the stored run's).",
    ),
) -> None:
    """Submit the Flower app to the running SuperLink and stream its progress.

    The rounds are recorded in the server's store (the ServerApp finds its URL in the
    SuperLink's environment; ``database-url`` is no run-config key). Bad input (unknown
    keys, out-of-range values, a strategy or compressor spec the ServerApp would refuse,
    missing task data) exits 2 before anything is submitted. At the end the run's rounds
    are printed.
    """
    from server.app_dir import (
        SimulationError,
        check_overrides,
        check_run_config,
        parse_raw_overrides,
    )
    from server.deploy.launcher import require_config
    from server.deploy.runs import app_config_keys, default_app_dir, submit_run

    if resume is not None:
        given = {"--strategy": strategy, "--rounds": rounds, "--task": task,
                 "--num-partitions": num_partitions, "--min-nodes": min_nodes,
                 "--run-config": run_config or None}  # fmt: skip
        extra = [name for name, value in given.items() if value is not None]
        if extra:
            _usage(f"--resume takes the run config from the stored run; drop {', '.join(extra)}")
        values = _resume_values(resume, app_dir, data_dir)
        strategy = str(values.get("strategy", ""))
    elif strategy is None:
        _usage("--strategy is required (or --resume RUN)")
    friendly: dict[str, Any] = {
        "strategy": strategy,
        "num-server-rounds": rounds,
        "task": task,
        "num-partitions": num_partitions,
        "min-nodes": min_nodes,
    }
    try:
        defaults = app_config_keys((app_dir or default_app_dir()).resolve())
        if resume is None:
            values = {k: v for k, v in friendly.items() if v is not None}
            values.update(parse_raw_overrides(run_config))
        values = check_overrides(defaults, values)
        check_run_config({**defaults, **values}, 0, (app_dir or default_app_dir()).resolve())
    except (SimulationError, OSError, ValueError) as exc:
        raise _bad_input(str(exc)) from None
    try:
        paths, config = require_config(_data_dir(data_dir))
        outcome = submit_run(
            paths,
            config,
            values,
            app_dir=app_dir,
            on_line=(lambda _l: None) if quiet else typer.echo,
        )
    except (OSError, ValueError) as exc:
        raise _fail(str(exc)) from None
    if outcome.returncode != 0:
        raise _fail(f"flwr run exited with {outcome.returncode}")
    if outcome.flower_run_id is None:
        raise _fail("flwr run did not report a run id (see its output above)")
    _report_run(paths, config, outcome.flower_run_id)


def _usage(message: str) -> NoReturn:
    raise _bad_input(message)


def _resume_values(run_id: int, app_dir: Path | None, data_dir: Path | None) -> dict[str, Any]:
    """The stored run config of run `run_id` with ``resume-run`` set, or exit 2 with one line
    saying why the run cannot be resumed (no server, no such run, no checkpoint, ...)."""
    from server.checkpoints import ResumeError, stored_run_to_resume
    from server.deploy.launcher import require_config
    from server.deploy.runs import app_config_keys, default_app_dir

    try:
        _paths, config = require_config(_data_dir(data_dir))
        stored, _path = stored_run_to_resume(config.database_url or None, run_id)
        known = app_config_keys((app_dir or default_app_dir()).resolve())
    except (ResumeError, OSError, ValueError) as exc:
        _usage(str(exc))
    values = {k: v for k, v in stored.items() if k in known}
    values.pop("database-url", None)  # never a run-config key: the ServerApp's environment
    values.update({"resume-run": run_id, "test-server-exit": 0})
    return values


def _report_run(paths: Any, config: Any, flower_run_id: int) -> None:
    """How the run ended at the SuperLink, and its rounds as the store has them."""
    from rich.console import Console
    from rich.table import Table

    from server.deploy.runs import flower_run_status, store_rounds

    status = flower_run_status(config.superlink_address, paths.tls.ca_cert, flower_run_id)
    try:
        run, rounds = store_rounds(config.api_url, flower_run_id)
    except Exception as exc:  # the run may have failed before recording anything
        run, rounds = None, []
        typer.echo(f"(no rounds in the store: {exc})", err=True)
    if rounds:
        table = Table(title=f"run {run['id'] if run else '?'} (Flower run {flower_run_id})")
        for col in ("round", "replied/sampled", "uplink B", "downlink B", "train loss",
                    "eval acc", "s"):  # fmt: skip
            table.add_column(col, justify="right")
        for r in rounds:
            acc = r.get("eval_accuracy")
            loss = r.get("train_loss")
            table.add_row(
                str(r["round"]),
                f"{r['replied']}/{r['sampled']}",
                f"{r['uplink_bytes']:,}",
                f"{r['downlink_bytes']:,}",
                "-" if loss is None else f"{loss:.4g}",
                "-" if acc is None else f"{acc:.3f}",
                f"{sum(r.get('phase_seconds', {}).values()):.2f}",
            )
        Console().print(table)
    if not status.ok:
        raise _fail(
            f"Flower run {flower_run_id} ended {status.status}/{status.sub_status}: "
            f"{status.details or 'no details'}"
        )
    typer.echo(
        f"run finished (Flower run {flower_run_id}); its rounds are served at "
        f"{config.api_url}/runs/{run['id'] if run else ''}"
    )
