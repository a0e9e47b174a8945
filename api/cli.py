"""`fedsqueeze db`, `fedsqueeze api` and `fedsqueeze stats` (registered in server/cli.py).

Heavy imports (SQLAlchemy, FastAPI, uvicorn, httpx) stay inside the commands.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Annotated, Any

import typer

from api.settings import DEFAULT_API_HOST, DEFAULT_API_PORT

DatabaseUrl = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        help="SQLAlchemy URL; default $DATABASE_URL, else sqlite:///$FEDSQUEEZE_HOME/fedsqueeze.db",
        show_default=False,
    ),
]
ApiUrl = Annotated[
    str | None,
    typer.Option(
        "--url",
        help="REST service URL; default $FEDSQUEEZE_API_URL, else http://127.0.0.1:8080",
        show_default=False,
    ),
]
ApiToken = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="FEDSQUEEZE_TOKEN",
        help="reader (or writer/admin) token, needed when the service is not on loopback "
        "and has no public reads (env FEDSQUEEZE_TOKEN)",
        show_default=False,
    ),
]
JsonOut = Annotated[bool, typer.Option("--json", help="print the raw JSON instead of a table")]

db_app = typer.Typer(
    help="Round-history database: migrations and maintenance.", no_args_is_help=True
)
api_app = typer.Typer(help="REST service: serve it, manage its tokens.", no_args_is_help=True)
token_app = typer.Typer(help="API tokens (only their SHA-256 is stored).", no_args_is_help=True)
stats_app = typer.Typer(help="Query the REST service and print tables.", no_args_is_help=True)
api_app.add_typer(token_app, name="token")


def _fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``error: MESSAGE`` as one line (passwords redacted); the Exit to raise."""
    from core.secrets import redact_text

    typer.secho(f"error: {' '.join(redact_text(message).split())}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def _bad(message: str) -> typer.Exit:
    """Bad input: one line, exit code 2."""
    return _fail(message, 2)


@contextlib.contextmanager
def _database_errors(database_url: str | None) -> Iterator[None]:
    """Turn every failure of a database command into one redacted line (exit 1; exit 2
    for an unknown revision): no traceback, whose locals would show the URL."""
    from alembic.util.exc import CommandError
    from sqlalchemy.exc import SQLAlchemyError

    from api.db import SchemaError
    from api.errors import StoreError
    from core.secrets import debug_traceback, redact_url

    try:
        yield
    except (typer.Exit, StoreError):
        raise
    except CommandError as exc:
        raise _bad(str(exc)) from None
    except (ValueError, SchemaError) as exc:
        raise _fail(str(exc)) from None
    except SQLAlchemyError as exc:
        typer.echo(debug_traceback(exc), err=True, nl=False)
        where = redact_url(database_url or os.environ.get("DATABASE_URL") or "the database")
        reason = getattr(exc, "orig", None) or exc
        raise _fail(f"cannot use {where}: {reason}") from None
    except Exception as exc:  # the last line of defence against a traceback with locals
        typer.echo(debug_traceback(exc), err=True, nl=False)
        raise _fail(f"{type(exc).__name__}: {exc}") from None


def _engine(database_url: str | None) -> Any:
    from api.db import make_engine

    with _database_errors(database_url):
        return make_engine(database_url)


def _store(database_url: str | None) -> Any:
    from api.store import open_store

    with _database_errors(database_url):
        return open_store(database_url)


# ---------------------------------------------------------------- db


@db_app.command("upgrade")
def db_upgrade(
    revision: Annotated[str, typer.Option(help="target revision")] = "head",
    database_url: DatabaseUrl = None,
) -> None:
    """Apply the schema migrations (creates the database on first use)."""
    from api.db import current_revision, upgrade

    engine = _engine(database_url)
    with _database_errors(database_url):
        before = current_revision(engine)
        upgrade(engine, revision)
        after = current_revision(engine)
    typer.echo(f"{engine.url.render_as_string(hide_password=True)}: {before or 'empty'} -> {after}")


@db_app.command("downgrade")
def db_downgrade(
    revision: Annotated[str, typer.Argument(help="target revision; 'base' drops every table")],
    yes: Annotated[
        bool, typer.Option("--yes", help="confirm: data in dropped tables is lost")
    ] = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Revert the schema migrations down to REVISION."""
    from api.db import current_revision, downgrade

    if not yes:
        raise _fail("downgrading can drop tables and their data; repeat with --yes to confirm")
    engine = _engine(database_url)
    with _database_errors(database_url):
        before = current_revision(engine)
        downgrade(engine, revision)
        after = current_revision(engine)
    typer.echo(f"{before} -> {after or 'base'}")


@db_app.command("current")
def db_current(database_url: DatabaseUrl = None) -> None:
    """Print the database's schema revision and the one this code expects."""
    from api.db import current_revision, head_revision

    engine = _engine(database_url)
    with _database_errors(database_url):
        current = current_revision(engine)
    typer.echo(
        f"{engine.url.render_as_string(hide_password=True)}: revision "
        f"{current or 'none (empty)'}, expected {head_revision()}"
    )


@db_app.command("mark-stale")
def db_mark_stale(
    stale_after: Annotated[
        float, typer.Option(help="seconds without activity after which a run is stale")
    ] = 24 * 3600.0,
    database_url: DatabaseUrl = None,
) -> None:
    """Mark running runs whose recorder is gone (or silent too long) as interrupted."""
    store = _store(database_url)
    with _database_errors(database_url):
        stale = store.mark_stale_runs(stale_after)
    typer.echo(f"marked {len(stale)} run(s) interrupted: {stale}" if stale else "no stale runs")


# ---------------------------------------------------------------- api


@api_app.command("serve")
def api_serve(
    host: Annotated[
        str,
        typer.Option(
            help="address to bind; on a non-loopback address reads need a reader token "
            "unless --public-reads"
        ),
    ] = DEFAULT_API_HOST,
    port: Annotated[int, typer.Option(help="port to bind, 1-65535")] = DEFAULT_API_PORT,
    database_url: DatabaseUrl = None,
    workers: Annotated[int, typer.Option(min=1, help="uvicorn worker processes")] = 1,
    cors_origin: Annotated[
        list[str] | None,
        typer.Option(help="allow this origin by CORS (repeatable); CORS is off without it"),
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
    public_reads: Annotated[
        bool,
        typer.Option(
            "--public-reads",
            help="serve reads without a token even on a non-loopback address "
            "(env FEDSQUEEZE_PUBLIC_READS=1)",
        ),
    ] = False,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(
            help="also serve requests whose Host header is this name (repeatable; "
            "'*.example.org' for subdomains; env FEDSQUEEZE_ALLOWED_HOSTS); loopback names "
            "and IP addresses are always served, other names get 400",
        ),
    ] = None,
) -> None:
    """Run the REST service under uvicorn (migrates an empty database first)."""
    import uvicorn

    from api.settings import resolve_database_url

    if not 1 <= port <= 65535:
        raise _bad(f"--port must be in 1..65535, got {port}")
    if not host.strip():
        raise _bad("--host must not be empty")
    try:
        os.environ["DATABASE_URL"] = resolve_database_url(database_url)
    except ValueError as exc:
        raise _bad(str(exc)) from None
    os.environ["FEDSQUEEZE_API_HOST"] = host
    if public_reads:
        os.environ["FEDSQUEEZE_PUBLIC_READS"] = "1"
    if allowed_host:
        extra = [h.strip() for h in allowed_host if h.strip()]
        os.environ["FEDSQUEEZE_ALLOWED_HOSTS"] = ",".join(
            [*filter(None, os.environ.get("FEDSQUEEZE_ALLOWED_HOSTS", "").split(",")), *extra]
        )
    if cors_origin:
        os.environ["FEDSQUEEZE_CORS_ORIGINS"] = ",".join(cors_origin)
    _store(None)  # migrate an empty database / report a bad one before binding the port
    from api.settings import Settings

    reads = "need a token" if Settings.from_env().reads_need_token else "are open"
    typer.echo(
        f"fedsqueeze REST service on http://{host}:{port} (docs at /docs); reads {reads}",
        err=True,
    )
    uvicorn.run(
        "api.app:create_app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
        ws="none",  # no websockets here
    )


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Option(help="what the token is for")],
    scope: Annotated[
        str | None,
        typer.Option(
            help="admin: manage clients, create runs, read; enrol: only enrol clients; "
            "writer (default): create runs and write to its own runs (or, with --run, to "
            "that run only); reader: read only",
            show_default=False,
        ),
    ] = None,
    run: Annotated[
        int | None,
        typer.Option("--run", help="bind a writer token to this run id", show_default=False),
    ] = None,
    admin: Annotated[bool, typer.Option("--admin", help="same as --scope admin")] = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Create a token and print it once (it cannot be shown again)."""
    from api.errors import InvalidError, NotFoundError
    from api.models import TOKEN_SCOPES

    chosen = scope or ("admin" if admin else "writer")
    if chosen not in TOKEN_SCOPES:
        raise _bad(f"--scope must be one of {', '.join(TOKEN_SCOPES)}, got {scope!r}")
    if admin and chosen != "admin":
        raise _bad(f"--admin contradicts --scope {scope}")
    if run is not None and chosen != "writer":
        raise _bad(f"--run binds writer tokens only, not {chosen} tokens")
    if run is not None and not 1 <= run <= (1 << 31) - 1:
        raise _bad(f"--run {run}: run not found")
    store = _store(database_url)
    try:
        with _database_errors(database_url):
            token_id, token = store.create_token(name, scope=chosen, run_id=run)
    except NotFoundError as exc:
        raise _bad(f"--run {run}: {exc}") from None
    except InvalidError as exc:
        raise _bad(str(exc)) from None
    what = f"{chosen} token" + (f" for run {run}" if run is not None else "")
    typer.echo(f"created {what} {token_id} ({name}); keep it safe:", err=True)
    typer.echo(token)


@token_app.command("list")
def token_list(database_url: DatabaseUrl = None) -> None:
    """List tokens (names, scopes and dates; the tokens themselves are not stored)."""
    from rich.console import Console
    from rich.table import Table

    store = _store(database_url)
    with _database_errors(database_url):
        tokens = store.list_tokens()
    table = Table("id", "name", "scope", "created", "revoked")
    for t in tokens:
        table.add_row(
            str(t.id), t.name, t.label, f"{t.created_at:%Y-%m-%d %H:%M}",
            f"{t.revoked_at:%Y-%m-%d %H:%M}" if t.revoked_at else "",
        )  # fmt: skip
    Console().print(table)


@token_app.command("revoke")
def token_revoke(
    token_id: Annotated[int, typer.Argument(help="id from `fedsqueeze api token list`")],
    database_url: DatabaseUrl = None,
) -> None:
    """Revoke a token: requests with it get 401 from now on."""
    from api.errors import NotFoundError

    store = _store(database_url)
    try:
        with _database_errors(database_url):
            store.revoke_token(token_id)
    except NotFoundError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"revoked token {token_id}")


# ---------------------------------------------------------------- stats


def _get(
    url: str | None, path: str, params: dict[str, Any] | None = None, token: str | None = None
) -> Any:
    import httpx

    from api.settings import default_api_url

    base = (url or default_api_url()).rstrip("/")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.get(base + path, params=params, headers=headers, timeout=30.0)
    except httpx.HTTPError as exc:
        raise _fail(
            f"cannot reach the REST service at {base} ({exc}); start it with "
            "`fedsqueeze api serve` or pass --url"
        ) from exc
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:500]
        if response.status_code == 401 and not token:
            message += " (pass --token or set FEDSQUEEZE_TOKEN)"
        raise _fail(f"{response.status_code} from {base}{path}: {message}")
    return response.json()


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return ""
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)


def _fmt(x: float | None, digits: int = 4) -> str:
    return "" if x is None else f"{x:.{digits}g}"


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2))


@stats_app.command("runs")
def stats_runs(
    url: ApiUrl = None,
    token: ApiToken = None,
    as_json: JsonOut = False,
    status: Annotated[str | None, typer.Option(help="running|finished|failed|interrupted")] = None,
    strategy: Annotated[str | None, typer.Option(help="only this strategy")] = None,
    limit: Annotated[int, typer.Option(min=1, help="at most this many runs")] = 50,
) -> None:
    """Runs with their summaries, newest first."""
    params: dict[str, Any] = {"limit": limit}
    if status:
        params["status"] = status
    if strategy:
        params["strategy"] = strategy
    page = _get(url, "/runs", params, token)
    if as_json:
        _print_json(page)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"runs ({len(page['items'])} of {page['total']})")
    for col in ("id", "strategy", "up / down", "task", "status", "rounds", "best acc",
                "bytes up", "bytes down", "ratio vs f32", "started"):  # fmt: skip
        table.add_column(col)
    for r in page["items"]:
        sm = r["summary"]
        table.add_row(
            str(r["id"]), r["strategy"], f"{r['uplink_compressor']} / {r['downlink_compressor']}",
            r["task"], r["status"], str(sm["rounds_done"]), _fmt(sm["best_eval_accuracy"]),
            _fmt_bytes(sm["uplink_bytes"]), _fmt_bytes(sm["downlink_bytes"]),
            _fmt(sm["total_compression_ratio"], 3), r["started_at"][:19].replace("T", " "),
        )  # fmt: skip
    Console().print(table)


@stats_app.command("rounds")
def stats_rounds(
    run_id: Annotated[int, typer.Argument(help="run id (see `fedsqueeze stats runs`)")],
    url: ApiUrl = None,
    token: ApiToken = None,
    as_json: JsonOut = False,
    from_round: Annotated[int | None, typer.Option("--from", help="first round")] = None,
    to_round: Annotated[int | None, typer.Option("--to", help="last round")] = None,
    limit: Annotated[int, typer.Option(min=1, help="at most this many rounds")] = 100,
) -> None:
    """A run's summary and its rounds."""
    params: dict[str, Any] = {"limit": limit}
    if from_round is not None:
        params["from_round"] = from_round
    if to_round is not None:
        params["to_round"] = to_round
    run = _get(url, f"/runs/{run_id}", token=token)
    page = _get(url, f"/runs/{run_id}/rounds", params, token)
    if as_json:
        _print_json({"run": run, "rounds": page})
        return
    from rich.console import Console
    from rich.table import Table

    sm = run["summary"]
    table = Table(
        title=f"run {run_id}: {run['strategy']} ({run['uplink_compressor']} / "
        f"{run['downlink_compressor']}) on {run['task']}, {run['status']}, "
        f"{sm['rounds_done']} rounds, best accuracy {_fmt(sm['best_eval_accuracy'])}"
    )
    for col in ("round", "sampled", "replied", "failed", "bytes up", "bytes down",
                "predicted up", "train loss", "eval loss", "eval acc"):  # fmt: skip
        table.add_column(col, justify="right")
    for r in page["items"]:
        table.add_row(
            str(r["round"]), str(r["sampled"]), str(r["replied"]), str(r["failed"]),
            _fmt_bytes(r["uplink_bytes"]), _fmt_bytes(r["downlink_bytes"]),
            _fmt_bytes(r["predicted_uplink_bytes"]), _fmt(r["train_loss"]),
            _fmt(r["eval_loss"]), _fmt(r["eval_accuracy"]),
        )  # fmt: skip
    Console().print(table)
    if page["next_offset"] is not None:
        typer.echo(f"{page['total'] - len(page['items'])} more rounds: use --from/--to/--limit")


@stats_app.command("clients")
def stats_clients(
    url: ApiUrl = None,
    token: ApiToken = None,
    as_json: JsonOut = False,
    status: Annotated[str | None, typer.Option(help="active|disabled")] = None,
    limit: Annotated[int, typer.Option(min=1, help="at most this many clients")] = 100,
) -> None:
    """Enrolled clients and their participation."""
    params: dict[str, Any] = {"limit": limit}
    if status:
        params["status"] = status
    page = _get(url, "/clients", params, token)
    if as_json:
        _print_json(page)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"clients ({len(page['items'])} of {page['total']})")
    for col in ("id", "name", "location", "node id", "status", "rounds", "ok", "failed",
                "bytes up", "bytes down", "last seen"):  # fmt: skip
        table.add_column(col)
    for c in page["items"]:
        p = c["participation"]
        table.add_row(
            str(c["id"]), c["name"], c["location"] or "", str(c["node_id"] or ""), c["status"],
            str(p["rounds"]), str(p["ok"]), str(p["failed"]), _fmt_bytes(p["uplink_bytes"]),
            _fmt_bytes(p["downlink_bytes"]),
            (c["last_seen_at"] or "")[:19].replace("T", " "),
        )  # fmt: skip
    Console().print(table)
