"""`fedsqueeze simulate`: run the Flower app of this repository in Flower's simulation engine.

What it does, step by step (flwr 1.42), and the module that does each step:

1. Reads the app's run-config defaults from ``[tool.flwr.app.config]`` of the app's
   pyproject.toml and merges the friendly flags (``--strategy``, ``--rounds``, ...) and raw
   ``--run-config "key=value ..."`` overrides into one checked override set: unknown keys
   and values of the wrong type are refused here with a clear message (Flower itself would
   silently drop an unknown key). (`server.app_dir`; `build_specs` here.)
2. Starts its own SuperLink (``flower-superlink --simulation``) on a free port with its own
   ``FLWR_HOME`` (a temporary directory unless ``--flwr-home`` is given) holding a
   ``config.toml`` whose one SuperLink connection points at that port, and with runtime
   dependency installation disabled. Nothing touches ``~/.flwr`` or the shared port 39091
   of Flower's lazily started local SuperLink, so several simulations (and tests) can run
   side by side. (`server.local_superlink`.)
3. Submits each run with ``flwr run <app> fedsqueeze --run-config ... --federation-config
   num-supernodes=N ...``, streams its log with ``flwr log RUN --stream`` into a file, and
   shows a progress bar over rounds with the latest loss, accuracy and bytes read from the
   round-history store as the ServerApp records them (rounds counted from the log when no
   store is readable). (`server.simulation_run`, which uses `server.log_follower`,
   `server.store_watchers` and `server.memory_sampler`; the progress bar is here.)
4. Stops the SuperLink it started (by PID, then any of its descendants still alive) at the
   end, on error and on Ctrl-C (after asking the SuperLink to stop the run).

Several ``--strategy`` flags run one simulation per strategy on the same SuperLink, one
after the other, and end with a side-by-side table (`server.results_table`).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import typer

from core.runconfig import STORE_URL_ENV
from core.secrets import redact_text
from server.app_dir import (
    AppInfo,
    ConfigValue,
    SimulationError,
    check_overrides,
    check_run_config,
    parse_raw_overrides,
    read_app,
)
from server.local_superlink import LocalSuperLink
from server.results_table import format_bytes, format_optional, results_table
from server.simulation_run import RunSpec, SimulationResult, run_one
from server.store_watchers import RoundRow

#: friendly option name -> run-config key of the app
FRIENDLY_KEYS: dict[str, str] = {
    "strategy": "strategy",
    "uplink": "uplink",
    "downlink": "downlink",
    "rounds": "num-server-rounds",
    "participation": "participation",
    "task": "task",
    "partitioning": "partitioning",
    "alpha": "dirichlet-alpha",
    "data_dir": "data-dir",
    "local_steps": "local-steps",
    "batch_size": "batch-size",
    "server_lr": "server-lr",
    "client_lr": "client-lr",
    "seed": "seed",
    "device": "device",
}


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C so the SuperLink is stopped either way."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_simulations(
    app: AppInfo,
    specs: Sequence[RunSpec],
    *,
    flwr_home: Path | None = None,
    console: Any = None,
    show_progress: bool = True,
    keep_flwr_home: bool = False,
    database_url: str | None = None,
) -> list[SimulationResult]:
    """Run every spec, one after the other, on one SuperLink this call starts and stops.

    With `flwr_home` None a temporary FLWR_HOME is used; it is removed afterwards when
    every run completed (kept, and its path printed, otherwise). `database_url` (else
    ``$DATABASE_URL``, else the default SQLite store) reaches the ServerApp as
    ``$DATABASE_URL`` of the SuperLink's environment, which its processes inherit: it is
    never part of a run config, so Flower neither stores nor shows it.
    """
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console(stderr=True)
    temporary = flwr_home is None
    home = (
        Path(flwr_home).expanduser()
        if flwr_home is not None
        else Path(tempfile.mkdtemp(prefix="fedsqueeze-flwr-"))
    )
    home.mkdir(parents=True, exist_ok=True)
    log_dir = home / "logs"
    results: list[SimulationResult] = []
    superlink = LocalSuperLink(
        home, extra_env={STORE_URL_ENV: database_url} if database_url else None
    )
    success = False
    try:
        with _sigterm_as_interrupt():
            console.print(f"[bold]Starting a local SuperLink[/] (FLWR_HOME={home})")
            superlink.start()
            console.print(f"SuperLink up on {superlink.address} (pid {superlink.pid})")
            for spec in specs:
                merged = {**app.run_config, **spec.overrides}
                total = int(merged.get("num-server-rounds", 0) or 0) or None
                desc = f"{spec.label}"
                with Progress(
                    TextColumn("[bold blue]{task.description}"),
                    BarColumn(),
                    TextColumn("round {task.completed}/{task.total}"),
                    TextColumn("{task.fields[metrics]}"),
                    TimeElapsedColumn(),
                    console=console,
                    disable=not show_progress,
                    transient=False,
                ) as progress:
                    task_id = progress.add_task(desc, total=total, metrics="starting...")

                    def on_progress(
                        done: int, latest: RoundRow | None, _t: Any = task_id, _p: Any = progress
                    ) -> None:
                        metrics = "running"
                        if latest is not None:
                            metrics = (
                                f"loss {format_optional(latest.train_loss, '.4f')}  "
                                f"acc {format_optional(latest.eval_accuracy, '.3f')}  "
                                f"up {format_bytes(latest.uplink_bytes)}  "
                                f"down {format_bytes(latest.downlink_bytes)}"
                            )
                        _p.update(_t, completed=done, metrics=metrics)

                    result = run_one(superlink, app, spec, log_dir, on_progress)
                results.append(result)
                if not result.ok:
                    console.print(
                        f"[red]run {result.flower_run_id} ({spec.label}) ended with status "
                        f"{result.status}[/]; log: {result.log_path}"
                    )
                    with contextlib.suppress(OSError):
                        tail = Path(result.log_path).read_text(encoding="utf-8").splitlines()
                        console.print(
                            redact_text("\n".join(tail[-30:])), markup=False, highlight=False
                        )
        success = bool(results) and all(r.ok for r in results)
    finally:
        pid = superlink.pid
        superlink.stop()
        if pid is not None:
            console.print(f"SuperLink stopped (pid {pid})")
        if temporary and success and not keep_flwr_home:
            shutil.rmtree(home, ignore_errors=True)
        elif not success:
            console.print(f"Logs kept in {home}")
    return results


def check_store_url(url: str | None) -> str | None:
    """`url` checked as a round-history store (``jsonl:PATH`` or a database URL the store
    accepts); None stays None (the ServerApp then uses ``$DATABASE_URL`` or the default)."""
    if url is None:
        return None
    if url.startswith("jsonl:"):
        if not url.removeprefix("jsonl:").strip():
            raise SimulationError("--database-url jsonl:PATH needs a path")
        return url
    from api.settings import normalize_database_url

    try:
        normalize_database_url(url)
    except ValueError:
        raise SimulationError(
            f"--database-url {redact_text(url)!r}: use sqlite:///PATH, "
            "postgresql://USER@HOST/DB or jsonl:PATH"
        ) from None
    return url


def build_specs(
    app: AppInfo,
    strategies: Sequence[str],
    friendly: dict[str, Any],
    raw: Sequence[str],
    clients: int | None,
    cpus_per_client: int,
    timeout_s: float,
) -> list[RunSpec]:
    """Checked run specs: one per strategy (or one with the app's default strategy)."""
    overrides: dict[str, ConfigValue] = {}
    for option, value in friendly.items():
        if value is None:
            continue
        key = FRIENDLY_KEYS[option]
        if key not in app.run_config:
            raise SimulationError(
                f"--{option.replace('_', '-')}: this app has no run-config key {key!r}"
            )
        overrides[key] = value
    overrides.update(parse_raw_overrides(raw))
    if clients is not None:
        if clients < 1:
            raise SimulationError(f"--clients must be >= 1, got {clients}")
        if "num-partitions" in app.run_config:
            overrides["num-partitions"] = clients
    overrides = check_overrides(app.run_config, overrides)
    num_supernodes = clients or int(overrides.get("num-partitions", 0) or 0) or app.num_supernodes
    if cpus_per_client <= 0:
        raise SimulationError(f"--cpus-per-client must be > 0, got {cpus_per_client}")
    labels = list(dict.fromkeys(strategies))
    if not labels:
        default = app.run_config.get("strategy")
        labels = [str(overrides.get("strategy", default if default is not None else "default"))]
        per_run = [overrides]
    else:
        if "strategy" not in app.run_config:
            raise SimulationError("--strategy: this app has no run-config key 'strategy'")
        per_run = [check_overrides(app.run_config, {**overrides, "strategy": s}) for s in labels]
    for o in per_run:
        check_run_config({**app.run_config, **o}, num_supernodes, app.path)
    return [
        RunSpec(
            label=label,
            overrides=o,
            num_supernodes=num_supernodes,
            cpus_per_client=cpus_per_client,
            timeout_s=timeout_s,
        )
        for label, o in zip(labels, per_run, strict=True)
    ]


def resume_spec(
    app: AppInfo,
    run_id: int,
    database_url: str | None,
    clients: int | None,
    cpus_per_client: int,
    timeout_s: float,
) -> RunSpec:
    """The spec that resumes store run `run_id`: its stored run config, ``resume-run`` set
    (the ServerApp then restores its checkpoint). Checked before anything starts."""
    from server.checkpoints import ResumeError, stored_run_to_resume

    try:
        config, _path = stored_run_to_resume(database_url, run_id)
    except ResumeError as exc:
        raise SimulationError(str(exc)) from None
    overrides: dict[str, ConfigValue] = {k: v for k, v in config.items() if k in app.run_config}
    overrides.update({"resume-run": run_id, "test-server-exit": 0})
    overrides = check_overrides(app.run_config, overrides)
    if cpus_per_client <= 0:
        raise SimulationError(f"--cpus-per-client must be > 0, got {cpus_per_client}")
    partitions = int(overrides.get("num-partitions", 0) or 0)
    num_supernodes = clients or (partitions if partitions > 0 else app.num_supernodes)
    check_run_config({**app.run_config, **overrides}, num_supernodes, app.path)
    return RunSpec(
        label=str(overrides.get("strategy", "resumed")),
        overrides=overrides,
        num_supernodes=num_supernodes,
        cpus_per_client=cpus_per_client,
        timeout_s=timeout_s,
    )


def simulate(
    strategy: list[str] = typer.Option(
        [],
        "--strategy",
        "-s",
        help="Algorithm (run-config 'strategy'), e.g. artemis, mcm, sgd, flwr-fedavg. "
        "Repeat to run several one after the other and compare them.",
    ),
    uplink: str | None = typer.Option(
        None, help="Uplink compressor spec (run-config 'uplink'), e.g. 'qsgd:s=1,bucket=4096'."
    ),
    downlink: str | None = typer.Option(
        None, help="Downlink compressor spec (run-config 'downlink')."
    ),
    rounds: int | None = typer.Option(
        None, "--rounds", "-r", min=1, help="Number of rounds (run-config 'num-server-rounds')."
    ),
    clients: int | None = typer.Option(
        None,
        "--clients",
        "-n",
        min=1,
        help="Number of simulated clients (SuperNodes); also the number of data partitions. "
        "Default: the app's num-partitions, else 20.",
    ),
    participation: float | None = typer.Option(
        None, "--participation", "-p", help="Participation probability p (run-config)."
    ),
    task: str | None = typer.Option(
        None,
        help="Task: fashion-mnist, synthetic-lsq, synthetic-logreg or 'package.module:factory'.",
    ),
    partitioning: str | None = typer.Option(
        None, help="Data partitioning of the task: dirichlet or iid."
    ),
    alpha: float | None = typer.Option(
        None, "--alpha", help="Dirichlet concentration α of the non-i.i.d. partition."
    ),
    data_dir: str | None = typer.Option(None, help="Data directory of the task."),
    local_steps: int | None = typer.Option(None, help="Local steps K per round."),
    batch_size: int | None = typer.Option(None, help="Client batch size."),
    server_lr: float | None = typer.Option(None, help="Server learning rate γ."),
    client_lr: float | None = typer.Option(None, help="Client learning rate η."),
    seed: int | None = typer.Option(None, help="Random seed."),
    device: str | None = typer.Option(None, help="Client device: auto, cpu, cuda, cuda:1 ..."),
    database_url: str | None = typer.Option(
        None,
        help="Round-history store URL (sqlite:///..., postgresql://..., jsonl:PATH); "
        "default: $DATABASE_URL, else the SQLite file under $FEDSQUEEZE_HOME (~/.fedsqueeze). "
        "The ServerApp gets it as $DATABASE_URL of the SuperLink's environment, never in "
        "the run config (which Flower stores and shows).",
    ),
    run_config: list[str] = typer.Option(
        [],
        "--run-config",
        "-c",
        help='Raw run-config overrides "key=value ..." (TOML values); repeatable; '
        "applied after the flags above.",
    ),
    cpus_per_client: int = typer.Option(
        1, min=1, help="CPU cores reserved per simulated client (Ray); fewer = more in parallel."
    ),
    timeout: float = typer.Option(
        0.0, min=0.0, help="Stop a run that takes longer than this many seconds (0 = never)."
    ),
    app_dir: Path | None = typer.Option(
        None, help="Flower app directory (default: this repository)."
    ),
    flwr_home: Path | None = typer.Option(
        None,
        help="FLWR_HOME for the SuperLink and the flwr CLI (kept afterwards). "
        "Default: a temporary directory, removed when every run completed.",
    ),
    json_out: Path | None = typer.Option(
        None, "--json", help="Write the results (one record per run, every round) here."
    ),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars."),
    resume: int | None = typer.Option(
        None,
        "--resume",
        help="Resume store run RUN after a crash of its ServerApp, from its last checkpoint "
        "(same run id; run config taken from the stored run; give the same --database-url).",
        metavar="RUN",
    ),
) -> None:
    """Run the federated app in Flower's simulation engine on a local SuperLink."""
    from rich.console import Console
    from rich.markup import escape

    console = Console()
    errors = Console(stderr=True, soft_wrap=True)  # one line per error, on stderr
    friendly = {
        "uplink": uplink,
        "downlink": downlink,
        "rounds": rounds,
        "participation": participation,
        "task": task,
        "partitioning": partitioning,
        "alpha": alpha,
        "data_dir": data_dir,
        "local_steps": local_steps,
        "batch_size": batch_size,
        "server_lr": server_lr,
        "client_lr": client_lr,
        "seed": seed,
        "device": device,
    }
    try:
        store_url = check_store_url(database_url)
        app = read_app(app_dir)
        if resume is not None:
            given = [f"--{k.replace('_', '-')}" for k, v in friendly.items() if v is not None]
            given += ["--strategy"] * bool(strategy) + ["--run-config"] * bool(run_config)
            given = [g for g in given if g != "--database-url"]
            if given:
                raise SimulationError(
                    f"--resume takes the run config from the stored run; drop {', '.join(given)}"
                )
            specs = [resume_spec(app, resume, database_url, clients, cpus_per_client, timeout)]
        else:
            specs = build_specs(
                app, strategy, friendly, run_config, clients, cpus_per_client, timeout
            )
    except SimulationError as exc:
        errors.print(f"[red]error:[/] {escape(redact_text(str(exc)))}", highlight=False)
        raise typer.Exit(2) from None
    try:
        results = run_simulations(
            app,
            specs,
            flwr_home=flwr_home,
            console=console,
            show_progress=not no_progress,
            database_url=store_url,
        )
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: run stopped, SuperLink stopped[/]")
        raise typer.Exit(130) from None
    except SimulationError as exc:
        errors.print(f"[red]error:[/] {escape(redact_text(str(exc)))}", highlight=False)
        raise typer.Exit(1) from None
    console.print(results_table(results))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(
            json.dumps([r.to_json() for r in results], indent=2, default=str), encoding="utf-8"
        )
        console.print(f"results written to {json_out}")
    if not all(r.ok for r in results):
        raise typer.Exit(1)
