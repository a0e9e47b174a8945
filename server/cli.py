"""The `fedsqueeze` command line: one typer app, one sub-app per area.

Each area owns its sub-app module and registers it here with one line; heavy imports
(torch, flwr, sqlalchemy) stay inside the command functions so that `--help` is fast.

Errors end in one line on stderr, never in a traceback: bad input (a click usage error,
or a command's own ``typer.Exit(2)``) exits 2; any exception a command lets escape is
caught by `main` and printed as ``error: <type>: <message>`` (exit 1), with every URL
password and ``password=...`` value redacted (`core.secrets.redact_text`). Typer's pretty
tracebacks, which print the local variables of every frame (database URLs included), are
off. ``FEDSQUEEZE_DEBUG=1`` adds the traceback, redacted and without locals.
"""

from __future__ import annotations

import sys

import typer

from core.secrets import debug_traceback, redact_text

app = typer.Typer(
    name="fedsqueeze",
    help="Federated learning with bidirectional communication compression on Flower.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _root() -> None:
    """Federated learning with bidirectional communication compression on Flower."""


@app.command()
def version() -> None:
    """Print the installed fedsqueeze version."""
    from importlib.metadata import version as _version

    typer.echo(_version("fedsqueeze"))


from server.deploy import cli as _deploy_cli  # noqa: E402  (deployment: server, client, run)

app.add_typer(_deploy_cli.server_app, name="server")
app.add_typer(_deploy_cli.client_app, name="client")
app.command("run")(_deploy_cli.run_command)


from api.cli import api_app, db_app, stats_app  # noqa: E402  (light: typer only)

app.add_typer(db_app, name="db")
app.add_typer(api_app, name="api")
app.add_typer(stats_app, name="stats")


from server.simulate import simulate as _simulate  # noqa: E402  (light: typer only)

app.command("simulate")(_simulate)


from server.plot import plot as _plot  # noqa: E402  (light: typer only)

app.command("plot")(_plot)


def error_line(exc: BaseException, limit: int = 500) -> str:
    """One redacted line for an unexpected error: ``<type>: <message>``.

    Multi-line messages are joined (SQLAlchemy's "Background on this error" link dropped)
    and cut at `limit` characters.
    """
    lines = [
        line.strip()
        for line in str(exc).splitlines()
        if line.strip() and not line.strip().startswith("(Background on this error")
    ]
    text = redact_text(" ".join(lines)) or "(no message)"
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}"


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the command; any error becomes one redacted line.

    Exit codes: 0 success, 1 a failure of the command, 2 bad input, 130 interrupted.
    """
    import click

    try:
        code = app(args=argv, prog_name="fedsqueeze", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:  # a bare group: its help
        exc.show()
        sys.exit(exc.exit_code)
    except click.UsageError as exc:  # bad input on the command line: one line, exit 2
        where = exc.ctx.command_path if exc.ctx is not None else "fedsqueeze"
        message = " ".join(redact_text(exc.format_message()).split())
        print(f"error: {message} (see `{where} --help`)", file=sys.stderr)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        print(f"error: {' '.join(redact_text(exc.format_message()).split())}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except click.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # the safety net: nothing escapes as a traceback with locals
        print(debug_traceback(exc), file=sys.stderr, end="")
        print(f"error: {error_line(exc)}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
