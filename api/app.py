"""The REST service: round history (reads) and runs / clients (writes, scoped tokens).

`create_app(settings, registrar)` builds the FastAPI application; `fedsqueeze api serve`
runs it under uvicorn. Who may do what (`api.models.ApiToken`):

- reads (GET): anyone when the service listens on loopback only or was started with
  ``--public-reads``; otherwise a ``reader``, ``writer`` or ``admin`` token;
- ``POST /runs``: an ``admin`` or unbound ``writer`` token, which becomes the run's owner;
- ``POST /runs/{id}/rounds`` and ``/finish``: the run's owner token or a ``writer`` token
  bound to that run; nothing else (runs the ServerApp records in-process have no owner);
- ``POST /clients``: ``admin`` or ``enrol``; disabling, enabling, removing: ``admin``.

``GET /`` serves the dashboard, a static page of this package (`api.dashboard`) that reads
these endpoints with the same permissions.

Requests whose Host header is neither an allowed name (loopback names by default) nor
an IP address are refused with 400 (DNS rebinding). Errors always have the body
``{"error": {"code", "message", "details"}}``: 400 for a bad Host header or body, 401
(with ``WWW-Authenticate: Bearer``) without or with an unknown token, 403 for a token
whose scope does not allow the request, 404 for unknown ids, 409 for conflicts, 413 for
too large bodies, 422 for bad parameters or bodies (`api.validation`).
"""

import ipaddress
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _pkg_version
from itertools import accumulate
from typing import Annotated, Any, Protocol

from fastapi import Depends, FastAPI, Path, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from pydantic_core import to_json
from sqlalchemy import text
from starlette.exceptions import HTTPException as StarletteHTTPException

from api import schemas as s
from api.caching import cache_headers, matches, not_modified, run_etag
from api.dashboard import mount_dashboard
from api.db import current_revision, ensure_schema, get_engine, head_revision
from api.errors import InvalidError, NotFoundError, StoreError
from api.models import ApiToken, Client, Run
from api.settings import Settings
from api.store import MAX_COMPARE_RUNS, Page, Participation, Store
from api.validation import check_text
from core.records import ClientRoundRecord, RoundRecord, RunInfo

log = logging.getLogger("fedsqueeze.api")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class Registrar(Protocol):
    """Registers enrolled clients' public keys with the SuperLink (node authentication)."""

    def register(self, public_key_pem: str) -> int:
        """Register the key; return the Flower node id the SuperLink assigned."""
        ...

    def unregister(self, node_id: int) -> None:
        """Remove the node from the SuperLink: its key is refused from now on."""
        ...


class ApiError(Exception):
    def __init__(
        self, status_code: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status_code, self.code, self.message = status_code, code, message
        self.headers = headers


#: sent with every 401 (RFC 6750)
BEARER_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="fedsqueeze"'}


_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    500: "internal_error",
    502: "bad_gateway",
    503: "unavailable",
}

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": s.ErrorBody, "description": "Host header not allowed"},
    401: {"model": s.ErrorBody, "description": "reads need a token here, none or unknown given"},
    403: {"model": s.ErrorBody, "description": "the token's scope does not allow reading"},
    **{
        code: {"model": s.ErrorBody, "description": name.replace("_", " ")}
        for code, name in _STATUS_CODES.items()
        if code in (404, 422)
    },
}
AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": s.ErrorBody, "description": "body not decodable, or Host not allowed"},
    401: {"model": s.ErrorBody, "description": "missing or unknown token"},
    403: {"model": s.ErrorBody, "description": "the token's scope does not allow this"},
    409: {"model": s.ErrorBody, "description": "conflict with stored state"},
    413: {"model": s.ErrorBody, "description": "request body too large"},
    **ERROR_RESPONSES,
}


