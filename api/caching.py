"""HTTP validators for the reads of one run: a strong ETag, Cache-Control, 304.

Everything a read of a run shows (its summary, pages of rounds, one round, the series)
is a function of the stored rows, which change only together with the run's
`api.store.RunVersion` (an appended round bumps rounds_done and updated_at; finishing,
resuming and a stale mark change the status). So the ETag is a digest of that version,
the request's path and query and the service's version, computed from one primary-key read
before the expensive part; the body is built only when the client's copy is stale.

- A ``finished`` run never changes again: ``Cache-Control: private, max-age=86400``
  (a browser reuses its copy for a day without asking).
- A running, failed or interrupted run may still change (rounds appended, resumed): its
  responses carry an ETag too, one that changes with every appended round, and
  ``Cache-Control: private, no-cache`` (always revalidate: a 304 costs one small read).

``private``: the responses may need a token, so no shared cache may keep them. The check
runs after the same authentication as a 200 (the route's dependencies), so a 304 tells
an unauthorised caller nothing.
"""

from __future__ import annotations

import hashlib

from starlette.requests import Request
from starlette.responses import Response

from api.store import RunVersion

FINISHED_MAX_AGE_S = 86_400


def run_etag(version: RunVersion, request: Request, service_version: str) -> str:
    """A strong ETag (quoted) for `request` on a run at `version`."""
    query = "&".join(f"{k}={v}" for k, v in sorted(request.query_params.multi_items()))
    parts = (
        service_version,
        request.url.path,
        query,
        version.status,
        str(version.rounds_done),
        str(version.last_round),
        version.updated_at.isoformat(),
        version.ended_at.isoformat() if version.ended_at else "",
    )
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()[:32]
    return f'"{digest}"'


def cache_headers(version: RunVersion, etag: str) -> dict[str, str]:
    """ETag, Cache-Control and Vary for a run's response."""
    cache_control = (
        f"private, max-age={FINISHED_MAX_AGE_S}"
        if version.status == "finished"
        else "private, no-cache"
    )
    return {"ETag": etag, "Cache-Control": cache_control, "Vary": "Authorization"}


def matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an If-None-Match header names `etag` (weak comparison, RFC 9110 13.1.2:
    ``W/`` prefixes ignored; ``*`` matches any current representation)."""
    if not if_none_match:
        return False
    for candidate in if_none_match.split(","):
        tag = candidate.strip()
        if tag == "*" or tag.removeprefix("W/") == etag:
            return True
    return False


def not_modified(headers: dict[str, str]) -> Response:
    """304 without a body, with the validators a 200 would carry."""
    return Response(status_code=304, headers=headers)
