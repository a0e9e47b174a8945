"""The REST service process that `fedsqueeze server start` runs in the background.

``python -m server.deploy.service --data-dir DIR`` reads DIR/server.json, builds the REST
app (``api.app.create_app``) with a `SuperLinkRegistrar` for the SuperLink of the same
data directory, and serves it with uvicorn on the configured address.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from server.deploy.launcher import require_config
from server.deploy.registrar import SuperLinkRegistrar


def build_app(data_dir: Path) -> tuple[Any, str, int]:
    from api.app import create_app
    from api.settings import Settings

    paths, config = require_config(data_dir)
    # reads need a token when the API is bound off loopback; the certificate's names are
    # the names devices use, so they are allowed Host headers too
    settings = Settings.from_env(
        config.database_url, bind_host=config.api_host, allowed_hosts=config.server_names
    )
    registrar = SuperLinkRegistrar(config.superlink_address, paths.tls.ca_cert)
    return create_app(settings, registrar), config.api_host, config.api_port


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    app, host, port = build_app(args.data_dir)
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=True)


if __name__ == "__main__":
    main()
