"""ETag, Cache-Control and 304 on the reads of one run, and the byte-compatibility of the
JSON fast path; real uvicorn over HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import LiveService
from test_api import RUN_BODY, auth, round_body

from api import schemas as s
from api.caching import FINISHED_MAX_AGE_S, matches
from api.store import open_store
from core.records import RoundRecord

pytestmark = pytest.mark.slow


def test_if_none_match_parsing() -> None:
    tag = '"abc"'
    assert matches('"abc"', tag) and matches('W/"abc"', tag) and matches('"x", "abc"', tag)
    assert matches("*", tag)
    assert not matches(None, tag) and not matches("", tag) and not matches('"abcd"', tag)
    assert not matches("abc", tag)  # unquoted: not the same entity tag


def run_paths(run_id: int) -> list[str]:
    return [
        f"/runs/{run_id}",
        f"/runs/{run_id}/rounds?limit=2",
        f"/runs/{run_id}/rounds/1",
        f"/runs/{run_id}/series",
    ]


@pytest.fixture
def http(live_service: LiveService) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_service.url, timeout=30) as client:
        yield client


def test_etag_304_and_a_new_etag_after_each_change(
    live_service: LiveService, http: httpx.Client
) -> None:
    store = open_store(live_service.database_url)
    w = auth(store.create_token("writer")[1])
    run_id = http.post("/runs", json=RUN_BODY, headers=w).json()["id"]
    other = http.post("/runs", json=RUN_BODY, headers=w).json()["id"]
    for t in (1, 2):
        assert http.post(f"/runs/{run_id}/rounds", json=round_body(t), headers=w).status_code == 201
    paths = run_paths(run_id)

    def fetch() -> dict[str, httpx.Response]:
        return {p: http.get(p) for p in paths}

    live = fetch()
    for path, got in live.items():
        assert got.status_code == 200, got.text
        tag = got.headers["etag"]
        assert tag.startswith('"') and not tag.startswith("W/"), tag  # strong
        assert got.headers["cache-control"] == "private, no-cache"
        for header in (tag, f"W/{tag}", f'"other", {tag}'):
            again = http.get(path, headers={"If-None-Match": header})
            assert again.status_code == 304, (path, header, again.text)
            assert again.content == b"" and again.headers["etag"] == tag
        assert http.get(path, headers={"If-None-Match": '"stale"'}).status_code == 200
    # every resource has its own tag, and so has the same resource of another run
    assert len({g.headers["etag"] for g in live.values()}) == len(paths)
    assert http.get(f"/runs/{other}").headers["etag"] != live[paths[0]].headers["etag"]

    # a live run: every appended round changes every tag
    assert http.post(f"/runs/{run_id}/rounds", json=round_body(3), headers=w).status_code == 201
    grown = {}
    for path, old in live.items():
        got = http.get(path, headers={"If-None-Match": old.headers["etag"]})
        assert got.status_code == 200 and got.headers["etag"] != old.headers["etag"], path
        grown[path] = got
    assert grown[paths[0]].json()["summary"]["rounds_done"] == 3
    assert grown[paths[3]].json()["rounds"] == [1, 2, 3]

    # finishing changes them once more, and the finished run may be cached for a day
    assert http.post(f"/runs/{run_id}/finish", json={"status": "finished"}, headers=w).is_success
    for path, old in grown.items():
        got = http.get(path, headers={"If-None-Match": old.headers["etag"]})
        assert got.status_code == 200 and got.headers["etag"] != old.headers["etag"], path
        assert got.headers["cache-control"] == f"private, max-age={FINISHED_MAX_AGE_S}"
        again = http.get(path, headers={"If-None-Match": got.headers["etag"]})
        assert again.status_code == 304 and again.content == b""
        # the same request again: the same tag (it is a function of the stored run)
        assert http.get(path).headers["etag"] == got.headers["etag"]

    # unknown runs stay 404, with or without a validator; lists carry none
    for validator in ({}, {"If-None-Match": "*"}):
        assert http.get("/runs/999/series", headers=validator).status_code == 404
    assert "etag" not in http.get("/runs").headers


def test_fast_json_is_the_models_json(live_service: LiveService, http: httpx.Client) -> None:
    """Pages and series skip the per-row models: their bytes must be what the response
    models make of the same data (integers in phase times become floats, UTC times end
    in Z, key order is the models')."""
    store = open_store(live_service.database_url)
    w = auth(store.create_token("writer")[1])
    run_id = http.post("/runs", json=RUN_BODY, headers=w).json()["id"]
    for t in (1, 2):
        body = round_body(t) | {"extra": {"note": "é\u2028", "n": [1, 2.5, None]}}
        assert http.post(f"/runs/{run_id}/rounds", json=body, headers=w).status_code == 201
    # through the store (the ServerApp's path): integer phase times, no accuracy
    store.append_round(
        run_id,
        RoundRecord(
            round=3, sampled=1, replied=1, failed=0, uplink_bytes=7, downlink_bytes=8,
            predicted_uplink_bytes=7, predicted_downlink_bytes=8, train_loss=0.25,
            phase_seconds={"train": 2, "evaluate": 0},
        ),
    )  # fmt: skip
    page = http.get(f"/runs/{run_id}/rounds").content
    assert s.Page[s.RoundOut].model_validate_json(page).model_dump_json().encode() == page
    assert b'"phase_seconds":{"train":2.0,"evaluate":0.0}' in page
    series = http.get(f"/runs/{run_id}/series").content
    assert s.Series.model_validate_json(series).model_dump_json().encode() == series
    assert b'"eval_accuracy":[0.5,0.5,null]' in series


def test_a_304_needs_the_same_token_as_a_200(tmp_path: Path) -> None:
    """On a non-loopback bind reads need a token: a validator changes nothing about it."""
    service = LiveService(f"sqlite:///{tmp_path / 'f.db'}", tmp_path / "home", host="0.0.0.0")
    service.start()
    try:
        store = open_store(service.database_url)
        w = auth(store.create_token("writer", scope="writer")[1])
        r = auth(store.create_token("reader", scope="reader")[1])
        e = auth(store.create_token("enrol", scope="enrol")[1])
        with httpx.Client(base_url=service.url, timeout=30) as http:
            run_id = http.post("/runs", json=RUN_BODY, headers=w).json()["id"]
            assert http.post(f"/runs/{run_id}/rounds", json=round_body(1), headers=w).is_success
            for path in run_paths(run_id):
                tag = http.get(path, headers=r).headers["etag"]
                for who in ({}, e, auth("unknown")):
                    for inm in (tag, "*"):
                        got = http.get(path, headers=who | {"If-None-Match": inm})
                        assert got.status_code == (403 if who == e else 401), got.text
                        assert "etag" not in got.headers and got.json()["error"]
                assert http.get(path, headers=r | {"If-None-Match": tag}).status_code == 304
                assert http.get(path, headers=w | {"If-None-Match": tag}).status_code == 304
    finally:
        service.stop()
