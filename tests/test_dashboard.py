"""The dashboard in a real headless Chromium (Playwright, /usr/bin/chromium) against a real
uvicorn serving a store that a real Flower simulation (`fedsqueeze simulate`) filled.

Charts expose what they drew on their <figure>: ``data-points`` (x values, one per round)
and ``data-series-points`` (non-null points per series). Waits are Playwright selectors
with generous timeouts (no fixed sleeps); every page must log no console error (the
token test allows the 401s it provokes). Screenshots go to $FEDSQUEEZE_TEST_ARTEFACTS
(else a temporary folder, printed).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import LiveService

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip
ROUNDS = 3
STRATEGIES = ("artemis", "sgd")
WAIT_MS = 60_000  # generous: a loaded CI machine may be slow to poll and draw
RUN_CHARTS = ("loss-round", "accuracy-round", "loss-bytes", "accuracy-bytes", "bytes-round",
              "participants-round", "rejected-round")  # fmt: skip
HOSTILE_NAME = '<img src=x onerror="document.title=1"><b>live</b>'

if not CHROMIUM.exists():
    pytest.skip(
        "/usr/bin/chromium is absent (apt-get install chromium; .ci/run does)",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = os.environ.get("FEDSQUEEZE_TEST_ARTEFACTS")
    path = Path(where) / "dashboard" if where else tmp_path_factory.mktemp("dashboard-artefacts")
    path.mkdir(parents=True, exist_ok=True)
    print(f"\ndashboard screenshots in {path}")
    return path


def _simulate(url: str, home: Path) -> None:
    env = {**os.environ, "FEDSQUEEZE_HOME": str(home), "COLUMNS": "160"}
    env.pop("DATABASE_URL", None)
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", "simulate",
         *[a for s in STRATEGIES for a in ("--strategy", s)],
         "--task", "synthetic-logreg", "--rounds", str(ROUNDS), "--clients", "3",
         "--database-url", url, "--timeout", "300", "--no-progress"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def simulated(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[dict[str, Any]]]:
    """A real simulation of two strategies (synthetic logistic regression, 3 clients) into
    a SQLite store; returns its URL and the runs as the REST service will list them."""
    tmp = tmp_path_factory.mktemp("dashboard-sim")
    url = f"sqlite:///{tmp / 'runs.db'}"
    _simulate(url, tmp / "home")
    from api.store import open_store

    store = open_store(url)
    runs = [
        {"id": r.id, "strategy": r.strategy, "rounds": r.rounds_done, "status": r.status}
        for r in store.list_runs(sort="id", order="asc").items
    ]
    assert [r["strategy"] for r in runs] == list(STRATEGIES)
    assert all(r["rounds"] == ROUNDS and r["status"] == "finished" for r in runs)
    return url, runs


@pytest.fixture(scope="module")
def service(
    simulated: tuple[str, list[dict[str, Any]]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveService]:
    live = LiveService(simulated[0], tmp_path_factory.mktemp("dashboard-api"))
    try:
        live.start()
        yield live
    finally:
        live.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


class Tab:
    """A browser tab that records console errors and uncaught page errors."""

    def __init__(self, context: Any, artefacts: Path) -> None:
        self.page = context.new_page()
        self.page.set_default_timeout(WAIT_MS)
        self.errors: list[str] = []
        self.artefacts = artefacts
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))

    def open(self, url: str) -> None:
        self.page.goto(url)
        self.ready()

    def ready(self) -> None:
        """Wait until the current route has loaded its data and drawn."""
        self.page.wait_for_selector("body[data-ready='true']", state="attached")

    def shot(self, name: str) -> Path:
        path = self.artefacts / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        print(f"screenshot: {path}")
        return path

    def assert_clean(self, allowed: str | None = None) -> None:
        left = [e for e in self.errors if not (allowed and re.search(allowed, e))]
        assert left == [], left


@pytest.fixture
def tab(browser: Any, artefacts: Path) -> Iterator[Tab]:
    context = browser.new_context(viewport={"width": 1300, "height": 900})
    try:
        yield Tab(context, artefacts)
    finally:
        context.close()


def _figure(tab: Tab, name: str) -> Any:
    return tab.page.locator(f"figure[data-chart='{name}']")


def test_page_is_served_with_a_strict_content_security_policy(service: LiveService) -> None:
    page = httpx.get(service.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "frame-ancestors 'none'" in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    assert "<script>" not in page.text  # no inline script
    for asset in ("static/app.js", "static/app.css", "static/vendor/uplot/uPlot.iife.min.js"):
        got = httpx.get(f"{service.url}/{asset}")
        assert got.status_code == 200, asset
    script = httpx.get(service.url + "/static/app.js").text
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(", script)
    # the page is no API endpoint: it stays out of the OpenAPI schema
    assert "/" not in httpx.get(service.url + "/openapi.json").json()["paths"]


def test_runs_table_lists_the_simulated_runs_sorts_and_filters(
    service: LiveService, simulated: tuple[str, list[dict[str, Any]]], tab: Tab
) -> None:
    _, runs = simulated
    tab.open(service.url + "/#/runs")
    page = tab.page
    for run in runs:
        row = page.locator(f"#runs-table tbody tr[data-run-id='{run['id']}']")
        assert row.count() == 1
        text = row.inner_text()
        assert run["strategy"] in text and "finished" in text
        assert re.search(rf"\b{ROUNDS}\b", text)
    tab.shot("runs")

    def ids() -> list[int]:
        rows = page.locator("#runs-table tbody tr").all()
        return [int(r.get_attribute("data-run-id") or 0) for r in rows]

    assert ids() == sorted(ids(), reverse=True)  # newest first
    page.click("th[data-sort='id']")
    assert ids() == sorted(ids())
    page.click("th[data-sort='strategy']")
    strategies = page.locator("#runs-table tbody tr td:nth-child(4)").all_inner_texts()
    assert strategies == sorted(strategies)
    page.fill("#runs-filter", "ARTEMIS")  # any column, any case (sgd's row says "identity")
    visible = page.locator("#runs-table tbody tr")
    assert visible.count() == 1
    assert "artemis" in visible.first.inner_text()
    assert page.locator(".count").inner_text() == f"1 of {len(runs)} runs"
    tab.assert_clean()


def test_run_page_draws_a_point_per_round(
    service: LiveService, simulated: tuple[str, list[dict[str, Any]]], tab: Tab
) -> None:
    _, runs = simulated
    for run in runs:
        rounds = httpx.get(f"{service.url}/runs/{run['id']}/rounds").json()["items"]
        assert len(rounds) == ROUNDS
        tab.open(f"{service.url}/#/run/{run['id']}")
        for name in RUN_CHARTS:
            figure = _figure(tab, name)
            assert figure.get_attribute("data-points") == str(ROUNDS), name
            assert figure.locator("canvas").count() == 1, name  # uPlot drew it
        # every round was evaluated: as many accuracy points as rounds, on both x axes
        for name in ("accuracy-round", "accuracy-bytes"):
            assert _figure(tab, name).get_attribute("data-series-points") == str(ROUNDS)
        participants = _figure(tab, "participants-round").get_attribute("data-series-points")
        assert participants == f"{ROUNDS},{ROUNDS},{ROUNDS}"
        assert tab.page.locator("#run-summary dd[data-field='status']").inner_text() == "finished"
        assert tab.page.locator("table.settings").inner_text().count("synthetic-logreg") >= 1
        tab.shot(f"run-{run['strategy']}")
    tab.assert_clean()


def _round(k: int) -> dict[str, Any]:
    return {
        "round": k, "sampled": 3, "replied": 3, "failed": 0,
        "uplink_bytes": 1000 * k, "downlink_bytes": 2000, "predicted_uplink_bytes": 1000 * k,
        "predicted_downlink_bytes": 2000, "train_loss": 1.0 / k, "eval_loss": 1.1 / k,
        "eval_accuracy": 0.5 + 0.1 * k,
        "extra": {"catchup_bytes": 100 * k, "rejected": k % 2, "resyncs": 0},
    }  # fmt: skip


def test_a_running_run_gains_a_point_when_a_round_is_appended(
    service: LiveService, simulated: tuple[str, list[dict[str, Any]]], tab: Tab
) -> None:
    from api.store import open_store

    _, token = open_store(simulated[0]).create_token("dashboard test", scope="writer")
    http = httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {token}"})
    body = {"strategy": "artemis", "uplink_compressor": "sq:s=1", "downlink_compressor": "none",
            "task": "synthetic-logreg", "config": {"run-name": HOSTILE_NAME}}  # fmt: skip
    created = http.post("/runs", json=body)
    assert created.status_code == 201, created.text
    run_id = created.json()["id"]
    for k in (1, 2):
        assert http.post(f"/runs/{run_id}/rounds", json=_round(k)).status_code == 201

    tab.open(f"{service.url}/#/run/{run_id}")
    page = tab.page
    assert _figure(tab, "accuracy-round").get_attribute("data-points") == "2"
    assert "running" in page.locator("#live-status").inner_text()
    # the run's name is user data: shown as text, never parsed as HTML
    assert page.locator("h1").inner_text().startswith(HOSTILE_NAME)
    assert page.locator("main img, main b").count() == 0
    assert page.title() == "fedsqueeze dashboard"

    assert http.post(f"/runs/{run_id}/rounds", json=_round(3)).status_code == 201
    for name in RUN_CHARTS:  # the page polls: every chart gains the third round
        page.wait_for_selector(f"figure[data-chart='{name}'][data-points='3']", state="attached")
    assert _figure(tab, "bytes-round").get_attribute("data-series-points") == "3,3,3"
    assert page.locator("#run-summary dd[data-field='rounds']").inner_text() == "3"
    tab.shot("run-live")

    assert http.post(f"/runs/{run_id}/finish", json={"status": "finished"}).status_code == 200
    page.wait_for_selector("#run-summary dd[data-field='status']:text-is('finished')")
    assert page.locator("#live-status").inner_text() == ""

    tab.open(f"{service.url}/#/runs")
    row = page.locator(f"#runs-table tbody tr[data-run-id='{run_id}']")
    assert HOSTILE_NAME in row.inner_text()
    assert page.locator("main img, main b").count() == 0
    # the open runs table picks up a run started after it loaded (it polls, no reload)
    later = http.post("/runs", json=body | {"config": {"run-name": "started later"}})
    assert later.status_code == 201, later.text
    page.wait_for_selector(f"#runs-table tbody tr[data-run-id='{later.json()['id']}']")
    assert http.post(
        f"/runs/{later.json()['id']}/finish", json={"status": "interrupted"}
    ).is_success
    tab.assert_clean()


def test_compare_page_draws_two_runs_chosen_in_the_runs_table(
    service: LiveService, simulated: tuple[str, list[dict[str, Any]]], tab: Tab
) -> None:
    _, runs = simulated
    tab.open(service.url + "/#/runs")
    for run in runs:
        tab.page.check(f"input[type=checkbox][data-run='{run['id']}']")
    tab.page.click("#compare-selected")
    tab.page.wait_for_url(re.compile(r"#/compare\?ids="))
    tab.ready()
    assert tab.page.url.endswith("ids=" + ",".join(str(r["id"]) for r in runs))
    both = ",".join([str(ROUNDS)] * len(runs))
    for name in ("compare-accuracy-bytes", "compare-loss-bytes", "compare-accuracy-round"):
        figure = _figure(tab, name)
        assert figure.get_attribute("data-series-points") == both, name
        assert figure.locator("canvas").count() == 1
        legend = figure.locator(".u-legend").inner_text()
        assert all(s in legend for s in STRATEGIES), legend
    tab.shot("compare")
    tab.assert_clean()


def test_clients_page_shows_enrolled_clients_and_their_participation(
    service: LiveService, simulated: tuple[str, list[dict[str, Any]]], tab: Tab
) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from api.store import open_store

    _, runs = simulated
    node_id = httpx.get(f"{service.url}/runs/{runs[0]['id']}/rounds/1").json()["clients"][0][
        "node_id"
    ]
    _, admin = open_store(simulated[0]).create_token("dashboard admin", scope="admin")
    pem = (
        ec.generate_private_key(ec.SECP384R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    enrolled = httpx.post(
        f"{service.url}/clients",
        json={"name": "edge-1", "location": "lab", "public_key_pem": pem, "node_id": node_id},
        headers={"Authorization": f"Bearer {admin}"},
    )
    assert enrolled.status_code == 201, enrolled.text
    client = enrolled.json()
    part = httpx.get(f"{service.url}/clients/{client['id']}").json()["participation"]
    assert part["rounds"] >= 1

    tab.open(service.url + "/#/clients")
    row = tab.page.locator(f"#clients-table tbody tr[data-client-id='{client['id']}']")
    cells = row.locator("td").all_inner_texts()
    assert cells[1] == "edge-1" and cells[3] == str(node_id) and cells[4] == "active"
    assert cells[7:10] == [str(part["rounds"]), str(part["ok"]), str(part["failed"])]
    tab.shot("clients")
    tab.assert_clean()


def test_reads_that_need_a_token_ask_for_it_once_per_tab(
    simulated: tuple[str, list[dict[str, Any]]],
    browser: Any,
    artefacts: Path,
    tmp_path: Path,
) -> None:
    from api.store import open_store

    url, runs = simulated
    _, reader = open_store(url).create_token("dashboard reader", scope="reader")
    # a non-loopback bind: reads need a reader token (the browser dials 127.0.0.1)
    service = LiveService(url, tmp_path / "home", host="0.0.0.0")
    context = browser.new_context(viewport={"width": 1300, "height": 900})
    try:
        service.start()
        assert httpx.get(service.url + "/runs").status_code == 401
        tab = Tab(context, artefacts)
        page = tab.page
        page.goto(service.url + "/#/runs")
        page.wait_for_selector("#token-form", state="visible")
        tab.shot("token-form")
        page.fill("#token-input", "not-a-token")
        page.click("#token-form button[type=submit]")
        page.wait_for_selector("#token-error:text('The token was refused')")
        page.fill("#token-input", reader)
        page.click("#token-form button[type=submit]")
        tab.ready()
        for run in runs:
            assert page.locator(f"#runs-table tbody tr[data-run-id='{run['id']}']").count() == 1
        assert page.locator("#token-form").is_hidden()
        tab.shot("runs-with-token")
        assert reader not in page.content()  # kept in sessionStorage, never in the page
        page.reload()  # the same tab keeps it for its session
        tab.ready()
        assert page.locator("#runs-table tbody tr").count() >= len(runs)
        tab.assert_clean(allowed=r"status of 401")
        other = Tab(context, artefacts)  # a new tab has its own session: it asks again
        other.page.goto(service.url + "/#/runs")
        other.page.wait_for_selector("#token-form", state="visible")
    finally:
        context.close()
        service.stop()
