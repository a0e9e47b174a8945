"""Fast tests of the deployment pieces that need no running SuperLink: certificates, keys,
bundles, the SuperNode command line, run-config rendering and the fast-poll schedule."""

from __future__ import annotations

import ipaddress
import json
import ssl
import stat
import tarfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import Message, Metadata, RecordDict
from flwr.app.message.message import make_message
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from client.enroll import BundleInfo, open_bundle, write_bundle
from client.supernode import node_config, supernode_command
from core.keys import NodeKeyPair, fingerprint, load_public_key
from server.deploy.certs import certificate_names, ensure_tls, install_tls, make_ca
from server.deploy.launcher import ServerConfig, ServerPaths, load_config, save_config
from server.deploy.polling import FastPollGrid, poll_intervals
from server.deploy.runs import render_run_config
from server.flwr_connection import write_flower_config


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ----------------------------------------------------------------------- certificates
def test_ensure_tls_makes_a_verifiable_chain_with_sans(tmp_path: Path) -> None:
    files = ensure_tls(tmp_path / "tls", ["fl.example.org", "10.1.2.3"])
    assert files.exist()
    assert files.ca_key is not None
    assert _mode(files.server_key) == 0o600 and _mode(files.ca_key) == 0o600
    assert _mode(files.server_cert) == 0o644
    cert = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "fl.example.org"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("10.1.2.3"),
    }
    assert set(certificate_names(files.server_cert.read_bytes())) == {
        "localhost", "fl.example.org", "127.0.0.1", "::1", "10.1.2.3"
    }  # fmt: skip
    # the server certificate verifies against the CA (an ssl context does the check)
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    ctx = ssl.create_default_context(cafile=str(files.ca_cert))
    ctx.load_cert_chain(str(files.server_cert), str(files.server_key))


def test_ensure_tls_keeps_existing_files_and_refuses_partial_sets(tmp_path: Path) -> None:
    d = tmp_path / "tls"
    first = ensure_tls(d)
    before = first.server_cert.read_bytes()
    assert ensure_tls(d).server_cert.read_bytes() == before  # second start: unchanged
    first.ca_cert.unlink()
    first.ca_key.unlink()  # type: ignore[union-attr]
    first.server_cert.unlink()
    with pytest.raises(FileExistsError, match="partial"):
        ensure_tls(d)


def test_install_tls_validates_and_protects_the_key(tmp_path: Path) -> None:
    src = ensure_tls(tmp_path / "src")
    files = install_tls(tmp_path / "dst", src.ca_cert, src.server_cert, src.server_key)
    assert files.server_key.read_bytes() == src.server_key.read_bytes()
    assert _mode(files.server_key) == 0o600
    bad = tmp_path / "bad.crt"
    bad.write_text("not a certificate")
    with pytest.raises(ValueError, match="invalid TLS material"):
        install_tls(tmp_path / "dst2", bad, src.server_cert, src.server_key)
    with pytest.raises(FileNotFoundError):
        install_tls(tmp_path / "dst3", tmp_path / "missing", src.server_cert, src.server_key)


