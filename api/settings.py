"""Where the round-history store lives and how the REST service behaves.

The database URL is resolved in this order: an explicit argument, the ``DATABASE_URL``
environment variable, else the embedded SQLite file
``sqlite:///$FEDSQUEEZE_HOME/fedsqueeze.db`` with ``FEDSQUEEZE_HOME`` defaulting to
``~/.fedsqueeze``. ``postgresql://`` URLs are rewritten to use psycopg 3.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from core.net import is_loopback
from core.paths import fedsqueeze_home
from core.secrets import redact_url

DEFAULT_API_HOST = "127.0.0.1"
DEFAULT_API_PORT = 8080
DEFAULT_MAX_PAGE_SIZE = 1000
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_STALE_AFTER_S = 24 * 3600.0
#: Host header names served by default (IP addresses are always served, see api.app)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def normalize_database_url(url: str) -> str:
    """Make ``postgresql://`` and ``postgres://`` URLs use the psycopg 3 driver."""
    url = url.strip()
    if not url:
        raise ValueError("database URL is empty")
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    if not (url.startswith("sqlite") or url.startswith("postgresql+")):
        raise ValueError(
            f"unsupported database URL {redact_url(url)!r}: use sqlite:///PATH or "
            "postgresql://USER@HOST/DB"
        )
    return url


def resolve_database_url(url: str | None = None) -> str:
    """Explicit URL, else ``DATABASE_URL``, else the SQLite file under FEDSQUEEZE_HOME."""
    if url:
        return normalize_database_url(url)
    env = os.environ.get("DATABASE_URL")
    if env:
        return normalize_database_url(env)
    return f"sqlite:///{fedsqueeze_home() / 'fedsqueeze.db'}"


def default_api_url() -> str:
    """``$FEDSQUEEZE_API_URL`` or ``http://127.0.0.1:8080``: where `fedsqueeze stats` asks."""
    return os.environ.get("FEDSQUEEZE_API_URL", f"http://{DEFAULT_API_HOST}:{DEFAULT_API_PORT}")


def _env_list(name: str) -> list[str]:
    raw = os.environ.get(name, "")
    return [item.strip() for item in raw.split(",") if item.strip()]


def env_flag(name: str) -> bool:
    """``1``/``true``/``yes``/``on`` (any case) is true, anything else false."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ValueError(f"{name}={raw!r} is not a number") from exc


@dataclass
class Settings:
    """Settings of the REST service; `from_env` reads them from the environment.

    - ``database_url``: see the module docstring.
    - ``cors_origins``: origins allowed by CORS (``FEDSQUEEZE_CORS_ORIGINS``, comma
      separated); empty (the default) turns CORS off.
    - ``max_page_size``: largest ``limit`` a list endpoint accepts.
    - ``max_body_bytes``: larger request bodies are refused with 413.
    - ``stale_after_s``: a ``running`` run without activity for this long is marked
      ``interrupted`` by the start-up check (``FEDSQUEEZE_STALE_AFTER_S``).
    - ``bind_host``: the address the service listens on (``FEDSQUEEZE_API_HOST``); on a
      non-loopback address reads need a reader (or writer/admin) token ...
    - ``public_reads``: ... unless this is set (``FEDSQUEEZE_PUBLIC_READS=1``, ``api serve
      --public-reads``).
    - ``allowed_hosts``: Host header names served besides the loopback names and IP
      addresses (``FEDSQUEEZE_ALLOWED_HOSTS``, comma separated; ``*.example.org`` allows
      its subdomains); other names get 400 (DNS rebinding).
    """

    database_url: str = field(default_factory=resolve_database_url)
    cors_origins: list[str] = field(default_factory=list)
    max_page_size: int = DEFAULT_MAX_PAGE_SIZE
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    stale_after_s: float = DEFAULT_STALE_AFTER_S
    bind_host: str = DEFAULT_API_HOST
    public_reads: bool = False
    allowed_hosts: list[str] = field(default_factory=lambda: list(LOOPBACK_NAMES))

    @property
    def reads_need_token(self) -> bool:
        return not self.public_reads and not is_loopback(self.bind_host)

    @classmethod
    def from_env(
        cls,
        database_url: str | None = None,
        *,
        bind_host: str | None = None,
        allowed_hosts: list[str] | None = None,
    ) -> Settings:
        """Settings from the environment; `bind_host` and `allowed_hosts` (added to the
        loopback names and ``FEDSQUEEZE_ALLOWED_HOSTS``) override it."""
        return cls(
            database_url=resolve_database_url(database_url),
            cors_origins=_env_list("FEDSQUEEZE_CORS_ORIGINS"),
            max_page_size=int(env_float("FEDSQUEEZE_MAX_PAGE_SIZE", DEFAULT_MAX_PAGE_SIZE)),
            max_body_bytes=int(env_float("FEDSQUEEZE_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES)),
            stale_after_s=env_float("FEDSQUEEZE_STALE_AFTER_S", DEFAULT_STALE_AFTER_S),
            bind_host=bind_host or os.environ.get("FEDSQUEEZE_API_HOST") or DEFAULT_API_HOST,
            public_reads=env_flag("FEDSQUEEZE_PUBLIC_READS"),
            allowed_hosts=[
                *LOOPBACK_NAMES,
                *_env_list("FEDSQUEEZE_ALLOWED_HOSTS"),
                *(allowed_hosts or []),
            ],
        )
