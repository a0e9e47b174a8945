"""Imports run one way between the project's packages (README, "Layout").

    compression/  imports no other package of the project
    tasks/        core/ at most (nothing of the algorithms)
    strategies/   compression/, core/ (and Flower)
    client/       strategies/, compression/, tasks/, core/ (never server/ or api/)
    api/          core/ only, and no torch
    core/         nothing of the project; no torch, Flower, web or SQL library
    server/, benchmarks/   anything

The first test walks the syntax tree of every module (imports at module level and inside
functions, ``import x`` and ``from x import y``, relative ones resolved, literal
``importlib.import_module("x")``) and names the file, the line and the forbidden import.
The others start fresh processes: every module of api/ is imported, and the REST service
(`fedsqueeze api serve`) stores and serves a run, where torch cannot be imported; the
ClientApp (the edge device's footprint) is imported and must not pull in the web service
or the SQL store.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

#: the web service and SQL store libraries (what an edge device must not need)
WEB_AND_SQL = frozenset(
    {"fastapi", "starlette", "uvicorn", "sqlalchemy", "alembic", "psycopg", "psycopg2"}
)

#: project package → the other project packages it may import (None: any)
ALLOWED_PACKAGES: dict[str, frozenset[str] | None] = {
    "core": frozenset(),
    "compression": frozenset(),
    "tasks": frozenset({"core"}),
    "strategies": frozenset({"compression", "core"}),
    "client": frozenset({"strategies", "compression", "tasks", "core"}),
    "api": frozenset({"core"}),
    "migrations": frozenset({"api", "core"}),  # the Alembic environment of the store
    "examples": frozenset({"tasks", "core"}),  # a user's own task
    "server": None,
    "benchmarks": None,
}

#: project package → third-party libraries it must not import
FORBIDDEN_LIBRARIES: dict[str, frozenset[str]] = {
    "core": frozenset({"torch", "flwr", "pydantic"}) | WEB_AND_SQL,
    "compression": frozenset({"flwr", "httpx"}) | WEB_AND_SQL,  # knows nothing of Flower
    "tasks": WEB_AND_SQL,
    "strategies": frozenset({"httpx"}) | WEB_AND_SQL,  # knows nothing of HTTP
    "client": WEB_AND_SQL,
    "api": frozenset({"torch"}),
}


@dataclass(frozen=True)
class Import:
    path: Path  # relative to the root
    line: int
    module: str  # absolute dotted name

    @property
    def top(self) -> str:
        return self.module.split(".")[0]


def project_packages(root: Path) -> list[str]:
    """Top-level folders of `root` holding Python modules (tests/ and scripts/ aside)."""
    return sorted(
        p.name
        for p in root.iterdir()
        if p.is_dir()
        and not p.name.startswith(".")
        and p.name not in ("tests", "scripts")
        and any(p.rglob("*.py"))
    )


def _literal_import_module(call: ast.Call) -> str | None:
    """The name in ``importlib.import_module("a.b")`` / ``import_module("a.b")``, when literal."""
    func = call.func
    called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    if called == "import_module" and call.args:
        first = call.args[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            return first.value
    return None


def imports_of(path: Path, root: Path) -> list[Import]:
    """Every import in the module at `path`, wherever it stands in the module."""
    rel = path.relative_to(root)
    package = list(rel.parent.parts)  # the package the module belongs to
    found: list[Import] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                names = [node.module or ""]
            else:  # `from . import x`, `from ..pkg import y`
                base = package[: len(package) - node.level + 1]
                names = [".".join([*base, *([node.module] if node.module else [])])]
        elif isinstance(node, ast.Call) and (literal := _literal_import_module(node)):
            names = [literal]
        else:
            continue
        found += [Import(rel, node.lineno, name) for name in names if name]
    return found


def layer_violations(root: Path) -> list[str]:
    """One line per forbidden import under `root`: ``file:line: what (why)``."""
    packages = project_packages(root)
    unruled = [p for p in packages if p not in ALLOWED_PACKAGES]
    out = [f"{p}/: a package without a rule in tests/test_layers.py" for p in unruled]
    for package in packages:
        allowed = ALLOWED_PACKAGES.get(package)
        banned = FORBIDDEN_LIBRARIES.get(package, frozenset())
        for path in sorted((root / package).rglob("*.py")):
            for imp in imports_of(path, root):
                where = f"{imp.path}:{imp.line}: {package}/ imports {imp.module}"
                if imp.top in packages and imp.top != package:
                    if allowed is not None and imp.top not in allowed:
                        may = ", ".join(f"{p}/" for p in sorted(allowed)) or "no other package"
                        out.append(f"{where} ({package}/ may import {may})")
                elif imp.top in banned:
                    out.append(f"{where} ({package}/ must not import {imp.top})")
    return out


def test_imports_run_one_way() -> None:
    violations = layer_violations(REPO_ROOT)
    assert not violations, "forbidden imports:\n" + "\n".join(violations)


def test_the_layer_check_finds_forbidden_imports(tmp_path: Path) -> None:
    """The walk sees imports inside functions, relative ones and literal import_module calls,
    and names file, line and import."""
    files = {
        "core/__init__.py": "",
        "core/ok.py": "import json\n",
        "core/bad.py": "from flwr.app import Message\n",
        "client/__init__.py": "",
        "client/app.py": "import core.ok\n\n\ndef f():\n    from server.config import x\n",
        "api/__init__.py": "",
        "api/app.py": "import importlib\n\nimportlib.import_module('torch.nn')\n",
        "server/__init__.py": "",
        "server/deploy/__init__.py": "",
        "server/deploy/x.py": "from ..config import y\nimport api.app\n",
        "tasks/__init__.py": "",
        "tasks/t.py": "\nfrom strategies import registry\n",
        "strategies/__init__.py": "",
        "widgets/__init__.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    found = layer_violations(tmp_path)
    assert found == [
        "widgets/: a package without a rule in tests/test_layers.py",
        "api/app.py:3: api/ imports torch.nn (api/ must not import torch)",
        "client/app.py:5: client/ imports server.config "
        "(client/ may import compression/, core/, strategies/, tasks/)",
        "core/bad.py:1: core/ imports flwr.app (core/ must not import flwr)",
        "tasks/t.py:2: tasks/ imports strategies (tasks/ may import core/)",
    ]
    rel = imports_of(tmp_path / "server/deploy/x.py", tmp_path)
    assert [i.module for i in rel] == ["server.config", "api.app"]


def _run_python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`code` in a fresh interpreter at the repository root."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.fixture
def torchless_env(tmp_path: Path) -> dict[str, str]:
    """An environment whose Python cannot import torch: a ``torch`` package that raises
    ModuleNotFoundError comes first on PYTHONPATH (child processes inherit it)."""
    shadow = tmp_path / "no-torch"
    (shadow / "torch").mkdir(parents=True)
    (shadow / "torch" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'torch' (hidden by tests/test_layers.py)\", "
        "name='torch')\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shadow), env.get("PYTHONPATH")]))
    return env


def test_every_api_module_imports_without_torch(torchless_env: dict[str, str]) -> None:
    """Every module of api/ imports, and the REST app is built, where torch is missing."""
    code = """
    import importlib, json, pkgutil, sys

    try:
        import torch  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("torch is still importable")

    import api
    for info in pkgutil.walk_packages(api.__path__, "api."):
        importlib.import_module(info.name)

    from api.app import create_app
    from api.settings import Settings

    create_app(Settings(database_url="sqlite://"))
    print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
    """
    done = _run_python(code, torchless_env)
    assert done.returncode == 0, done.stderr[-4000:]
    loaded = set(json.loads(done.stdout.strip().splitlines()[-1]))
    assert {"api", "fastapi", "sqlalchemy"} <= loaded and "torch" not in loaded
    project = set(ALLOWED_PACKAGES) & loaded
    assert project <= {"api", "core", "migrations"}, project


@pytest.mark.slow
def test_rest_service_records_a_run_without_torch(
    torchless_env: dict[str, str], tmp_path: Path
) -> None:
    """`fedsqueeze api serve` (real uvicorn) stores and serves a run and a round over HTTP
    in a process where torch cannot be imported."""
    import httpx
    from conftest import LiveService

    from api.store import open_store
    from core.records import RoundRecord, RunInfo, to_jsonable

    url = f"sqlite:///{tmp_path / 'store.db'}"
    extra = {"PYTHONPATH": torchless_env["PYTHONPATH"]}
    service = LiveService(url, tmp_path / "home", env=extra)
    service.start()
    try:
        _, token = open_store(url).create_token("admin", admin=True)
        info = RunInfo("artemis", "qsgd:s=1", "identity", "synthetic-lsq", {"seed": 0})
        record = RoundRecord(1, sampled=2, replied=2, failed=0, uplink_bytes=10,
                             downlink_bytes=20, predicted_uplink_bytes=10,
                             predicted_downlink_bytes=20, eval_accuracy=0.5)  # fmt: skip
        auth = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=service.url, headers=auth, timeout=30) as http:
            assert http.get("/ready").json()["status"] == "ready"
            run = http.post("/runs", json=to_jsonable(info))
            assert run.status_code == 201, run.text
            run_id = run.json()["id"]
            stored = http.post(f"/runs/{run_id}/rounds", json=to_jsonable(record))
            assert stored.status_code == 201, stored.text
            summary = http.get(f"/runs/{run_id}").json()["summary"]
        assert summary["rounds_done"] == 1 and summary["best_eval_accuracy"] == 0.5
    finally:
        service.stop()
    assert "hidden by tests/test_layers.py" not in service.log_path.read_text()


def test_client_app_needs_no_server_or_store() -> None:
    """The ClientApp's imports are what an edge device installs: no web service, no SQL
    store, none of server/ or api/."""
    code = """
    import json, sys

    import client.app  # noqa: F401

    print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
    """
    done = _run_python(code)
    assert done.returncode == 0, done.stderr[-4000:]
    loaded = set(json.loads(done.stdout.strip().splitlines()[-1]))
    assert "flwr" in loaded and "torch" in loaded  # it did import the ClientApp
    assert not loaded & WEB_AND_SQL, sorted(loaded & WEB_AND_SQL)
    assert not loaded & {"server", "api"}, sorted(loaded & {"server", "api"})
