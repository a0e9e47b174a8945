"""Property-based fuzzing of the OpenAPI schema (schemathesis) against the live service.

Every operation gets generated requests, positive (valid by the schema) and negative, with
an admin token, on SQLite and PostgreSQL; no response may be a 5xx, and each must match the
documented schema and status codes. `FSQ_FUZZ_EXAMPLES`: examples per operation (default 30).
"""

from __future__ import annotations

import os

import httpx
import pytest
import schemathesis
from conftest import LiveService
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from api.store import open_store

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("FSQ_FUZZ_EXAMPLES", "30"))


def test_fuzz_openapi_finds_no_server_errors(live_service: LiveService) -> None:
    store = open_store(live_service.database_url)
    _, token = store.create_token("fuzz", admin=True)
    headers = {"Authorization": f"Bearer {token}"}
    # some state for the read endpoints to find
    run = httpx.post(
        live_service.url + "/runs",
        headers=headers,
        json={"strategy": "artemis", "uplink_compressor": "sq", "downlink_compressor": "sq",
              "task": "t", "num_parameters": 10},
    ).json()  # fmt: skip
    for t in (0, 1, 2):
        httpx.post(
            f"{live_service.url}/runs/{run['id']}/rounds",
            headers=headers,
            json={"round": t, "sampled": 1, "replied": 1, "failed": 0, "uplink_bytes": 5,
                  "downlink_bytes": 5, "predicted_uplink_bytes": 5, "predicted_downlink_bytes": 5,
                  "clients": [{"node_id": 1, "outcome": "ok"}]},
        ).raise_for_status()  # fmt: skip

    schema = schemathesis.openapi.from_url(live_service.url + "/openapi.json")
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), f"invalid operation in the schema: {result}"
        operations.append(result.ok())
    assert len(operations) >= 13
    tested = []
    statuses: dict[int, int] = {}
    runs = [(op, mode) for op in operations for mode in schemathesis.GenerationMode]
    for operation, mode in runs:

        @given(case=operation.as_strategy(mode))
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def fuzz(case: schemathesis.Case) -> None:
            response = case.call_and_validate(
                base_url=live_service.url, headers=headers, checks=checks
            )
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        try:
            fuzz()
        except Unsatisfiable:
            # no invalid request exists for an operation without inputs (e.g. GET /health)
            assert mode is schemathesis.GenerationMode.NEGATIVE
            assert not operation.path_parameters and not operation.query and not operation.body
            continue
        tested.append(f"{operation.label} ({mode.value})")
    assert len(tested) >= 2 * len(operations) - 2
    print("responses by status:", dict(sorted(statuses.items())))
    # both accepted and rejected requests were exercised
    assert sum(statuses.values()) >= 2 * len(operations) * min(EXAMPLES, 10)
    assert statuses.get(200, 0) + statuses.get(201, 0) > 0 and statuses.get(422, 0) > 0
    assert httpx.get(live_service.url + "/health").status_code == 200
