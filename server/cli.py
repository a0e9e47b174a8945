"""The `fedsqueeze` command line: one typer app, one sub-app per area.

Each area owns its sub-app module and registers it here with one line; heavy imports
(torch, flwr, sqlalchemy) stay inside the command functions so that `--help` is fast.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="fedsqueeze",
    help="Federated learning with bidirectional communication compression on Flower.",
    no_args_is_help=True,
    add_completion=False,
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


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
