"""The REST service under real uvicorn over HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import REPO_ROOT, LiveService
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from api import schemas as s
from api.client import HttpRecorder, RecorderHttpError
from api.store import Store, open_store
from core.records import ClientRoundRecord, RoundRecord, RunInfo

pytestmark = pytest.mark.slow

BIG_NODE_ID = (1 << 64) - 5


def public_key_pem() -> str:
    key = ec.generate_private_key(ec.SECP384R1())
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def round_body(t: int, *, acc: float = 0.5, node_ids: tuple[int, ...] = (11, 12)) -> dict[str, Any]:
    clients = [
        {"node_id": n, "outcome": "ok", "uplink_bytes": 1000, "downlink_bytes": 500,
         "num_examples": 60, "local_loss": 0.3, "duration_s": 0.5}
        for n in node_ids
    ]  # fmt: skip
    return {
        "round": t,
        "sampled": len(node_ids) + 1,
        "replied": len(node_ids),
        "failed": 1,
        "uplink_bytes": 1000 * len(node_ids),
        "downlink_bytes": 500 * (len(node_ids) + 1),
        "predicted_uplink_bytes": 990 * len(node_ids),
        "predicted_downlink_bytes": 490 * (len(node_ids) + 1),
        "train_loss": 1.0 / t,
        "eval_loss": 1.1 / t,
        "eval_accuracy": acc,
        "phase_seconds": {"train": 1.5},
        "clients": [*clients, {"node_id": 99, "outcome": "timeout", "error": "no reply"}],
    }


RUN_BODY = {
    "strategy": "artemis",
    "uplink_compressor": "sq:s=1",
    "downlink_compressor": "identity",
    "task": "fashion_mnist",
    "config": {"num-server-rounds": 3},
    "num_parameters": 1000,
}


@pytest.fixture
def store(live_service: LiveService) -> Store:
    return open_store(live_service.database_url)


@pytest.fixture
def http(live_service: LiveService) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_service.url, timeout=30) as client:
        yield client


@pytest.fixture
def tokens(store: Store) -> dict[str, str]:
    return {
        "writer": store.create_token("writer")[1],
        "admin": store.create_token("admin", admin=True)[1],
    }


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and {"code", "message"} <= set(body["error"])
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]


def test_health_ready_openapi_and_no_cors(http: httpx.Client) -> None:
    assert http.get("/health").json()["status"] == "ok"
    ready = http.get("/ready")
    assert (
        ready.status_code == 200 and ready.json()["revision"] == ready.json()["expected_revision"]
    )
    schema = http.get("/openapi.json").json()
    assert "HTTPBearer" in schema["components"]["securitySchemes"]
    assert schema["components"]["schemas"]["RoundCreate"]["examples"]
    assert "/runs/{run_id}/series" in schema["paths"]
    pre = http.options(
        "/runs", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "GET"}
    )
    assert "access-control-allow-origin" not in pre.headers
    got = http.get("/runs", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in got.headers


def test_runs_rounds_series_compare(http: httpx.Client, tokens: dict[str, str]) -> None:
    w = auth(tokens["writer"])
    created = http.post("/runs", json=RUN_BODY | {"flower_run_id": BIG_NODE_ID}, headers=w)
    assert created.status_code == 201, created.text
    run = created.json()
    run_id = run["id"]
    assert run["status"] == "running" and run["flower_run_id"] == BIG_NODE_ID
    accs = [0.4, 0.8, 0.6]
    for t, acc in enumerate(accs, start=1):
        r = http.post(f"/runs/{run_id}/rounds", json=round_body(t, acc=acc), headers=w)
        assert r.status_code == 201, r.text
        assert r.json()["round"] == t
    other = http.post("/runs", json=RUN_BODY | {"strategy": "mcm"}, headers=w).json()

    summary = http.get(f"/runs/{run_id}").json()["summary"]
    assert summary["rounds_done"] == 3 and summary["last_round"] == 3
    assert (summary["best_eval_accuracy"], summary["best_eval_round"]) == (0.8, 2)
    assert summary["uplink_bytes"] == 3 * 2000 and summary["downlink_bytes"] == 3 * 1500
    # float32 baseline: 4 bytes x d=1000 parameters per reply (2 per round) / per sampled (3)
    assert summary["float32_uplink_bytes"] == 4 * 1000 * 6
    assert summary["uplink_compression_ratio"] == pytest.approx(24000 / 6000)
    assert summary["downlink_compression_ratio"] == pytest.approx(36000 / 4500)
    assert summary["total_compression_ratio"] == pytest.approx(60000 / 10500)

    # list, filters, sort, pagination edges
    page = http.get("/runs").json()
    assert page["total"] == 2 and [r["id"] for r in page["items"]] == [other["id"], run_id]
    assert http.get("/runs", params={"strategy": "mcm"}).json()["items"][0]["id"] == other["id"]
    assert http.get("/runs", params={"status": "finished"}).json()["total"] == 0
    asc = http.get("/runs", params={"sort": "rounds_done", "order": "asc"}).json()["items"]
    assert [r["id"] for r in asc] == [other["id"], run_id]
    for order in ("asc", "desc"):  # a run without accuracy sorts last either way
        by_acc = http.get("/runs", params={"sort": "best_eval_accuracy", "order": order})
        assert [r["id"] for r in by_acc.json()["items"]] == [run_id, other["id"]]
    first = http.get("/runs", params={"limit": 1}).json()
    assert len(first["items"]) == 1 and first["next_offset"] == 1
    last = http.get("/runs", params={"limit": 1, "offset": 1}).json()
    assert last["items"][0]["id"] == run_id and last["next_offset"] is None
    beyond = http.get("/runs", params={"offset": 10}).json()
    assert beyond["items"] == [] and beyond["total"] == 2 and beyond["next_offset"] is None

    rounds = http.get(f"/runs/{run_id}/rounds", params={"limit": 2}).json()
    assert [r["round"] for r in rounds["items"]] == [1, 2] and rounds["next_offset"] == 2
    ranged = http.get(f"/runs/{run_id}/rounds", params={"from_round": 2, "to_round": 3}).json()
    assert [r["round"] for r in ranged["items"]] == [2, 3] and ranged["total"] == 2
    detail = http.get(f"/runs/{run_id}/rounds/2").json()
    assert detail["eval_accuracy"] == 0.8 and len(detail["clients"]) == 3
    assert detail["clients"][2] | {"error": "no reply"} == detail["clients"][2]

    series = http.get(f"/runs/{run_id}/series").json()
    assert series["rounds"] == [1, 2, 3] and series["eval_accuracy"] == accs
    assert series["uplink_bytes_cumulative"] == [2000, 4000, 6000]
    cmp = http.get("/compare", params={"run_id": [run_id, other["id"]]}).json()
    assert [r["id"] for r in cmp["runs"]] == [run_id, other["id"]]
    assert [len(s["rounds"]) for s in cmp["series"]] == [3, 0]

    finished = http.post(f"/runs/{run_id}/finish", json={"status": "finished"}, headers=w)
    assert finished.json()["status"] == "finished" and finished.json()["ended_at"]
    assert http.get("/runs", params={"status": "finished"}).json()["total"] == 1
    assert_error(http.post(f"/runs/{run_id}/rounds", json=round_body(4), headers=w), 409)


def test_errors_have_one_shape(http: httpx.Client, tokens: dict[str, str]) -> None:
    w = auth(tokens["writer"])
    run_id = http.post("/runs", json=RUN_BODY, headers=w).json()["id"]
    http.post(f"/runs/{run_id}/rounds", json=round_body(1), headers=w)
    # 404
    assert_error(http.get("/runs/999999"), 404, "not_found")
    assert_error(http.get(f"/runs/{run_id}/rounds/7"), 404, "not_found")
    assert_error(http.get("/runs/999999/rounds"), 404)
    assert_error(http.get("/runs/999999/series"), 404)
    assert_error(http.get("/compare", params={"run_id": [run_id, 999999]}), 404)
    assert_error(http.get("/clients/5"), 404)
    assert_error(http.get("/nowhere"), 404)
    # 422 on parameters
    bad_params: list[tuple[str, dict[str, Any]]] = [
        ("/runs", {"limit": 0}),
        ("/runs", {"limit": 1001}),
        ("/runs", {"offset": -1}),
        ("/runs", {"status": "bogus"}),
        ("/runs", {"sort": "password"}),
        (f"/runs/{run_id}/rounds", {"from_round": 3, "to_round": 2}),
        ("/runs/0", {}),
        ("/runs/abc", {}),
        ("/runs/99999999999", {}),
        ("/compare", {}),
        ("/compare", {"run_id": list(range(1, 30))}),
    ]
    for path, params in bad_params:
        assert_error(http.get(path, params=params), 422)
    # 422 on bodies
    bad_rounds = [
        round_body(2) | {"uplink_bytes": -1},
        round_body(2) | {"unknown": 1},
        round_body(2) | {"replied": 9},
        {k: v for k, v in round_body(2).items() if k != "sampled"},
        round_body(2) | {"started_at": "2026-01-02T00:00:00Z", "ended_at": "2026-01-01T00:00:00Z"},
    ]
    for body in bad_rounds:
        err = assert_error(http.post(f"/runs/{run_id}/rounds", json=body, headers=w), 422)
        assert err["code"] in ("validation_error", "invalid")
    json_type = {"Content-Type": "application/json"}
    not_json = http.post(f"/runs/{run_id}/rounds", content=b"{not json", headers=w | json_type)
    assert_error(not_json, 422)
    assert_error(http.post("/runs", json=RUN_BODY | {"strategy": "a\x00b"}, headers=w), 422)
    # 409 duplicate round; the stored round is untouched
    assert_error(http.post(f"/runs/{run_id}/rounds", json=round_body(1, acc=0.9), headers=w), 409)
    assert http.get(f"/runs/{run_id}/rounds/1").json()["eval_accuracy"] == 0.5
    # 401 / 403
    assert_error(http.post("/runs", json=RUN_BODY), 401, "unauthorized")
    assert_error(http.post("/runs", json=RUN_BODY, headers=auth("nope")), 401, "unauthorized")
    assert_error(http.post("/runs", json=RUN_BODY, headers={"Authorization": "Basic eDp5"}), 401)
    client_body = {"name": "c", "public_key_pem": public_key_pem()}
    assert_error(http.post("/clients", json=client_body, headers=w), 403, "forbidden")
    # 413: too large, declared or streamed
    huge = json.dumps(round_body(3) | {"extra": {"blob": "x" * 5_000_000}}).encode()
    assert_error(http.post(f"/runs/{run_id}/rounds", content=huge, headers=w), 413)

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(huge), 65536):
            yield huge[i : i + 65536]

    assert_error(http.post(f"/runs/{run_id}/rounds", content=chunks(), headers=w), 413)
    assert http.get(f"/runs/{run_id}").json()["summary"]["rounds_done"] == 1


def test_clients_enrol_disable_remove(http: httpx.Client, tokens: dict[str, str]) -> None:
    a = auth(tokens["admin"])
    pem = public_key_pem()
    created = http.post(
        "/clients", json={"name": "pi-1", "public_key_pem": pem, "node_id": 11, "location": "lab"},
        headers=a,
    )  # fmt: skip
    assert created.status_code == 201, created.text
    client = created.json()
    assert client["status"] == "active" and client["participation"]["rounds"] == 0
    assert_error(
        http.post("/clients", json={"name": "pi-1", "public_key_pem": pem}, headers=a), 409
    )
    assert_error(
        http.post("/clients", json={"name": "pi-2", "public_key_pem": "hello"}, headers=a), 422
    )
    # participation from recorded rounds
    run_id = http.post("/runs", json=RUN_BODY, headers=a).json()["id"]
    for t in (1, 2):
        http.post(f"/runs/{run_id}/rounds", json=round_body(t), headers=a)
    response = http.get("/clients")
    listed = response.json()
    assert listed["total"] == 1
    part = listed["items"][0]["participation"]
    assert (part["rounds"], part["ok"], part["uplink_bytes"]) == (2, 2, 2000)
    assert listed["items"][0]["last_seen_at"] is not None
    assert listed["items"][0] == http.get(f"/clients/{client['id']}").json()
    # the page is written without models: the same bytes as the response model's
    page_model = s.Page[s.ClientOut]
    assert page_model.model_validate_json(response.content).model_dump_json() == response.text
    other = http.post(
        "/clients", json={"name": "pi-no-node", "public_key_pem": public_key_pem()}, headers=a
    )  # a client without a node id: no participation
    response = http.get("/clients")
    assert response.json()["items"][1]["participation"] == other.json()["participation"] == {
        "rounds": 0, "ok": 0, "failed": 0, "uplink_bytes": 0, "downlink_bytes": 0,
        "num_examples": 0, "last_round_at": None,
    }  # fmt: skip
    assert page_model.model_validate_json(response.content).model_dump_json() == response.text
    assert http.delete(f"/clients/{other.json()['id']}", headers=a).status_code == 204
    disabled = http.post(f"/clients/{client['id']}/disable", headers=a).json()
    assert disabled["status"] == "disabled"
    assert http.get("/clients", params={"status": "active"}).json()["total"] == 0
    assert http.post(f"/clients/{client['id']}/enable", headers=a).json()["status"] == "active"
    assert http.delete(f"/clients/{client['id']}", headers=a).status_code == 204
    assert_error(http.get(f"/clients/{client['id']}"), 404)
    assert_error(http.delete(f"/clients/{client['id']}", headers=a), 404)
    assert http.get(f"/runs/{run_id}/rounds").json()["total"] == 2  # history stays


def test_http_recorder_writes_through_the_service(
    live_service: LiveService, tokens: dict[str, str], http: httpx.Client
) -> None:
    recorder = HttpRecorder(live_service.url, tokens["writer"])
    run_id = recorder.start_run(
        RunInfo("mcm", "topk:k=0.01", "sq:s=2", "fashion_mnist", {"a": 1}, num_parameters=10)
    )
    record = RoundRecord(
        round=1, sampled=2, replied=2, failed=0, uplink_bytes=80, downlink_bytes=40,
        predicted_uplink_bytes=80, predicted_downlink_bytes=40, eval_accuracy=0.3,
        clients=[ClientRoundRecord(node_id=BIG_NODE_ID, outcome="ok", uplink_bytes=40)],
    )  # fmt: skip
    recorder.record_round(run_id, record)
    with pytest.raises(RecorderHttpError, match="409"):
        recorder.record_round(run_id, record)
    recorder.finish_run(run_id, "finished")
    recorder.close()
    run = http.get(f"/runs/{run_id}").json()
    assert run["status"] == "finished" and run["summary"]["uplink_bytes"] == 80
    detail = http.get(f"/runs/{run_id}/rounds/1").json()
    assert detail["clients"][0]["node_id"] == BIG_NODE_ID
    with pytest.raises(RecorderHttpError, match="401"):
        HttpRecorder(live_service.url, "wrong").start_run(RunInfo("a", "b", "c", "d", {}))


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args],
        capture_output=True, text=True, cwd=REPO_ROOT, env=os.environ | (env or {}), timeout=120,
    )  # fmt: skip


def test_cli_token_and_stats(live_service: LiveService, http: httpx.Client) -> None:
    db = ["--database-url", live_service.database_url]
    out = _cli("api", "token", "create", "--name", "ops", *db)
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    assert "keep it safe" in out.stderr and len(token) > 40
    w = auth(token)
    run_id = http.post("/runs", json=RUN_BODY, headers=w).json()["id"]
    http.post(f"/runs/{run_id}/rounds", json=round_body(1), headers=w)
    http.post(f"/runs/{run_id}/rounds", json=round_body(2, acc=0.75), headers=w)
    url = ["--url", live_service.url]
    runs = _cli("stats", "runs", *url, "--json")
    assert runs.returncode == 0, runs.stderr
    assert json.loads(runs.stdout)["items"][0]["summary"]["best_eval_accuracy"] == 0.75
    table = _cli("stats", "runs", *url, env={"COLUMNS": "200"})
    assert "artemis" in table.stdout and "0.75" in table.stdout
    rounds = _cli("stats", "rounds", str(run_id), *url, "--from", "2", env={"COLUMNS": "200"})
    assert rounds.returncode == 0 and "best accuracy 0.75" in rounds.stdout
    data = json.loads(_cli("stats", "rounds", str(run_id), *url, "--json").stdout)
    assert [r["round"] for r in data["rounds"]["items"]] == [1, 2]
    assert _cli("stats", "clients", *url).returncode == 0
    missing = _cli("stats", "rounds", "4242", *url)
    assert missing.returncode == 1 and "run 4242 not found" in missing.stderr
    listed = _cli("api", "token", "list", *db, env={"COLUMNS": "200"})
    assert "ops" in listed.stdout and token not in listed.stdout
    assert _cli("api", "token", "revoke", "1", *db).returncode == 0
    assert http.post("/runs", json=RUN_BODY, headers=w).status_code == 401
    current = _cli("db", "current", *db)
    assert current.returncode == 0 and "expected" in current.stdout


def test_cli_errors_are_clear(tmp_path: Path) -> None:
    down = _cli("stats", "runs", "--url", "http://127.0.0.1:9")
    assert down.returncode == 1 and "cannot reach the REST service" in down.stderr
    bad = _cli("db", "upgrade", "--database-url", "mysql://x/y")
    assert bad.returncode == 1 and "unsupported database URL" in bad.stderr
    no = _cli("db", "downgrade", "base", "--database-url", f"sqlite:///{tmp_path}/a.db")
    assert no.returncode == 1 and "--yes" in no.stderr


def test_cors_when_configured(tmp_path: Path) -> None:
    service = LiveService(
        f"sqlite:///{tmp_path / 'c.db'}",
        tmp_path / "home",
        env={"FEDSQUEEZE_CORS_ORIGINS": "http://dash.example"},
    )
    try:
        service.start()
        got = httpx.get(service.url + "/runs", headers={"Origin": "http://dash.example"})
        assert got.headers["access-control-allow-origin"] == "http://dash.example"
        other = httpx.get(service.url + "/runs", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers
    finally:
        service.stop()


class RecordingRegistrar:
    """Stands in for the SuperLink registrar (server/deploy) to inject its failures; the
    real one is exercised end to end by the deployment tests."""

    def __init__(self) -> None:
        self.registered: dict[int, str] = {}
        self.calls: list[tuple[str, int]] = []
        self.fail_next = False
        self._next = 1 << 63  # node ids above 2^63 must survive the round trip

    def register(self, public_key_pem: str) -> int:
        if self.fail_next:
            self.fail_next = False
            raise ConnectionError("SuperLink unreachable")
        self._next += 1
        self.registered[self._next] = public_key_pem
        self.calls.append(("register", self._next))
        return self._next

    def unregister(self, node_id: int) -> None:
        self.registered.pop(node_id)
        self.calls.append(("unregister", node_id))


def test_registrar_hooks(tmp_path: Path) -> None:
    import threading

    import uvicorn
    from conftest import free_port

    from api.app import create_app
    from api.settings import Settings

    registrar = RecordingRegistrar()
    url = f"sqlite:///{tmp_path / 'r.db'}"
    app = create_app(Settings(database_url=url), registrar=registrar)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", ws="none")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            if server.started:
                break
            time.sleep(0.05)
        a = auth(open_store(url).create_token("admin", admin=True)[1])
        with httpx.Client(base_url=base, headers=a, timeout=30) as http:
            pem = public_key_pem()
            client = http.post("/clients", json={"name": "edge", "public_key_pem": pem}).json()
            assert client["node_id"] in registrar.registered
            assert registrar.registered[client["node_id"]] == pem
            # the SuperLink assigns node ids: giving one is refused
            given = {"name": "x", "public_key_pem": pem, "node_id": 5}
            assert_error(http.post("/clients", json=given), 422)
            # a name clash is refused before anything is registered
            n_calls = len(registrar.calls)
            assert_error(http.post("/clients", json={"name": "edge", "public_key_pem": pem}), 409)
            assert len(registrar.calls) == n_calls
            # the SuperLink failing: 502, nothing stored
            registrar.fail_next = True
            other = {"name": "edge-2", "public_key_pem": public_key_pem()}
            assert_error(http.post("/clients", json=other), 502, "bad_gateway")
            assert http.get("/clients").json()["total"] == 1
            # disable unregisters, enable registers again (new node id), remove unregisters
            http.post(f"/clients/{client['id']}/disable").raise_for_status()
            assert registrar.registered == {}
            enabled = http.post(f"/clients/{client['id']}/enable").json()
            assert enabled["status"] == "active" and enabled["node_id"] in registrar.registered
            assert http.delete(f"/clients/{client['id']}").status_code == 204
            assert registrar.registered == {}
    finally:
        server.should_exit = True
        thread.join(timeout=15)
