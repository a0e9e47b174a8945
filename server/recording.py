"""`JsonlRecorder`: the ServerApp's recorder for a file instead of a database.

``DATABASE_URL=jsonl:PATH`` makes the ServerApp append one JSON object per event to PATH
(`fedsqueeze simulate --database-url jsonl:PATH` follows that file). The record types and the
`Recorder` interface it implements live in the neutral `core.records`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.records import Recorder, RoundRecord, RunInfo, to_jsonable, utcnow


class JsonlRecorder(Recorder):
    """Appends one JSON object per event to a file (no database needed)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._next_id = 1

    def _write(self, event: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(to_jsonable(event)) + "\n")

    def start_run(self, info: RunInfo) -> int:
        run_id = self._next_id
        self._next_id += 1
        self._write({"event": "start_run", "run_id": run_id, "info": info})
        return run_id

    def record_round(self, run_id: int, record: RoundRecord) -> None:
        self._write({"event": "round", "run_id": run_id, "record": record})

    def finish_run(self, run_id: int, status: str) -> None:
        self._write({"event": "finish_run", "run_id": run_id, "status": status, "at": utcnow()})
