"""Keeping secrets in their file: credentials are removed from anything shown or stored.

A secret (a database password, an API token) lives in one file or environment variable.
Everything that leaves that place, a stored run configuration, a log line, a REST answer,
an error message, goes through `redact_url` / `redact_text` / `redact_mapping` first.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REDACTED = "***"

# scheme://user:password@host  — the password is everything between the first ':' after
# '//' and the last '@' before the host (passwords may hold '@' when not percent-encoded).
_URL_CREDENTIALS = re.compile(
    r"(?P<prefix>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*:)(?P<pw>[^\s]*)(?=@)"
)
# key=value pairs of libpq connection strings and similar: password=..., token=...
_KEYWORD_SECRET = re.compile(
    r"(?P<key>\b(?:password|passwd|pwd|token|secret)\s*[=:]\s*)(?P<value>'[^']*'|\"[^\"]*\"|[^\s,;&]+)",
    re.IGNORECASE,
)
# keys of a mapping whose values are secrets as a whole
SECRET_KEYS = frozenset({"database-url", "database_url", "password", "token", "secret"})


def url_has_password(url: str) -> bool:
    """True when a URL carries a password (``scheme://user:PW@host``)."""
    try:
        return urlsplit(url).password is not None
    except ValueError:
        return bool(_URL_CREDENTIALS.search(url))


def redact_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (user, host, path and query kept).

    >>> redact_url("postgresql://fl:s3cret@db:5432/x")
    'postgresql://fl:***@db:5432/x'
    """
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return redact_text(url)
        netloc = parts.netloc.rsplit("@", 1)[1]
        user = parts.username or ""
        rebuilt = urlunsplit(parts._replace(netloc=f"{user}:{REDACTED}@{netloc}"))
        return redact_text(rebuilt)
    except ValueError:
        return redact_text(url)


def redact_text(text: str) -> str:
    """Every URL password and every ``password=...``-style value in free text, redacted."""
    text = _URL_CREDENTIALS.sub(lambda m: m.group("prefix") + REDACTED, text)
    return _KEYWORD_SECRET.sub(lambda m: m.group("key") + REDACTED, text)


def redact_mapping(values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a (nested) configuration with secret values redacted.

    Values under a secret key (``database-url``, ``password``, ``token``) are redacted
    whole (a URL keeps everything but its password); every other string is passed through
    `redact_text`.
    """
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            out[key] = redact_mapping(value)
        elif isinstance(value, str):
            out[key] = _redact_secret(value) if key.lower() in SECRET_KEYS else redact_text(value)
        else:
            out[key] = value
    return out


def _redact_secret(value: str) -> str:
    """A value under a secret key: a URL keeps all but its password, anything else is
    replaced whole (a token or password has no part worth showing)."""
    if not value:
        return value
    if "://" in value:
        return redact_url(value)
    return REDACTED


DEBUG_ENV = "FEDSQUEEZE_DEBUG"


def debug_traceback(exc: BaseException) -> str:
    """The traceback of `exc`, redacted and without locals, when ``$FEDSQUEEZE_DEBUG`` asks
    for it (set and not ``0``); else ''. Commands print it above their one error line."""
    import os
    import traceback

    if os.environ.get(DEBUG_ENV, "") in ("", "0"):
        return ""
    return redact_text("".join(traceback.format_exception(exc)))