def test_node_keys_are_p384_in_the_formats_flower_reads() -> None:
    keys = NodeKeyPair.generate()
    private = serialization.load_ssh_private_key(keys.private_openssh, password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert isinstance(private.curve, ec.SECP384R1)
    public = load_public_key(keys.public_openssh)
    assert load_public_key(keys.public_pem).public_numbers() == public.public_numbers()
    # byte-identical to what flwr registers
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    assert public_key_to_bytes(public) == keys.public_pem
    assert b"PRIVATE" not in repr(keys).encode()
    assert len(fingerprint(keys.public_pem)) == 64


def test_load_public_key_rejects_non_nist_and_garbage() -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    ed = ed25519.Ed25519PrivateKey.generate().public_key()
    with pytest.raises(ValueError, match="not an EC public key"):
        load_public_key(
            ed.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    k1 = ec.generate_private_key(ec.SECP256K1()).public_key()
    with pytest.raises(ValueError, match="not a NIST curve"):
        load_public_key(
            k1.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    with pytest.raises(ValueError, match="not a valid public key"):
        load_public_key(b"ssh-rsa AAAA garbage")


# ----------------------------------------------------------------------- bundles
def _info(**kw: object) -> BundleInfo:
    base: dict[str, object] = dict(
        name="dev1",
        superlink="fl.example.org:9092",
        node_id=42,
        client_id=7,
        partition_id=3,
        num_partitions=20,
    )
    base.update(kw)
    return BundleInfo(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("as_tar", [False, True])
def test_bundle_roundtrip_keeps_the_key_private(tmp_path: Path, as_tar: bool) -> None:
    ca_pem, _ = make_ca()
    keys = NodeKeyPair.generate()
    dest = tmp_path / ("dev1.tar.gz" if as_tar else "dev1.bundle")
    write_bundle(dest, _info(), keys, ca_pem)
    if as_tar:
        assert _mode(dest) == 0o600
        with tarfile.open(dest) as tar:
            assert tar.getmember("node.key").mode == 0o600
    else:
        assert _mode(dest / "node.key") == 0o600 and _mode(dest) == 0o700
    bundle = open_bundle(dest, unpack_dir=tmp_path / "unpacked")
    assert bundle.info.node_id == 42 and bundle.info.partition_id == 3
    assert bundle.private_key.read_bytes() == keys.private_openssh
    assert _mode(bundle.private_key) == 0o600
    assert bundle.ca_cert.read_bytes() == ca_pem
    with pytest.raises(FileExistsError):
        write_bundle(dest, _info(), keys, ca_pem)


def test_open_bundle_refuses_bad_bundles(tmp_path: Path) -> None:
    ca_pem, _ = make_ca()
    keys = NodeKeyPair.generate()
    d = write_bundle(tmp_path / "b", _info(), keys, ca_pem)
    (d / "node.key").chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        open_bundle(d)
    (d / "node.key").chmod(0o600)
    (d / "ca.crt").unlink()
    with pytest.raises(ValueError, match=r"lacks ca\.crt"):
        open_bundle(d)
    meta = json.loads((d / "bundle.json").read_text())
    meta["partition_id"] = 20
    (d / "bundle.json").write_text(json.dumps(meta))
    (d / "ca.crt").write_bytes(ca_pem)
    with pytest.raises(ValueError, match="out of range"):
        open_bundle(d)
    with pytest.raises(ValueError, match=r"neither"):
        junk = tmp_path / "junk.tar.gz"
        junk.write_bytes(b"\x00" * 10)
        open_bundle(junk)
    with pytest.raises(FileNotFoundError):
        open_bundle(tmp_path / "nope")
    with pytest.raises(ValueError, match="host:port"):
        _info(superlink="nohost").validate()


def test_supernode_command_line(tmp_path: Path) -> None:
    ca_pem, _ = make_ca()
    bundle = open_bundle(write_bundle(tmp_path / "b", _info(), NodeKeyPair.generate(), ca_pem))
    data = tmp_path / "data"
    data.mkdir()
    cmd = supernode_command(
        bundle, device="cuda", data_dir=data, clientappio_port=19999, max_retries=2
    )
    assert cmd[0].endswith("flower-supernode")
    args = dict(zip(cmd[1::2], cmd[2::2], strict=False))
    assert args["--superlink"] == "fl.example.org:9092"
    assert args["--root-certificates"] == str(bundle.ca_cert)
    assert args["--auth-supernode-private-key"] == str(bundle.private_key)
    assert args["--port"] == "19999" and args["--max-retries"] == "2"
    assert "--insecure" not in cmd
    # the node config parses the way flower-supernode parses it
    from flwr.common.config import parse_config_args

    parsed = parse_config_args([args["--node-config"]])
    assert parsed == {
        "partition-id": 3,
        "num-partitions": 20,
        "device": "cuda",
        "data-dir": str(data.resolve()),
    }
    with pytest.raises(ValueError, match="device"):
        node_config(bundle, "tpu", None)
    with pytest.raises(FileNotFoundError):
        node_config(bundle, "cpu", tmp_path / "missing")


# ----------------------------------------------------------------------- config files
def test_server_config_roundtrip_and_addresses(tmp_path: Path) -> None:
    paths = ServerPaths(tmp_path)
    cfg = ServerConfig(
        superlink_host="0.0.0.0",
        superlink_port=9100,
        api_port=8181,
        public_address="fl.example.org:443",
        database_url="sqlite:///x.db",
    )
    save_config(paths, cfg)
    loaded = load_config(paths)
    assert loaded == cfg
    assert loaded.superlink_address == "127.0.0.1:9100"
    assert loaded.device_address == "fl.example.org:443"
    assert loaded.api_url == "http://127.0.0.1:8181"
    with pytest.raises(ValueError, match=r"1\.\.65535"):
        ServerConfig(superlink_port=0).validate()
    paths.config.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid server configuration"):
        load_config(paths)


def test_flower_config_and_run_config_rendering(tmp_path: Path) -> None:
    import tomllib

    path = write_flower_config(tmp_path / "home", "127.0.0.1:9092", tmp_path / "ca.crt")
    data = tomllib.loads(path.read_text())
    assert data["superlink"]["default"] == "fedsqueeze"
    assert data["superlink"]["fedsqueeze"]["address"] == "127.0.0.1:9092"
    assert data["superlink"]["fedsqueeze"]["root-certificates"] == str(tmp_path / "ca.crt")
    # without a CA: the plain-HTTP connection of simulate's local SuperLink
    plain = tomllib.loads(write_flower_config(tmp_path / "plain", "127.0.0.1:1").read_text())
    assert plain["superlink"]["fedsqueeze"] == {"address": "127.0.0.1:1", "insecure": True}
    from flwr.common.config import parse_config_args

    text = render_run_config(
        {
            "strategy": "artemis",
            "num-server-rounds": 3,
            "client-lr": 0.1,
            "data-dir": "/tmp/x",
            "eval": True,
        }
    )
    assert parse_config_args([text]) == {
        "strategy": "artemis",
        "num-server-rounds": 3,
        "client-lr": 0.1,
        "data-dir": "/tmp/x",
        "eval": True,
    }
    with pytest.raises(ValueError, match="single quotes"):
        render_run_config({"x": "it's"})


# ----------------------------------------------------------------------- fast polling
def _metadata(
    dst: int, message_type: str, group_id: str, reply_to: str, created_at: float = 0.0
) -> Metadata:
    return Metadata(
        run_id=1,
        message_id="",
        src_node_id=0,
        dst_node_id=dst,
        reply_to_message_id=reply_to,
        group_id=group_id,
        ttl=60.0,
        message_type=message_type,
        created_at=created_at or time.time(),
    )


class _DelayedGrid(Grid):
    """A real in-process grid whose replies become available on the `ready_at_pull`-th
    pull after the push (None: never). Counting pulls, not seconds, keeps the tests of
    `FastPollGrid` independent of how loaded the machine is."""

    def __init__(self, ready_at_pull: int | None) -> None:
        self.ready_at_pull = ready_at_pull
        self.ready: dict[str, Message] = {}
        self.pulls = 0
        self.lock = threading.Lock()

    def set_run(self, run: Run) -> None:
        raise NotImplementedError

    @property
    def run(self) -> Run:
        raise NotImplementedError

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return make_message(_metadata(dst_node_id, message_type, group_id, ""), content)

    def get_node_ids(self) -> Iterable[int]:
        return [1, 2]

    def get_nodes(self) -> Iterable[NodeInfo]:
        return []

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for i, m in enumerate(messages):
            mid = f"m{i}-{time.monotonic_ns()}"
            m.metadata.__dict__["_message_id"] = mid
            reply = make_message(
                _metadata(0, m.metadata.message_type, "", mid, time.time()), RecordDict()
            )
            self.ready[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.pulls += 1
        if self.ready_at_pull is None or self.pulls < self.ready_at_pull:
            return []
        return [self.ready[i] for i in message_ids]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        raise AssertionError("FastPollGrid must not call the inner send_and_receive")


def _msgs(grid: Grid, n: int) -> list[Message]:
    return [grid.create_message(RecordDict(), "train", i + 1, "1") for i in range(n)]


def test_poll_schedule_grows_geometrically_to_the_cap() -> None:
    it = iter(poll_intervals(0.01, 0.05, 2.0))
    assert [round(next(it), 6) for _ in range(5)] == [0.01, 0.02, 0.04, 0.05, 0.05]
    with pytest.raises(ValueError, match="bad poll schedule"):
        next(iter(poll_intervals(0.0, 1.0, 2.0)))


def test_fast_poll_grid_returns_at_the_first_pull_that_finds_the_replies() -> None:
    inner = _DelayedGrid(ready_at_pull=6)
    grid = FastPollGrid(inner, initial_interval=0.01, max_interval=0.05, growth=2.0)
    replies = list(grid.send_and_receive(_msgs(grid, 2), timeout=600))
    assert len(replies) == 2
    # it pulled exactly until the replies were there, sleeping the schedule in between
    # (0.01, 0.02, 0.04, 0.05, 0.05: Flower's HttpGrid sleeps 3 s before every pull)
    assert grid.stats.calls == 1 and grid.stats.pulls == inner.pulls == 6
    assert grid.stats.sleep_s == pytest.approx(0.01 + 0.02 + 0.04 + 0.05 + 0.05)
    assert grid.stats.lags and grid.stats.wall_s >= grid.stats.sleep_s
    assert grid.get_node_ids() == [1, 2]


def test_fast_poll_grid_honours_the_timeout() -> None:
    inner = _DelayedGrid(ready_at_pull=None)  # no reply ever
    grid = FastPollGrid(inner, initial_interval=0.01, max_interval=0.05)
    t0 = time.monotonic()
    replies = list(grid.send_and_receive(_msgs(grid, 1), timeout=0.2))
    assert replies == []
    # it waits for the timeout, and sleeps no longer than the timeout in all
    assert time.monotonic() - t0 >= 0.2
    assert grid.stats.sleep_s <= 0.2 + 1e-9 and inner.pulls >= 2


# ----------------------------------------------------------------------- benchmark parsing
def test_supernode_log_parsing_and_round_breakdown() -> None:
    from datetime import UTC, datetime

    from benchmarks.deploy import (
        COMPONENTS,
        node_turnaround,
        parse_supernode_log,
        round_breakdown,
        summarize,
    )

    def stamp(t: float) -> str:
        local = datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S,%f")[:-3]
        return f"\x1b[92mINFO {local}\x1b[0m:      "

    def timing(run: int, k: int, proc: float, start: float, end: float) -> str:
        return (
            stamp(start) + f"fedsqueeze-timing run={run} round={k} pid=42 "
            f"process_start={proc:.3f} handler_start={start:.3f} setup_s=0.2500 "
            f"train_s=1.0000 handler_s={end - start:.4f} handler_end={end:.3f} "
            f"startup_cpu_s={k + 2.5:.3f} handler_cpu_s=0.1250 imports={10 * k}"
        )

    t = 1_800_000_000.0
    log = "\n".join(
        [
            stamp(t + 1.0) + "[RUN 7]",
            stamp(t + 1.0) + "Receiving: train message (ID: a)",
            stamp(t + 1.75) + "Received successfully",
            timing(7, 1, t + 1.5, t + 2.5, t + 4.0),
            stamp(t + 4.0) + "[RUN 7]",
            stamp(t + 4.0) + "Sending: train message (ID: b)",
            stamp(t + 4.5) + "Sent successfully",
            stamp(t + 5.0) + "[RUN 8]",  # another run: ignored
            stamp(t + 5.0) + "Receiving: train message (ID: c)",
            stamp(t + 5.5) + "Received successfully",
            timing(8, 1, t + 5.6, t + 5.7, t + 5.8),
            stamp(t + 9.0) + "[RUN 7, ROUND 2]",
            stamp(t + 9.2) + "Receiving: train message (ID: d)",
            stamp(t + 9.2) + "Received successfully",
            timing(7, 2, t + 9.3, t + 10.0, t + 10.5),
            "INFO:     127.0.0.1 - a uvicorn line without a Flower stamp",
        ]
    )
    events = parse_supernode_log(log, 7)
    assert events.received == pytest.approx({"1": t + 1.0, "2": t + 9.2})
    assert events.sent == pytest.approx({"1": t + 4.5})
    assert set(events.handler) == {"1", "2"} and events.handler["1"]["process_start"] == t + 1.5
    assert events.handler["2"]["startup_cpu_s"] == 4.5 and events.handler["2"]["imports"] == 20
    start = datetime.fromtimestamp(t - 0.5, UTC).isoformat()
    end = datetime.fromtimestamp(t + 5.25, UTC).isoformat()
    phases = {"configure": 0.25, "train": 5.0, "aggregate": 0.25, "evaluate": 0.25}
    sizes = {"replied": 1, "uplink_bytes": 10, "downlink_bytes": 20}
    rounds = [
        {"round": 1, "started_at": start, "ended_at": end, "phase_seconds": phases, **sizes},
        {"round": 2, "started_at": start, "ended_at": end, "phase_seconds": phases, **sizes},
    ]
    parts = round_breakdown(rounds[0], [events])
    assert parts is not None and round_breakdown(rounds[1], [events]) is None
    # push at t-0.25, received t+1, process t+1.5, handler t+2.5..t+4, sent t+4.5, pulled
    # t+4.75, then aggregate and evaluate: the round ends at t+5.25
    assert parts["server_configure_s"] == pytest.approx(0.25)
    assert parts["idle_poll_wait_s"] == pytest.approx(1.25)
    assert parts["superexec_wait_s"] == pytest.approx(0.5)
    assert parts["clientapp_start_s"] == pytest.approx(1.0)
    assert parts["client_setup_s"] == pytest.approx(0.25)
    assert parts["client_training_s"] == pytest.approx(1.0)
    assert parts["client_codec_s"] == pytest.approx(0.25)
    assert parts["reply_s"] == pytest.approx(0.5)
    assert parts["server_pull_wait_s"] == pytest.approx(0.25)
    assert parts["round_s"] == pytest.approx(5.75)
    assert parts["unexplained_s"] == pytest.approx(0.0, abs=1e-3)
    assert sum(parts[c] for c in COMPONENTS) == pytest.approx(5.75, abs=1e-3)
    # the critical node sent round 1's reply at t+4.5 and received round 2's at t+9.2
    assert node_turnaround(rounds[0], [events]) == pytest.approx(4.7)
    assert node_turnaround(rounds[1], [events]) is None
    # a strategy's summary: steady rounds only (round 2 has no reply in this log, so no
    # breakdown), and the ClientApp's CPU of round 2's message (round 1's is left out)
    summary = summarize([(rounds, [events]), (rounds, [events])])
    assert summary["round_s"] == pytest.approx(5.75) and summary["breakdown_rounds"] == 0
    assert summary["uplink_bytes"] == 20 and summary["replied"] == [1, 1, 1, 1]
    assert summary["client_cpu_messages"] == 2
    assert summary["client_cpu"] == pytest.approx(
        {"startup_cpu_s": 4.5, "handler_cpu_s": 0.125, "imports": 20}
    )
    assert summary["node_turnaround_s"] is None  # round 2 is the last one in `rounds`


def test_benchmark_runs_alternate_in_order() -> None:
    from benchmarks.deploy import run_order

    assert run_order("artemis", 1) == ["flwr-fedavg", "artemis"]
    assert run_order("artemis", 2) == ["flwr-fedavg", "artemis", "artemis", "flwr-fedavg"]


# ----------------------------------------------------------------------- SuperExec polling
def test_superexec_task_poll_interval_default_override_and_refusal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flwr.supercore.superexec import run_superexec

    from client.supernode import supernode_env
    from core.superexec import DEFAULT_TASK_POLL_INTERVAL_S, TASK_POLL_INTERVAL_ENV, task_poll_env

    assert task_poll_env(environ={}) == {TASK_POLL_INTERVAL_ENV: "0.1"}
    assert DEFAULT_TASK_POLL_INTERVAL_S == 0.1
    assert task_poll_env(environ={TASK_POLL_INTERVAL_ENV: "2.5"})[TASK_POLL_INTERVAL_ENV] == "2.5"
    assert task_poll_env(0.05, environ={TASK_POLL_INTERVAL_ENV: "2.5"}) == {
        TASK_POLL_INTERVAL_ENV: "0.05"
    }
    for bad in ("0", "61", "nan", "soon"):
        with pytest.raises(ValueError, match=TASK_POLL_INTERVAL_ENV):
            task_poll_env(environ={TASK_POLL_INTERVAL_ENV: bad})
    # the SuperNode's environment carries it, and Flower's own reader accepts the value
    env = supernode_env(superexec_poll_interval=0.25)
    assert env[TASK_POLL_INTERVAL_ENV] == "0.25"
    monkeypatch.setenv(TASK_POLL_INTERVAL_ENV, env[TASK_POLL_INTERVAL_ENV])
    assert run_superexec._get_task_poll_interval() == 0.25
