"""Writers append rounds while readers query the live service: no lost or torn rounds.

One writer appends over HTTP, another through `SqlRecorder` straight into the database
(as a ServerApp does); four readers query summaries, pages, single rounds and series the
whole time. Every response must be internally consistent (a summary's totals match its
round count; a round always has all its client-rounds) and at the end every round is there.
"""

from __future__ import annotations

import threading
from typing import Any

import httpx
import pytest
from conftest import LiveService

from api.store import SqlRecorder, open_store
from core.records import ClientRoundRecord, RoundRecord, RunInfo

pytestmark = pytest.mark.slow

ROUNDS = 60
CLIENTS = 20
UP, DOWN = 1000, 300  # bytes per client-round


def round_body(t: int) -> dict[str, Any]:
    return {
        "round": t,
        "sampled": CLIENTS,
        "replied": CLIENTS,
        "failed": 0,
        "uplink_bytes": UP * CLIENTS,
        "downlink_bytes": DOWN * CLIENTS,
        "predicted_uplink_bytes": UP * CLIENTS,
        "predicted_downlink_bytes": DOWN * CLIENTS,
        "eval_accuracy": t / ROUNDS,
        "clients": [
            {"node_id": 1000 + i, "outcome": "ok", "uplink_bytes": UP, "downlink_bytes": DOWN}
            for i in range(CLIENTS)
        ],
    }


def check_summary(run: dict[str, Any]) -> int:
    s = run["summary"]
    n = s["rounds_done"]
    assert s["last_round"] == (n or None)
    assert s["uplink_bytes"] == n * UP * CLIENTS and s["downlink_bytes"] == n * DOWN * CLIENTS
    assert s["sampled"] == n * CLIENTS
    return int(n)


def test_writers_and_readers(live_service: LiveService) -> None:
    store = open_store(live_service.database_url)
    _, token = store.create_token("writer")
    base = live_service.url
    headers = {"Authorization": f"Bearer {token}"}
    info = {"strategy": "artemis", "uplink_compressor": "sq", "downlink_compressor": "sq",
            "task": "t", "num_parameters": 500}  # fmt: skip
    http_run = httpx.post(base + "/runs", json=info, headers=headers).json()["id"]
    recorder = SqlRecorder(live_service.database_url)
    sql_run = recorder.start_run(RunInfo("mcm", "sq", "sq", "t", {}, num_parameters=500))
    run_ids = (http_run, sql_run)

    done = threading.Event()
    errors: list[BaseException] = []
    reads = [0]
    lock = threading.Lock()

    def http_writer() -> None:
        with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
            for t in range(1, ROUNDS + 1):
                r = client.post(f"/runs/{http_run}/rounds", json=round_body(t))
                assert r.status_code == 201, r.text

    def sql_writer() -> None:
        for t in range(1, ROUNDS + 1):
            b = round_body(t)
            clients = [ClientRoundRecord(**c) for c in b.pop("clients")]
            recorder.record_round(sql_run, RoundRecord(**b, clients=clients))

    def reader(k: int) -> None:
        with httpx.Client(base_url=base, timeout=60) as client:
            i = 0
            while not done.is_set():
                run_id = run_ids[(k + i) % 2]
                i += 1
                n = check_summary(client.get(f"/runs/{run_id}").json())
                page = client.get(f"/runs/{run_id}/rounds", params={"limit": 1000}).json()
                rounds = [r["round"] for r in page["items"]]
                assert rounds == list(range(1, len(rounds) + 1)) and len(rounds) >= n
                assert page["total"] == len(rounds)
                if rounds:
                    t = rounds[-1]
                    detail = client.get(f"/runs/{run_id}/rounds/{t}").json()
                    assert len(detail["clients"]) == CLIENTS  # never a torn round
                    assert sum(c["uplink_bytes"] for c in detail["clients"]) == UP * CLIENTS
                series = client.get(f"/runs/{run_id}/series").json()
                m = len(series["rounds"])
                assert series["uplink_bytes_cumulative"] == [
                    UP * CLIENTS * (j + 1) for j in range(m)
                ]
                listing = client.get("/runs", params={"limit": 10}).json()
                for run in listing["items"]:
                    check_summary(run)
                with lock:
                    reads[0] += 1

    def guarded(fn: Any, *args: Any) -> Any:
        def run() -> None:
            try:
                fn(*args)
            except BaseException as exc:  # reported below
                errors.append(exc)
                done.set()

        return threading.Thread(target=run)

    writers = [guarded(http_writer), guarded(sql_writer)]
    readers = [guarded(reader, k) for k in range(4)]
    for thread in writers + readers:
        thread.start()
    for thread in writers:
        thread.join(timeout=300)
    done.set()
    for thread in readers:
        thread.join(timeout=60)
    if errors:
        raise errors[0]
    assert reads[0] >= 4
    for run_id in run_ids:
        run = httpx.get(f"{base}/runs/{run_id}").json()
        assert check_summary(run) == ROUNDS
        page = httpx.get(f"{base}/runs/{run_id}/rounds", params={"limit": 1000}).json()
        assert [r["round"] for r in page["items"]] == list(range(1, ROUNDS + 1))
    recorder.finish_run(sql_run, "finished")
