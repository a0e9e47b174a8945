"""`HttpRecorder`: the `core.records.Recorder` that writes to a remote REST service.

For a ServerApp on another host than the store: each call is one POST (``/runs``,
``/runs/{id}/rounds``, ``/runs/{id}/finish``) with a bearer token; each round is stored
in one transaction on the service side. Transient connection errors are retried.

The token is a ``writer`` (or ``admin``) token: it becomes the owner of the runs it
starts, and only it (or a writer token bound to the run) may append to or finish them. A
refused write (403, 409, 422) raises `RecorderHttpError`.
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from core.records import Recorder, RoundRecord, RunInfo, to_jsonable


class RecorderHttpError(RuntimeError):
    """The REST service refused a write (the message carries its error body)."""


class HttpRecorder(Recorder):
    def __init__(self, url: str, token: str, *, timeout_s: float = 30.0, retries: int = 3) -> None:
        if not token:
            raise ValueError("HttpRecorder needs an API token (fedsqueeze api token create)")
        self.url = url.rstrip("/")
        self.retries = retries
        self._client = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout_s,
        )

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        for attempt in range(self.retries + 1):
            try:
                response = self._client.post(path, json=body)
            except httpx.TransportError as exc:
                if attempt == self.retries:
                    raise RecorderHttpError(f"cannot reach {self.url}{path}: {exc}") from exc
                time.sleep(0.2 * 2**attempt)
                continue
            if response.status_code == 409 and attempt > 0 and path.endswith("/rounds"):
                return {}  # an earlier attempt was stored; its reply was lost
            if response.status_code >= 400:
                raise RecorderHttpError(
                    f"POST {path} -> {response.status_code}: {response.text[:1000]}"
                )
            result: dict[str, Any] = response.json()
            return result
        raise AssertionError("unreachable")

    def start_run(self, info: RunInfo) -> int:
        return int(self._post("/runs", to_jsonable(info))["id"])

    def record_round(self, run_id: int, record: RoundRecord) -> None:
        self._post(f"/runs/{run_id}/rounds", to_jsonable(record))

    def finish_run(self, run_id: int, status: str) -> None:
        self._post(f"/runs/{run_id}/finish", {"status": status})

    def close(self) -> None:
        self._client.close()
