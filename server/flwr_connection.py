"""The SuperLink connection fedsqueeze gives the flwr CLI: ``FLWR_HOME/config.toml``.

The simulate command (its own local SuperLink, plain HTTP) and `fedsqueeze run` (the
server's SuperLink, TLS) both write one connection named ``fedsqueeze`` with an explicit
address and make it the default, so the flwr CLI never starts its own shared SuperLink
(port 39091) and never reads ``~/.flwr``.
"""

from __future__ import annotations

from pathlib import Path

#: the one SuperLink connection of FLWR_HOME/config.toml, named in every flwr CLI call
CONNECTION_NAME = "fedsqueeze"


def write_flower_config(flwr_home: Path, address: str, ca_cert: Path | None = None) -> Path:
    """FLWR_HOME/config.toml with the ``fedsqueeze`` connection to `address` (made default):
    TLS verified by `ca_cert`, or plain HTTP (``insecure = true``) when `ca_cert` is None."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    if ca_cert is not None:
        transport = f'root-certificates = "{ca_cert.resolve()}"\n'
    else:
        transport = "insecure = true\n"
    path = flwr_home / "config.toml"
    path.write_text(
        "[superlink]\n"
        f'default = "{CONNECTION_NAME}"\n\n'
        f"[superlink.{CONNECTION_NAME}]\n"
        f'address = "{address}"\n' + transport,
        encoding="utf-8",
    )
    return path