def error_response(
    status_code: int,
    message: str,
    code: str | None = None,
    details: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = s.ErrorBody(
        error=s.ErrorInfo(
            code=code or _STATUS_CODES.get(status_code, "error"),
            message=_printable(message),
            details=_printable(details),
        )
    )
    return JSONResponse(body.model_dump(mode="json"), status_code=status_code, headers=headers)


def _printable(value: Any) -> Any:
    """`value` with every text made encodable: an error may quote a refused input, which
    can hold a lone surrogate (shown as ``\\ud800``)."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, list | tuple):
        return [_printable(v) for v in value]
    if isinstance(value, dict):
        return {_printable(k): _printable(v) for k, v in value.items()}
    return value


class BodySizeLimit:
    """Refuse request bodies larger than `max_bytes` with 413 (checked while reading)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        too_large = error_response(
            413, f"request body larger than {self.max_bytes} bytes", headers={"Connection": "close"}
        )
        if declared is not None:
            try:
                if int(declared) > self.max_bytes:
                    await too_large(scope, receive, send)
                    return
            except ValueError:
                await error_response(400, "invalid Content-Length")(scope, receive, send)
                return
        if scope.get("method") in ("GET", "HEAD", "DELETE", "OPTIONS") and declared is None:
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await too_large(scope, receive, send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _host_name(host_header: str) -> str:
    """The name of a Host header without its port (``[::1]:80`` -> ``::1``)."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def host_allowed(host_header: str, allowed: list[str]) -> bool:
    """Whether a request's Host may be served: an IP address (a browser that sends one
    dialled that address itself, so DNS rebinding cannot forge it), a name in `allowed`,
    or a subdomain of a ``*.example.org`` entry."""
    name = _host_name(host_header)
    if not name:
        return False
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    for pattern in allowed:
        pattern = pattern.lower()
        if name == pattern or (pattern.startswith("*.") and name.endswith(pattern[1:])):
            return True
    return False


class HostCheck:
    """Refuse requests whose Host header `host_allowed` rejects with 400 (no DNS rebinding:
    a page of evil.example resolved to 127.0.0.1 cannot read or write this service)."""

    def __init__(self, app: Any, allowed: list[str]) -> None:
        self.app, self.allowed = app, list(allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            host = headers.get(b"host", b"").decode("latin-1")
            if not host_allowed(host, self.allowed):
                await error_response(
                    400, "Host header not allowed (see --allowed-host)", code="bad_host"
                )(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _run_out(run: Run) -> s.RunOut:
    d = run.num_parameters
    up32 = 4 * d * run.replied_total if d else None
    down32 = 4 * d * run.sampled_total if d else None

    def ratio(base: int | None, measured: int) -> float | None:
        return base / measured if base is not None and measured > 0 else None

    summary = s.RunSummary(
        rounds_done=run.rounds_done,
        last_round=run.last_round,
        sampled=run.sampled_total,
        replied=run.replied_total,
        failed=run.failed_total,
        uplink_bytes=run.uplink_bytes_total,
        downlink_bytes=run.downlink_bytes_total,
        predicted_uplink_bytes=run.predicted_uplink_bytes_total,
        predicted_downlink_bytes=run.predicted_downlink_bytes_total,
        best_eval_accuracy=run.best_eval_accuracy,
        best_eval_round=run.best_eval_round,
        float32_uplink_bytes=up32,
        float32_downlink_bytes=down32,
        uplink_compression_ratio=ratio(up32, run.uplink_bytes_total),
        downlink_compression_ratio=ratio(down32, run.downlink_bytes_total),
        total_compression_ratio=ratio(
            None if up32 is None or down32 is None else up32 + down32,
            run.uplink_bytes_total + run.downlink_bytes_total,
        ),
    )
    return s.RunOut(
        id=run.id,
        flower_run_id=run.flower_run_id,
        strategy=run.strategy,
        uplink_compressor=run.uplink_compressor,
        downlink_compressor=run.downlink_compressor,
        task=run.task,
        config=run.config,
        num_parameters=run.num_parameters,
        status=run.status,  # type: ignore[arg-type]
        started_at=run.started_at,
        ended_at=run.ended_at,
        updated_at=run.updated_at,
        summary=summary,
    )


def _json(model: BaseModel, status_code: int = 200) -> Response:
    """Serialize a response model once, in pydantic-core (FastAPI would validate a
    returned model again against `response_model`, which stays for the OpenAPI schema)."""
    return Response(model.model_dump_json(), status_code=status_code, media_type="application/json")


def _round_fields(rnd: Any) -> dict[str, Any]:
    """The RoundOut fields of a `Round` object or a row of the rounds table."""
    return {
        "run_id": rnd.run_id,
        "round": rnd.round,
        "sampled": rnd.sampled,
        "replied": rnd.replied,
        "failed": rnd.failed,
        "uplink_bytes": rnd.uplink_bytes,
        "downlink_bytes": rnd.downlink_bytes,
        "predicted_uplink_bytes": rnd.predicted_uplink_bytes,
        "predicted_downlink_bytes": rnd.predicted_downlink_bytes,
        "train_loss": rnd.train_loss,
        "eval_loss": rnd.eval_loss,
        "eval_accuracy": rnd.eval_accuracy,
        "phase_seconds": rnd.phase_seconds,
        "started_at": rnd.started_at,
        "ended_at": rnd.ended_at,
        "extra": rnd.extra,
    }


def _client_out(client: Client, part: Participation | None) -> s.ClientOut:
    p = part or Participation()
    return s.ClientOut(
        id=client.id,
        name=client.name,
        location=client.location,
        node_id=client.node_id,
        status=client.status,  # type: ignore[arg-type]
        enrolled_at=client.enrolled_at,
        last_seen_at=client.last_seen_at,
        public_key_pem=client.public_key_pem,
        participation=s.Participation(
            rounds=p.rounds,
            ok=p.ok,
            failed=p.failed,
            uplink_bytes=p.uplink_bytes,
            downlink_bytes=p.downlink_bytes,
            num_examples=p.num_examples,
            last_round_at=p.last_round_at,
        ),
    )


#: ClientOut's and Participation's fields in their order: the keys of a client's JSON
CLIENT_FIELDS = tuple(name for name in s.ClientOut.model_fields if name != "participation")
PARTICIPATION_FIELDS = tuple(s.Participation.model_fields)
NO_PARTICIPATION = vars(Participation())


def _client_json_fields(row: Any, part: Participation | None) -> dict[str, Any]:
    """A row of the clients table and its node's participation as ClientOut's fields,
    ready for `to_json` without a model (the columns have the model's types)."""
    m = row._mapping
    out = {k: m[k] for k in CLIENT_FIELDS}
    p = NO_PARTICIPATION if part is None else vars(part)
    out["participation"] = {k: p[k] for k in PARTICIPATION_FIELDS}
    return out


def _series(run_id: int, rows: list[tuple[Any, ...]]) -> s.Series:
    return s.Series(**_series_fields(run_id, rows))


def _series_fields(run_id: int, rows: list[tuple[Any, ...]]) -> dict[str, Any]:
    """The Series fields, in the model's order, of `Store.series` rows."""
    return {
        "run_id": run_id,
        "rounds": [r[0] for r in rows],
        "train_loss": [r[1] for r in rows],
        "eval_loss": [r[2] for r in rows],
        "eval_accuracy": [r[3] for r in rows],
        "uplink_bytes_cumulative": list(accumulate(r[4] for r in rows)),
        "downlink_bytes_cumulative": list(accumulate(r[5] for r in rows)),
        "ended_at": [r[6] for r in rows],
    }


#: RoundOut's fields in its order: the keys of a round in a page's JSON
ROUND_FIELDS = tuple(s.RoundOut.model_fields)


def _round_json_fields(row: Any) -> dict[str, Any]:
    """A row of the rounds table as RoundOut's fields, ready for `to_json` without a
    model: the columns already have the model's types (ints, floats or None, UTC
    datetimes, JSON objects) but for phase times, which the model makes floats."""
    m = row._mapping
    out = {k: m[k] for k in ROUND_FIELDS}
    out["phase_seconds"] = {k: float(v) for k, v in out["phase_seconds"].items()}
    return out


def _page_meta(page: Page) -> dict[str, Any]:
    nxt = page.offset + len(page.items)
    return {
        "total": page.total,
        "limit": page.limit,
        "offset": page.offset,
        "next_offset": nxt if nxt < page.total else None,
    }


def _validate_public_key(pem: str) -> None:
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        load_pem_public_key(pem.encode("utf-8"))
    except (ValueError, TypeError, UnicodeEncodeError) as exc:
        raise InvalidError(f"public_key_pem is not a PEM public key: {exc}") from exc


def _package_version() -> str:
    try:
        return _pkg_version("fedsqueeze")
    except PackageNotFoundError:
        return "0+unknown"


def create_app(settings: Settings | None = None, registrar: Registrar | None = None) -> FastAPI:
    """The FastAPI application on `settings.database_url` (migrated if empty)."""
    settings = settings or Settings.from_env()
    engine = get_engine(settings.database_url)
    ensure_schema(engine)
    store = Store(engine)
    expected_revision = head_revision()
    max_page = settings.max_page_size

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> Any:
        stale = store.mark_stale_runs(settings.stale_after_s)
        if stale:
            log.warning("marked stale runs %s as interrupted", stale)
        yield

    reads_need_token = settings.reads_need_token
    app = FastAPI(
        title="fedsqueeze round history",
        version=_package_version(),
        description=(
            "Runs, rounds and clients of fedsqueeze federated runs. Writes need "
            "`Authorization: Bearer <token>` (tokens from `fedsqueeze api token create "
            "--scope admin|enrol|writer|reader`); reads need a reader, writer or admin "
            "token unless the service listens on loopback only or serves public reads. "
            "A writer writes only to the runs it created or is bound to; enrol tokens "
            "only enrol clients; disabling and removing clients needs an admin token."
        ),
        lifespan=lifespan,
    )
    app.state.store = store
    app.state.settings = settings
    app.state.registrar = registrar

    # ------------------------------------------------------------ errors
    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_r: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(
            exc.status_code, str(exc.detail), headers=dict(exc.headers) if exc.headers else None
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_r: Request, exc: RequestValidationError) -> JSONResponse:
        details = jsonable_encoder(
            [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        )
        first = details[0] if details else {}
        where = ".".join(str(p) for p in first.get("loc", []))
        return error_response(422, f"{where}: {first.get('msg', 'invalid')}", details=details)

    @app.exception_handler(StoreError)
    async def _store_error(_r: Request, exc: StoreError) -> JSONResponse:
        return error_response(exc.status_code, str(exc), code=exc.code)

    @app.exception_handler(ApiError)
    async def _api_error(_r: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status_code, exc.message, code=exc.code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal_error(_r: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(500, "internal error (see the service log)")

    # ------------------------------------------------------------ auth
    bearer = HTTPBearer(auto_error=False, description="token from `fedsqueeze api token create`")

    def _verified(credentials: HTTPAuthorizationCredentials) -> ApiToken:
        token = store.verify_token(credentials.credentials)
        if token is None:
            raise ApiError(401, "unauthorized", "unknown or revoked token", BEARER_CHALLENGE)
        return token

    def any_token(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> ApiToken:
        if credentials is None:
            raise ApiError(
                401, "unauthorized", "this endpoint needs a bearer token", BEARER_CHALLENGE
            )
        return _verified(credentials)

    def scoped(*scopes: str, unbound: bool = False) -> Any:
        """A dependency: a token of one of `scopes` (and not bound to a run if `unbound`)."""

        def check(token: Annotated[ApiToken, Depends(any_token)]) -> ApiToken:
            if token.scope not in scopes or (unbound and token.run_id is not None):
                need = " or ".join(scopes)
                raise ApiError(403, "forbidden", f"this endpoint needs a {need} token")
            return token

        return Depends(check)

    def reader(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        """Reads: open on a loopback bind or with public reads, else reader/writer/admin.
        A token that is given must be valid either way."""
        if credentials is None:
            if reads_need_token:
                raise ApiError(
                    401, "unauthorized", "reads need a reader token here", BEARER_CHALLENGE
                )
            return
        token = _verified(credentials)
        if reads_need_token and token.scope not in ("reader", "writer", "admin"):
            raise ApiError(403, "forbidden", f"a {token.scope} token may not read")

    Writer = Annotated[ApiToken, scoped("writer", "admin")]
    RunCreator = Annotated[ApiToken, scoped("writer", "admin", unbound=True)]
    Enroller = Annotated[ApiToken, scoped("enrol", "admin")]
    Admin = Annotated[ApiToken, scoped("admin")]
    Reads = [Depends(reader)]
    RunId = Annotated[int, Path(ge=1, le=s.INT32_MAX, description="run id in the store")]
    ClientId = Annotated[int, Path(ge=1, le=s.INT32_MAX)]
    Limit = Annotated[int, Query(ge=1, le=max_page, description=f"page size, at most {max_page}")]
    Offset = Annotated[int, Query(ge=0, le=1_000_000_000)]

    def run_read(run_id: int, request: Request, body: Callable[[], bytes | str]) -> Response:
        """A read of one run with its validators (`api.caching`), after the route's
        authentication: 304 without a body when If-None-Match names the current ETag,
        else `body()` (404 for an unknown run either way). A run that changed while the
        body was built gets no ETag (the body may be newer than the version read first)."""
        version = store.run_version(run_id)
        etag = run_etag(version, request, app.version)
        headers = cache_headers(version, etag)
        if matches(request.headers.get("if-none-match"), etag):
            return not_modified(headers)
        content = body()
        if version.status != "finished" and store.run_version(run_id) != version:
            headers = {"Cache-Control": "private, no-cache"}
        return Response(content, media_type="application/json", headers=headers)

    # ------------------------------------------------------------ health
    @app.get("/health", response_model=s.Health, tags=["health"])
    def health() -> s.Health:
        """Liveness: the process answers."""
        return s.Health(version=app.version)

    @app.get(
        "/ready",
        response_model=s.Ready,
        tags=["health"],
        responses={503: {"model": s.Ready, "description": "database unreachable or stale"}},
    )
    def ready(response: Response) -> s.Ready:
        """Readiness: the database answers and its schema is at this code's revision."""
        revision: str | None = None
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            revision = current_revision(engine)
            ok = revision == expected_revision
        except Exception:
            log.exception("readiness check failed")
            ok = False
        if not ok:
            response.status_code = 503
        return s.Ready(
            status="ready" if ok else "unavailable",
            database=engine.dialect.name,
            revision=revision,
            expected_revision=expected_revision,
        )

    # ------------------------------------------------------------ runs: read
    @app.get(
        "/runs",
        response_model=s.Page[s.RunOut],
        tags=["runs"],
        responses=ERROR_RESPONSES,
        dependencies=Reads,
    )
    def list_runs(
        status: Annotated[s.RunStatus | None, Query()] = None,
        strategy: Annotated[str | None, Query(max_length=64)] = None,
        sort: Annotated[s.RunSort, Query()] = "id",
        order: Annotated[s.SortOrder, Query()] = "desc",
        limit: Limit = 50,
        offset: Offset = 0,
    ) -> Response:
        """Runs with their summaries, filtered by status and strategy, newest first."""
        if strategy is not None:
            check_text(strategy, "strategy")
        page = store.list_runs(
            status=status, strategy=strategy, sort=sort, order=order, limit=limit, offset=offset
        )
        return _json(s.Page[s.RunOut](items=[_run_out(r) for r in page.items], **_page_meta(page)))

    @app.get(
        "/runs/{run_id}",
        response_model=s.RunOut,
        tags=["runs"],
        responses=ERROR_RESPONSES,
        dependencies=Reads,
    )
    def get_run(run_id: RunId, request: Request) -> Response:
        """One run with its summary: rounds done, best accuracy, bytes, compression ratios.
        With an ETag; `If-None-Match` answers 304 while the run is unchanged."""
        return run_read(run_id, request, lambda: _run_out(store.get_run(run_id)).model_dump_json())

    @app.get(
        "/runs/{run_id}/rounds",
        response_model=s.Page[s.RoundOut],
        tags=["rounds"],
        responses=ERROR_RESPONSES,
        dependencies=Reads,
    )
    def list_rounds(
        run_id: RunId,
        request: Request,
        from_round: Annotated[int | None, Query(ge=0, le=s.INT32_MAX)] = None,
        to_round: Annotated[int | None, Query(ge=0, le=s.INT32_MAX)] = None,
        limit: Limit = 100,
        offset: Offset = 0,
    ) -> Response:
        """A run's rounds in order, optionally within [from_round, to_round]. With an
        ETag; `If-None-Match` answers 304 while the run is unchanged."""
        if from_round is not None and to_round is not None and from_round > to_round:
            raise InvalidError("from_round must not exceed to_round")

        def body() -> bytes:
            page = store.list_rounds(
                run_id, from_round=from_round, to_round=to_round, limit=limit, offset=offset
            )
            # rows straight to JSON: the same bytes as Page[RoundOut] without a model per row
            items = [_round_json_fields(r) for r in page.items]
            return to_json({"items": items, **_page_meta(page)})

        return run_read(run_id, request, body)

    @app.get(
        "/runs/{run_id}/rounds/{round_number}",
        response_model=s.RoundDetail,
        tags=["rounds"],
        responses=ERROR_RESPONSES,
        dependencies=Reads,
    )
    def get_round(
        run_id: RunId, round_number: Annotated[int, Path(ge=0, le=s.INT32_MAX)], request: Request
    ) -> Response:
        """One round with every client's part in it. With an ETag; `If-None-Match`
        answers 304 while the run is unchanged."""
        return run_read(run_id, request, lambda: round_detail(run_id, round_number))

    def round_detail(run_id: int, round_number: int) -> str:
        rnd, clients = store.get_round(run_id, round_number)
        detail = s.RoundDetail(
            **_round_fields(rnd),
            clients=[
                s.ClientRoundOut(
                    node_id=c.node_id,
                    outcome=c.outcome,  # type: ignore[arg-type]
                    uplink_bytes=c.uplink_bytes,
                    downlink_bytes=c.downlink_bytes,
                    num_examples=c.num_examples,
                    local_loss=c.local_loss,
                    duration_s=c.duration_s,
                    error=c.error,
                )
                for c in clients
            ],
        )
        return detail.model_dump_json()

    @app.get(
        "/runs/{run_id}/series",
        response_model=s.Series,
        tags=["runs"],
        responses=ERROR_RESPONSES,
        dependencies=Reads,
    )
    def get_series(run_id: RunId, request: Request) -> Response:
        """Curves for plotting: losses, accuracy and cumulative bytes per round. With an
        ETag; `If-None-Match` answers 304 while the run is unchanged."""
        # lists straight to JSON: the same bytes as Series without validating each item
        return run_read(
            run_id, request, lambda: to_json(_series_fields(run_id, store.series([run_id])[run_id]))
        )

    @app.get(
        "/compare",
        response_model=s.Comparison,
        tags=["runs"],
        responses=ERROR_RESPONSES,
        dependencies=Reads,
    )
    def compare(
        run_id: Annotated[
            list[Annotated[int, Field(ge=1, le=s.INT32_MAX)]],
            Query(
                min_length=1, max_length=MAX_COMPARE_RUNS, description="repeat: ?run_id=1&run_id=2"
            ),
        ],
    ) -> s.Comparison:
        """Several runs side by side: summaries and series."""
        runs = store.runs_by_ids(run_id)
        series = store.series(run_id)
        return s.Comparison(
            runs=[_run_out(r) for r in runs],
            series=[_series(i, rows) for i, rows in series.items()],
        )

    # ------------------------------------------------------------ runs: write
    @app.post(
        "/runs", response_model=s.RunOut, status_code=201, tags=["runs"], responses=AUTH_RESPONSES
    )
    def create_run(body: s.RunCreate, token: RunCreator) -> s.RunOut:
        """Start recording a run (for a ServerApp that records over HTTP). The token becomes
        the run's owner: it, and writer tokens bound to the run, may write to it. The
        config is stored without `database-url` and with URL passwords redacted."""
        run_id = store.create_run(
            RunInfo(
                strategy=body.strategy,
                uplink_compressor=body.uplink_compressor,
                downlink_compressor=body.downlink_compressor,
                task=body.task,
                config=body.config,
                flower_run_id=body.flower_run_id,
                started_at=body.started_at,
                num_parameters=body.num_parameters,
            ),
            owner_token_id=token.id,
        )
        return _run_out(store.get_run(run_id))

    @app.post(
        "/runs/{run_id}/rounds",
        response_model=s.RoundOut,
        status_code=201,
        tags=["rounds"],
        responses=AUTH_RESPONSES,
    )
    def append_round(run_id: RunId, body: s.RoundCreate, token: Writer) -> Response:
        """Append one finished round with its client-rounds (one transaction); only the
        run's owner token or a writer token bound to the run may."""
        store.check_run_writer(token, run_id)
        fields = body.model_dump(exclude={"clients"})
        record = RoundRecord(
            **fields, clients=[ClientRoundRecord(**c.model_dump()) for c in body.clients]
        )
        store.append_round(run_id, record)
        # the body was stored as is (it is validated finite and UTC): echo it, no re-read
        return _json(s.RoundOut(run_id=run_id, **fields), status_code=201)

    @app.post(
        "/runs/{run_id}/finish", response_model=s.RunOut, tags=["runs"], responses=AUTH_RESPONSES
    )
    def finish_run(run_id: RunId, body: s.RunFinish, token: Writer) -> s.RunOut:
        """Close a run as finished, failed or interrupted (the run's writers only)."""
        store.check_run_writer(token, run_id)
        store.finish_run(run_id, body.status)
        return _run_out(store.get_run(run_id))

    # ------------------------------------------------------------ clients
    @app.get(
        "/clients",
        response_model=s.Page[s.ClientOut],
        tags=["clients"],
        responses=ERROR_RESPONSES,
        dependencies=Reads,
    )
    def list_clients(
        status: Annotated[s.ClientStatus | None, Query()] = None,
        limit: Limit = 100,
        offset: Offset = 0,
    ) -> Response:
        """Enrolled clients and their participation in rounds."""
        page = store.list_clients(status=status, limit=limit, offset=offset)
        parts = store.participation([c.node_id for c in page.items if c.node_id is not None])
        # rows straight to JSON: the same bytes as Page[ClientOut] without two models per
        # client (and FastAPI's validation of them again against the response model)
        items = [
            _client_json_fields(c, parts.get(c.node_id) if c.node_id is not None else None)
            for c in page.items
        ]
        return Response(
            to_json({"items": items, **_page_meta(page)}), media_type="application/json"
        )

    def _client_with_participation(client: Client) -> s.ClientOut:
        part = store.participation([client.node_id]) if client.node_id is not None else {}
        return _client_out(client, part.get(client.node_id) if client.node_id is not None else None)

    @app.get(
        "/clients/{client_id}",
        response_model=s.ClientOut,
        tags=["clients"],
        responses=ERROR_RESPONSES,
        dependencies=Reads,
    )
    def get_client(client_id: ClientId) -> s.ClientOut:
        return _client_with_participation(store.get_client(client_id))

    def _register(pem: str) -> int:
        assert registrar is not None
        try:
            return int(registrar.register(pem))
        except ValueError as exc:
            raise ApiError(422, "validation_error", f"SuperLink refused the key: {exc}") from exc
        except Exception as exc:
            log.exception("SuperLink registration failed")
            raise ApiError(502, "bad_gateway", f"SuperLink registration failed: {exc}") from exc

    def _unregister(node_id: int) -> None:
        assert registrar is not None
        try:
            registrar.unregister(node_id)
        except Exception as exc:
            log.exception("SuperLink unregistration failed")
            raise ApiError(502, "bad_gateway", f"SuperLink unregistration failed: {exc}") from exc

    @app.post(
        "/clients",
        response_model=s.ClientOut,
        status_code=201,
        tags=["clients"],
        responses={**AUTH_RESPONSES, 502: {"model": s.ErrorBody, "description": "SuperLink"}},
    )
    def enroll_client(body: s.ClientCreate, _token: Enroller) -> s.ClientOut:
        """Enrol an edge client: register its public key with the SuperLink, store it
        (an admin or enrol token)."""
        _validate_public_key(body.public_key_pem)
        node_id = body.node_id
        if registrar is not None:
            if node_id is not None:
                raise InvalidError("node_id is assigned by the SuperLink; leave it out")
            if _name_taken(body.name):
                raise ApiError(409, "conflict", f"a client named {body.name!r} is enrolled")
            node_id = _register(body.public_key_pem)
        try:
            client = store.enroll_client(
                name=body.name,
                public_key_pem=body.public_key_pem,
                node_id=node_id,
                location=body.location,
            )
        except StoreError:
            if registrar is not None and node_id is not None:
                _unregister(node_id)
            raise
        return _client_out(client, None)

    def _name_taken(name: str) -> bool:
        from sqlalchemy import select

        with store.session() as session:
            return session.scalars(select(Client.id).where(Client.name == name)).first() is not None

    @app.post(
        "/clients/{client_id}/disable",
        response_model=s.ClientOut,
        tags=["clients"],
        responses=AUTH_RESPONSES,
    )
    def disable_client(client_id: ClientId, _token: Admin) -> s.ClientOut:
        """Disable a client: the SuperLink refuses its key until it is enabled again."""
        client = store.get_client(client_id)
        if client.status == "active" and registrar is not None and client.node_id is not None:
            _unregister(client.node_id)
        return _client_with_participation(store.set_client_status(client_id, "disabled"))

    @app.post(
        "/clients/{client_id}/enable",
        response_model=s.ClientOut,
        tags=["clients"],
        responses=AUTH_RESPONSES,
    )
    def enable_client(client_id: ClientId, _token: Admin) -> s.ClientOut:
        """Enable a disabled client again (registers its key anew when a SuperLink is set)."""
        client = store.get_client(client_id)
        if client.status == "disabled" and registrar is not None:
            node_id = _register(client.public_key_pem)
            with store.session() as session:
                row = session.get(Client, client_id)
                if row is None:
                    raise NotFoundError(f"client {client_id} not found")
                row.node_id = node_id
                session.commit()
        return _client_with_participation(store.set_client_status(client_id, "active"))

    @app.delete("/clients/{client_id}", status_code=204, tags=["clients"], responses=AUTH_RESPONSES)
    def remove_client(client_id: ClientId, _token: Admin) -> Response:
        """Remove a client's enrolment (its round history stays)."""
        client = store.get_client(client_id)
        if client.status == "active" and registrar is not None and client.node_id is not None:
            _unregister(client.node_id)
        store.delete_client(client_id)
        return Response(status_code=204)

    # ------------------------------------------------------------ dashboard
    mount_dashboard(app)

    # ------------------------------------------------------------ middleware
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(HostCheck, allowed=settings.allowed_hosts)
    return app


def create_app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory api.app:create_app_from_env`` (settings from env)."""
    return create_app(Settings.from_env())
