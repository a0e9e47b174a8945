"""Attacks on the REST service, each against real uvicorn over HTTP (issue 8).

- poisoned writes (lone surrogates, deep or huge JSON, NaN/inf, byte totals past 2^63,
  NUL characters) are refused with 422 on SQLite and PostgreSQL, and every read endpoint
  (and `fedsqueeze stats`) keeps answering 2xx; credentials never reach a stored config;
- tokens have scopes: a reader cannot write, an enrol token can only create clients, a
  writer can touch only the runs it created or is bound to, and nothing can append to or
  finish a run that the ServerApp records directly into SQL;
- a non-loopback bind needs a token for reads unless ``--public-reads``; a wrong Host header
  is refused; every 401 carries ``WWW-Authenticate: Bearer``;
- the command line refuses bad ports, ids and revisions with one line, never prints a
  database password, and creates the SQLite store 0600 in a 0700 folder;
- a property test: after any accepted write, every read endpoint still answers 2xx.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import REPO_ROOT, LiveService
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_api import RUN_BODY as RUN
from test_api import public_key_pem

from api.store import SqlRecorder, Store, open_store
from core.records import RoundRecord, RunInfo

pytestmark = pytest.mark.slow

I63 = (1 << 63) - 1
BIG = (1 << 62) - 1  # the largest byte count one round may carry
SENTINEL = "S3ntinelPW"


def round_body(t: int, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "round": t, "sampled": 2, "replied": 2, "failed": 0, "uplink_bytes": 100,
        "downlink_bytes": 100, "predicted_uplink_bytes": 100, "predicted_downlink_bytes": 100,
        "eval_accuracy": 0.5, "clients": [{"node_id": 7, "outcome": "ok", "uplink_bytes": 50}],
    }  # fmt: skip
    return body | fields


def raw(obj: Any) -> bytes:
    """JSON as Python writes it: lone surrogates escaped (\\ud800), NaN as `NaN`."""
    return json.dumps(obj).encode()


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


JSON_TYPE = {"Content-Type": "application/json"}


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value


def assert_reads_ok(http: httpx.Client, only: list[int] | None = None) -> None:
    """Every read endpoint answers 2xx for every stored run (or those in `only`), round
    and client; the lists and /compare always cover every run."""
    h: dict[str, str] = {}
    runs = http.get("/runs", params={"limit": 1000}, headers=h)
    assert runs.status_code == 200, runs.text
    every = [r["id"] for r in runs.json()["items"]]
    ids = every if only is None else only
    for sort in ("best_eval_accuracy", "rounds_done"):
        got = http.get("/runs", params={"sort": sort, "order": "asc"}, headers=h)
        assert got.status_code == 200, got.text
    for run_id in ids:
        for path in (f"/runs/{run_id}", f"/runs/{run_id}/series"):
            got = http.get(path, headers=h)
            assert got.status_code == 200, (path, got.text)
        rounds = http.get(f"/runs/{run_id}/rounds", params={"limit": 1000}, headers=h)
        assert rounds.status_code == 200, rounds.text
        for rnd in rounds.json()["items"]:
            got = http.get(f"/runs/{run_id}/rounds/{rnd['round']}", headers=h)
            assert got.status_code == 200, got.text
    for chunk in (every[i : i + 20] for i in range(0, len(every), 20)):
        got = http.get("/compare", params={"run_id": chunk}, headers=h)
        assert got.status_code == 200, got.text
    clients = http.get("/clients", params={"limit": 1000}, headers=h)
    assert clients.status_code == 200, clients.text
    for c in clients.json()["items"]:
        got = http.get(f"/clients/{c['id']}", headers=h)
        assert got.status_code == 200, got.text


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args],
        capture_output=True, text=True, cwd=REPO_ROOT, env=os.environ | (env or {}), timeout=120,
    )  # fmt: skip


def one_line_error(out: subprocess.CompletedProcess[str], code: int) -> str:
    """The command failed with `code`, printing exactly one non-empty line, no traceback."""
    assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, out.stdout + out.stderr
    assert "Traceback" not in lines[0]
    return lines[0]


# ------------------------------------------------------------------ poisoned writes


def test_poisoned_writes_are_refused_and_reads_stay_2xx(live_service: LiveService) -> None:
    store = open_store(live_service.database_url)
    _, writer = store.create_token("writer")
    _, admin = store.create_token("admin", admin=True)
    w, a = auth(writer), auth(admin)
    with httpx.Client(base_url=live_service.url, timeout=30) as http:
        run_id = http.post("/runs", json=RUN, headers=w).json()["id"]
        assert http.post(f"/runs/{run_id}/rounds", json=round_body(1), headers=w).status_code == 201

        def refused_run(body: bytes, what: str) -> None:
            got = http.post("/runs", content=body, headers=w | JSON_TYPE)
            assert got.status_code == 422, (what, got.status_code, got.text)
            assert_reads_ok(http)

        refused_run(raw(RUN | {"config": {"a": "\ud800"}}), "lone surrogate in a config value")
        refused_run(raw(RUN | {"config": {"\udfff": 1}}), "lone surrogate in a config key")
        refused_run(raw(RUN | {"config": {"a": ["x", {"b": "\ud800"}]}}), "surrogate in a list")
        refused_run(raw(RUN | {"task": "t\ud800"}), "lone surrogate in a text field")
        refused_run(raw(RUN | {"config": nested(300)}), "config nested 300 levels")
        refused_run(raw(RUN | {"config": nested(40)}), "config nested 40 levels")
        refused_run(raw(RUN | {"config": {"lr": math.nan}}), "NaN in a config")
        refused_run(raw(RUN | {"config": {"lr": [math.inf]}}), "inf in a config")
        refused_run(raw(RUN | {"config": {"a": "x\x00y"}}), "NUL in a config string")
        refused_run(raw(RUN | {"config": {"big": 1 << 70}}), "integer beyond 64 bits")
        refused_run(raw(RUN | {"config": {"blob": "x" * 300_000}}), "config over the size limit")

        def refused_round(body: dict[str, Any], what: str, status: int = 422) -> None:
            got = http.post(f"/runs/{run_id}/rounds", content=raw(body), headers=w | JSON_TYPE)
            assert got.status_code == status, (what, got.status_code, got.text)
            assert_reads_ok(http)

        refused_round(round_body(2, extra={"note": "\ud800"}), "lone surrogate in extra")
        refused_round(round_body(2, extra=nested(300)), "extra nested 300 levels")
        refused_round(round_body(2, extra={"x": math.nan}), "NaN in extra")
        refused_round(round_body(2, extra={"x": "\x00"}), "NUL in extra")
        refused_round(
            round_body(2, clients=[{"node_id": 1, "outcome": "failed", "error": "\ud800"}]),
            "lone surrogate in a client error",
        )
        # byte totals: each round may carry 2^62-1, the run's totals must stay < 2^63
        for name in ("uplink_bytes", "downlink_bytes", "predicted_uplink_bytes"):
            rid = http.post("/runs", json=RUN, headers=w).json()["id"]
            for t in (1, 2):
                ok = http.post(f"/runs/{rid}/rounds", json=round_body(t, **{name: BIG}), headers=w)
                assert ok.status_code == 201, ok.text
            over = http.post(f"/runs/{rid}/rounds", json=round_body(3, **{name: BIG}), headers=w)
            assert over.status_code == 422, (name, over.text)
            assert "2^63" in over.json()["error"]["message"]
            assert http.get(f"/runs/{rid}").json()["summary"]["rounds_done"] == 2
            assert_reads_ok(http)
        # one node's bytes over many rounds pass 2^63: accepted, and /clients still answers
        enrolled = http.post(
            "/clients", json={"name": "n77", "public_key_pem": public_key_pem(), "node_id": 77},
            headers=a,
        )  # fmt: skip
        assert enrolled.status_code == 201, enrolled.text
        rid = http.post("/runs", json=RUN, headers=w).json()["id"]
        heavy = [{"node_id": 77, "outcome": "ok", "uplink_bytes": BIG, "downlink_bytes": BIG}]
        for t in (1, 2, 3):
            got = http.post(f"/runs/{rid}/rounds", json=round_body(t, clients=heavy), headers=w)
            assert got.status_code == 201, got.text
        assert_reads_ok(http)
        part = http.get(f"/clients/{enrolled.json()['id']}").json()["participation"]
        assert part["rounds"] == 3 and part["uplink_bytes"] >= 3 * BIG - 3 * 2**12

        # clients and query filters
        for body in (
            {"name": "n\ud800", "public_key_pem": public_key_pem()},
            {"name": "x", "location": "a\x00b", "public_key_pem": public_key_pem()},
            {"name": "y", "location": "\udc80", "public_key_pem": public_key_pem()},
        ):
            got = http.post("/clients", content=raw(body), headers=a | JSON_TYPE)
            assert got.status_code == 422, got.text
        for params in ({"strategy": "\x00"}, {"strategy": "a\x00"}):
            got = http.get("/runs", params=params)
            assert got.status_code == 422, got.text
        assert_reads_ok(http)

        # credentials never reach a stored config
        url: Any = f"postgresql://fl:{SENTINEL}@db.example:5432/x"
        cred = {"config": {"database-url": url, "mirror": url, "nested": {"dsn": url}}}
        stored = http.post("/runs", json=RUN | cred, headers=w)
        assert stored.status_code == 201, stored.text
        config = http.get(f"/runs/{stored.json()['id']}").json()["config"]
        assert "database-url" not in config and config["mirror"].startswith("postgresql://fl:")
        assert SENTINEL not in json.dumps(config) and SENTINEL not in stored.text

    stats = cli("stats", "runs", "--url", live_service.url, "--limit", "1000")
    assert stats.returncode == 0, stats.stderr
    for run in (1, 2):
        assert cli("stats", "rounds", str(run), "--url", live_service.url).returncode == 0
    assert cli("stats", "clients", "--url", live_service.url).returncode == 0
    log = live_service.log_path.read_text()
    assert "Traceback" not in log and SENTINEL not in log


# ------------------------------------------------------------------ scoped tokens


@contextlib.contextmanager
def bound_service(tmp_path: Path, host: str, *options: str) -> Iterator[LiveService]:
    """`fedsqueeze api serve` with its own --host and extra options."""
    service = LiveService(
        f"sqlite:///{tmp_path / 'store' / 'f.db'}", tmp_path, host=host, options=options
    )
    try:
        service.start()
        yield service
    finally:
        service.stop()


def assert_401(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers.get("www-authenticate", "").startswith("Bearer"), response.headers


def test_scoped_tokens_on_a_non_loopback_bind(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with bound_service(tmp_path, "0.0.0.0") as service:
        db = service.database_url
        store = open_store(db)
        tokens = {
            scope: store.create_token(scope, scope=scope)[1]
            for scope in ("admin", "enrol", "writer", "reader")
        }
        _, other_writer = store.create_token("other", scope="writer")
        # the store the service created: 0600 files (WAL ones too, open now) in a 0700 folder
        folder = tmp_path / "store"
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        for name in ("f.db", "f.db-wal", "f.db-shm"):
            assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600, name
        a, e, w, r = (auth(tokens[s]) for s in ("admin", "enrol", "writer", "reader"))
        w2 = auth(other_writer)
        with httpx.Client(base_url=service.url, timeout=30) as http:
            # reads need a reader (or writer/admin) token on a non-loopback bind
            for path in ("/runs", "/clients", "/runs/1", "/compare?run_id=1"):
                assert_401(http.get(path))
            assert_401(http.get("/runs", headers=auth("unknown")))
            assert http.get("/health").status_code == 200
            for h in (r, w, a):
                assert http.get("/runs", headers=h).status_code == 200
            assert http.get("/runs", headers=e).status_code == 403
            # writes: 401 without a token, with WWW-Authenticate
            assert_401(http.post("/runs", json=RUN))
            assert_401(http.post("/clients", json={"name": "z", "public_key_pem": "x"}))
            # a reader cannot write
            assert http.post("/runs", json=RUN, headers=r).status_code == 403
            client = {"name": "edge-1", "public_key_pem": public_key_pem(), "node_id": 5}
            assert http.post("/clients", json=client, headers=r).status_code == 403
            # an enrol token creates a client, and nothing else
            enrolled = http.post("/clients", json=client, headers=e)
            assert enrolled.status_code == 201, enrolled.text
            cid = enrolled.json()["id"]
            assert http.post("/runs", json=RUN, headers=e).status_code == 403
            assert http.post(f"/clients/{cid}/disable", headers=e).status_code == 403
            assert http.delete(f"/clients/{cid}", headers=e).status_code == 403
            assert http.get(f"/clients/{cid}", headers=e).status_code == 403
            # writers touch only their own runs
            mine = http.post("/runs", json=RUN, headers=w).json()["id"]
            theirs = http.post("/runs", json=RUN, headers=w2).json()["id"]
            assert (
                http.post(f"/runs/{mine}/rounds", json=round_body(1), headers=w).status_code == 201
            )
            for h in (w2, a, r, e):
                got = http.post(f"/runs/{mine}/rounds", json=round_body(2), headers=h)
                assert got.status_code == 403, got.text
                got = http.post(f"/runs/{mine}/finish", json={"status": "failed"}, headers=h)
                assert got.status_code == 403, got.text
            assert http.get(f"/runs/{mine}", headers=r).json()["summary"]["rounds_done"] == 1
            # a writer token bound to one run (from the command line)
            out = cli("api", "token", "create", "--name", "ci", "--scope", "writer",
                      "--run", str(theirs), "--database-url", db)  # fmt: skip
            assert out.returncode == 0, out.stderr
            bound = auth(out.stdout.strip())
            assert (
                http.post(f"/runs/{theirs}/rounds", json=round_body(1), headers=bound).status_code
                == 201
            )
            assert (
                http.post(f"/runs/{mine}/rounds", json=round_body(3), headers=bound).status_code
                == 403
            )
            assert http.post("/runs", json=RUN, headers=bound).status_code == 403
            assert (
                http.post(
                    f"/runs/{theirs}/finish", json={"status": "finished"}, headers=bound
                ).status_code
                == 200
            )
            # the ServerApp's run, recorded directly into SQL: no REST token may touch it
            recorder = SqlRecorder(db)
            live = recorder.start_run(RunInfo("fedavg", "identity", "identity", "t", {}))
            recorder.record_round(live, RoundRecord(1, 1, 1, 0, 10, 10, 10, 10))
            for h in (w, w2, a, bound):
                got = http.post(f"/runs/{live}/rounds", json=round_body(2), headers=h)
                assert got.status_code == 403, got.text
                got = http.post(f"/runs/{live}/finish", json={"status": "failed"}, headers=h)
                assert got.status_code == 403, got.text
            # even when someone mints a token for it and writes first, the ServerApp goes on:
            # its refused record is logged and counted, the next rounds are stored
            out = cli("api", "token", "create", "--name", "intruder", "--scope", "writer",
                      "--run", str(live), "--database-url", db)  # fmt: skip
            intruder = auth(out.stdout.strip())
            assert (
                http.post(f"/runs/{live}/rounds", json=round_body(2), headers=intruder).status_code
                == 201
            )
            with caplog.at_level(logging.ERROR, logger="fedsqueeze.api"):
                recorder.record_round(live, RoundRecord(2, 1, 1, 0, 10, 10, 10, 10))
            assert recorder.refused_records == 1
            assert any("refused" in rec.getMessage() for rec in caplog.records)
            recorder.record_round(live, RoundRecord(3, 1, 1, 0, 10, 10, 10, 10))
            recorder.finish_run(live, "finished")
            got = http.get(f"/runs/{live}", headers=r).json()
            assert got["status"] == "finished" and got["summary"]["rounds_done"] == 3
            # Host header: loopback names and IP literals pass, other names are refused
            assert http.get("/runs", headers=r | {"Host": "evil.example"}).status_code == 400
            assert http.get("/health", headers={"Host": "evil.example:8080"}).status_code == 400
            assert (
                http.get("/runs", headers=r | {"Host": f"localhost:{service.port}"}).status_code
                == 200
            )
            # `fedsqueeze stats` with and without a reader token
            stats = cli("stats", "runs", "--url", service.url, env={"FEDSQUEEZE_TOKEN": ""})
            assert "401" in one_line_error(stats, 1)
            stats = cli("stats", "rounds", str(live), "--url", service.url,
                        "--token", tokens["reader"])  # fmt: skip
            assert stats.returncode == 0, stats.stderr
            scopes = cli("api", "token", "list", "--database-url", db, env={"COLUMNS": "200"})
            assert "enrol" in scopes.stdout and f"writer (run {theirs})" in scopes.stdout


def test_public_reads_and_allowed_hosts(tmp_path: Path) -> None:
    with bound_service(
        tmp_path, "0.0.0.0", "--public-reads", "--allowed-host", "dash.example"
    ) as service:
        got = httpx.get(service.url + "/runs", headers={"Host": "dash.example"})
        assert got.status_code == 200, got.text
        assert (
            httpx.get(service.url + "/runs", headers={"Host": "other.example"}).status_code == 400
        )
        assert_401(httpx.post(service.url + "/runs", json=RUN))


# ------------------------------------------------------------------ command line


def test_cli_refuses_bad_input_in_one_line(tmp_path: Path) -> None:
    for port in ("70000", "0", "-1"):
        line = one_line_error(cli("api", "serve", "--port", port), 2)
        assert "--port" in line and "65535" in line
    home = tmp_path / "home"
    env = {"FEDSQUEEZE_HOME": str(home), "DATABASE_URL": ""}  # the default SQLite file
    made = cli("api", "token", "create", "--name", "a", "--scope", "reader", env=env)
    assert made.returncode == 0, made.stderr
    # the store we create is 0600 in a 0700 folder, its WAL files too
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    for name in ("fedsqueeze.db", "fedsqueeze.db-wal", "fedsqueeze.db-shm"):
        path = home / name
        if path.exists() or name == "fedsqueeze.db":
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, name
    line = one_line_error(cli("api", "token", "revoke", "999999999999999999999", env=env), 1)
    assert "999999999999999999999" in line
    line = one_line_error(cli("api", "token", "revoke", "4242", env=env), 1)
    assert "4242" in line
    bad_scope = one_line_error(
        cli("api", "token", "create", "--name", "b", "--scope", "reader", "--run", "1", env=env), 2
    )
    assert "--run" in bad_scope
    no_run = one_line_error(
        cli("api", "token", "create", "--name", "b", "--scope", "writer", "--run", "77", env=env), 2
    )
    assert "77" in no_run
    line = one_line_error(cli("db", "upgrade", "--revision", "nosuch", env=env), 2)
    assert "nosuch" in line


@pytest.mark.postgres
def test_db_errors_never_print_the_password(tmp_path: Path) -> None:
    from conftest import postgres_reachable

    if not postgres_reachable():
        pytest.skip("PostgreSQL unreachable")
    url = f"postgresql://u:{SENTINEL}@127.0.0.1:5432/fsq_missing_db"
    for args in (
        ("db", "upgrade", "--database-url", url),
        ("db", "current", "--database-url", url),
        ("db", "downgrade", "base", "--yes", "--database-url", url),
        ("api", "token", "list", "--database-url", url),
    ):
        out = cli(*args)
        line = one_line_error(out, 1)
        assert SENTINEL not in out.stdout + out.stderr and "***" in line, line


# ------------------------------------------------------------------ property test

# any text, with the troublemakers (lone surrogates, NUL) drawn often
_text = st.text(
    alphabet=st.characters(codec=None, exclude_categories=()), max_size=8
) | st.sampled_from(["\ud800", "a\x00", "\udfff b", "ok"])
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 66), 1 << 66)
    | st.floats(allow_nan=True, allow_infinity=True) | _text
    | st.builds(nested, st.integers(1, 300)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=12,
)  # fmt: skip
_count = st.sampled_from([0, 1, BIG, BIG, I63, 1 << 63])
_write = st.one_of(
    st.tuples(st.just("run"), st.fixed_dictionaries(
        {"config": st.dictionaries(_text, _json, max_size=3), "strategy": _text | st.just("x")})),
    st.tuples(st.just("round"), st.fixed_dictionaries(
        {"round": st.integers(0, 4), "uplink_bytes": _count, "downlink_bytes": _count,
         "extra": st.dictionaries(_text, _json, max_size=3),
         "client_bytes": _count, "error": _text | st.none()})),
    st.tuples(st.just("finish"), st.sampled_from(["finished", "failed", "interrupted"])),
    st.tuples(st.just("client"), st.fixed_dictionaries(
        {"name": _text, "location": _text | st.none(), "node_id": st.integers(0, 3)})),
)  # fmt: skip


def test_property_any_accepted_write_keeps_reads_2xx(live_service: LiveService) -> None:
    """Random writes (hypothesis) through HTTP: refused ones are 4xx, never 5xx, and after
    each accepted one every read endpoint answers 2xx."""
    store: Store = open_store(live_service.database_url)
    _, admin = store.create_token("admin", admin=True)
    a = auth(admin)
    pem = public_key_pem()
    http = httpx.Client(base_url=live_service.url, timeout=30)
    run_ids = [http.post("/runs", json=RUN, headers=a).json()["id"]]

    @settings(
        max_examples=int(os.environ.get("FSQ_SECURITY_EXAMPLES", "40")),
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(writes=st.lists(_write, min_size=1, max_size=3))
    def check(writes: list[tuple[str, Any]]) -> None:
        for kind, value in writes:
            if kind == "run":
                body = RUN | value
                response = http.post("/runs", content=raw(body), headers=a | JSON_TYPE)
                if response.status_code == 201:
                    run_ids.append(response.json()["id"])
            elif kind == "round":
                client = {"node_id": 1, "outcome": "ok", "uplink_bytes": value["client_bytes"],
                          "error": value["error"]}  # fmt: skip
                body = round_body(
                    value["round"], uplink_bytes=value["uplink_bytes"],
                    downlink_bytes=value["downlink_bytes"], extra=value["extra"], clients=[client],
                )  # fmt: skip
                response = http.post(
                    f"/runs/{run_ids[-1]}/rounds", content=raw(body), headers=a | JSON_TYPE
                )
            elif kind == "finish":
                response = http.post(
                    f"/runs/{run_ids[-1]}/finish", json={"status": value}, headers=a
                )
                if response.status_code == 200:
                    run_ids.append(http.post("/runs", json=RUN, headers=a).json()["id"])
            else:
                body = value | {"public_key_pem": pem}
                response = http.post("/clients", content=raw(body), headers=a | JSON_TYPE)
            assert response.status_code < 500, (kind, value, response.text)
            if response.status_code < 300:
                assert_reads_ok(http, only=run_ids[-2:])

    try:
        check()
        # Then one valid write of each kind: after the random ones the service still accepts
        # them, and every read still answers. (Which random draws are accepted depends on
        # state, e.g. a client's name, node id or key already taken, and varied with the
        # tests run before in the same session, so the draws alone need not hold an
        # accepted write of any kind.)
        run = http.post("/runs", json=RUN, headers=a)
        assert run.status_code == 201, run.text
        run_id = run.json()["id"]
        writes = [
            ("round", http.post(f"/runs/{run_id}/rounds", content=raw(round_body(1)),
                                headers=a | JSON_TYPE)),
            ("client", http.post("/clients", content=raw(
                {"name": f"property-last-{run_id}", "location": None, "node_id": 10_000 + run_id,
                 "public_key_pem": public_key_pem()}), headers=a | JSON_TYPE)),
            ("finish", http.post(f"/runs/{run_id}/finish", json={"status": "finished"},
                                 headers=a)),
        ]  # fmt: skip
        for kind, response in writes:
            assert response.status_code < 300, (kind, response.text)
        assert_reads_ok(http, only=[run_id])
    finally:
        http.close()
    assert "Traceback" not in live_service.log_path.read_text()
