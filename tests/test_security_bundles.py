"""Crafted device bundles (issue 8.6): nothing is written outside the bundles folder.

Each attack is a tarball (or a directory) an attacker could hand to a device. It is opened
by the real command line, ``fedsqueeze client start --bundle B [--print-command]``, and by
`client.enroll.open_bundle`. Every one must end in one clear error line (exit 2, no
traceback), and the file tree outside ``$FEDSQUEEZE_HOME/bundles`` must be byte-for-byte and
mode-for-mode what it was, including a victim folder the attack aims at.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from client.enroll import BundleInfo, check_name, open_bundle, write_bundle
from core.keys import NodeKeyPair
from server.deploy.certs import make_ca

FEDSQUEEZE = str(Path(sys.executable).with_name("fedsqueeze"))
ROOT = Path(__file__).resolve().parents[1]

Member = tuple[tarfile.TarInfo, bytes | None]


def _file(name: str, data: bytes, mode: int = 0o644) -> Member:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    return info, data


def _link(name: str, target: str, kind: bytes) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def _dir(name: str) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    return info, None


@pytest.fixture(scope="module")
def parts() -> dict[str, bytes]:
    ca_pem, _ = make_ca()
    keys = NodeKeyPair.generate()
    return {"node.key": keys.private_openssh, "node.pub": keys.public_openssh, "ca.crt": ca_pem}


def _meta(**fields: object) -> bytes:
    base: dict[str, object] = {"name": "dev1", "superlink": "127.0.0.1:9", "node_id": 7}
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not ...}).encode()


def _tarball(path: Path, members: list[Member]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _standard(parts: dict[str, bytes], meta: bytes, skip: str = "") -> list[Member]:
    files = [_file("bundle.json", meta)]
    files += [_file(n, d, 0o600 if n == "node.key" else 0o644) for n, d in parts.items()]
    return [m for m in files if m[0].name != skip]


def _snapshot(root: Path, skip: Path) -> dict[str, tuple[int, str]]:
    """Every path under `root` except `skip`: (mode, sha256 of a file's bytes)."""
    seen: dict[str, tuple[int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d != skip]
        for name in dirnames + filenames:
            path = here / name
            st = path.lstat()
            digest = ""
            if stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            seen[str(path.relative_to(root))] = (st.st_mode, digest)
    return seen


def _attacks(tmp: Path, parts: dict[str, bytes]) -> dict[str, tuple[Path, str]]:
    """name -> (bundle path, a regex the one error line must match)."""
    victim = tmp / "victim"
    a: dict[str, tuple[Path, str]] = {}

    def tar(name: str, members: list[Member], match: str) -> None:
        a[name] = (_tarball(tmp / "attacks" / f"{name}.tar.gz", members), match)

    (tmp / "attacks").mkdir()
    tar("name-dotdot", _standard(parts, _meta(name="../../victim")), "device name .* not allowed")
    tar("name-absolute", _standard(parts, _meta(name=str(victim))), "device name .* not allowed")
    tar("member-dotdot", [*_standard(parts, _meta()), _file("../victim/x", b"x")], "holds '../")
    tar("member-absolute", [*_standard(parts, _meta()), _file(f"{victim}/x", b"x")], "holds '/")
    tar(
        "symlink-key",
        [*_standard(parts, _meta(), skip="node.key"), _link("node.key", f"{victim}/node.key",
                                                            tarfile.SYMTYPE)],
        "node.key is not a regular file",
    )  # fmt: skip
    tar(
        "hardlink-key",
        [*_standard(parts, _meta(), skip="node.key"), _link("node.key", f"{victim}/node.key",
                                                            tarfile.LNKTYPE)],
        "node.key is not a regular file",
    )  # fmt: skip
    tar(
        "folder-key",
        [*_standard(parts, _meta(), skip="node.key"), _dir("node.key")],
        "node.key is not a regular file",
    )
    tar("unknown-key", _standard(parts, _meta(evil="x")), "unknown keys 'evil'")
    tar("missing-key", _standard(parts, _meta(node_id=...)), "lacks the keys node_id")
    tar("wrong-type", _standard(parts, _meta(node_id="7; rm -rf /")), "node_id must be int")
    tar("missing-file", _standard(parts, _meta(), skip="ca.crt"), r"lacks ca\.crt")
    tar(
        "node-config-injection",
        _standard(parts, _meta(node_config={'x" --isolation "process': 1})),
        "node_config key .* not a plain name",
    )
    folder = tmp / "attacks" / "dir-folder-key"
    folder.mkdir(mode=0o700)
    for info, data in _standard(parts, _meta(), skip="node.key"):
        (folder / info.name).write_bytes(data or b"")
    (folder / "node.key").mkdir()
    a["dir-folder-key"] = (folder, "node.key is not a regular file")
    return a


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FEDSQUEEZE, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_crafted_bundles_write_nothing_outside_the_bundles_folder(
    tmp_path: Path, parts: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    bundles = home / "bundles"
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o755)
    (victim / "node.key").write_text("precious")
    attacks = _attacks(tmp_path, parts)
    before = _snapshot(tmp_path, bundles)
    env = {**os.environ, "FEDSQUEEZE_HOME": str(home), "COLUMNS": "300"}
    monkeypatch.setenv("FEDSQUEEZE_HOME", str(home))
    for name, (bundle, match) in attacks.items():
        # the command line, only printing: refused in one line, nothing unpacked
        done = _cli(env, "client", "start", "--bundle", str(bundle), "--print-command")
        assert done.returncode == 2, (name, done.stdout, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, done.stderr)
        import re

        assert re.search(match, lines[0]), (name, lines[0])
        assert "Traceback" not in done.stdout + done.stderr
        assert not bundles.exists(), name
        # the library call that unpacks: refused the same way, before writing a byte
        with pytest.raises(ValueError, match=match):
            open_bundle(bundle)
        assert _snapshot(tmp_path, bundles) == before, name
    # a real start (not only printing) of the worst one is refused the same way
    bundle, match = attacks["name-dotdot"]
    done = _cli(env, "client", "start", "--bundle", str(bundle), "--max-retries", "1",
                "--rejoin-wait", "0")  # fmt: skip
    assert done.returncode == 2 and "not allowed" in done.stderr
    assert _snapshot(tmp_path, bundles) == before
    assert (victim / "node.key").read_text() == "precious"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o755
    # whatever the attacks left in the bundles folder: no stray files, only what we made
    assert not bundles.exists() or not any(bundles.iterdir())


def test_valid_tarball_prints_without_unpacking_and_unpacks_into_its_folder(
    tmp_path: Path, parts: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    bundle = _tarball(tmp_path / "dev1.tar.gz", _standard(parts, _meta()))
    env = {**os.environ, "FEDSQUEEZE_HOME": str(home)}
    done = _cli(env, "client", "start", "--bundle", str(bundle), "--print-command")
    assert done.returncode == 0, done.stderr
    target = home / "bundles" / "dev1"
    assert f"--auth-supernode-private-key {target / 'node.key'}" in done.stdout
    assert not home.exists()  # --print-command unpacked nothing
    monkeypatch.setenv("FEDSQUEEZE_HOME", str(home))
    opened = open_bundle(bundle)
    assert opened.root == target and opened.info.node_id == 7
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    assert stat.S_IMODE(opened.private_key.stat().st_mode) == 0o600
    assert opened.private_key.read_bytes() == parts["node.key"]
    assert sorted(p.name for p in target.iterdir()) == sorted(
        ["bundle.json", "node.key", "node.pub", "ca.crt"]
    )
    # opened again (a newer bundle for the same device): replaced whole, nothing left over
    opened = open_bundle(_tarball(tmp_path / "again.tar.gz", _standard(parts, _meta(node_id=8))))
    assert opened.info.node_id == 8 and [p.name for p in (home / "bundles").iterdir()] == ["dev1"]


@pytest.mark.parametrize(
    "name", ["../x", "/etc/x", "a/b", ".hidden", "-rf", "", "x" * 65, "dév", "a b", "a\nb"]
)
def test_device_names_are_safe_slugs(name: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not allowed"):
        check_name(name)
    info = BundleInfo(name=name, superlink="127.0.0.1:9", node_id=1)
    ca_pem, _ = make_ca()
    with pytest.raises(ValueError, match="not allowed"):
        write_bundle(tmp_path / "b", info, NodeKeyPair.generate(), ca_pem)
    assert not (tmp_path / "b").exists()


def test_enrol_refuses_a_bad_name_or_output_before_asking_the_server(tmp_path: Path) -> None:
    """No server runs here: a refusal that comes before any network call is the point."""
    env = {**os.environ, "FEDSQUEEZE_HOME": str(tmp_path / "home"), "COLUMNS": "300"}
    common = ("--api-url", "http://127.0.0.1:9", "--token", "t", "--superlink", "127.0.0.1:9")
    bad: list[tuple[tuple[str, ...], Callable[[str], bool]]] = [
        (("--name", "../../x"), lambda e: "not allowed" in e),
        (("--name", "ok", "--out", str(tmp_path / "a-file" / "b")), lambda e: "a-file" in e),
        (("--name", "ok", "--partition-id", "5", "--num-partitions", "2"),
         lambda e: "--partition-id" in e),
    ]  # fmt: skip
    (tmp_path / "a-file").write_text("not a folder")
    for args, says in bad:
        done = _cli(env, "client", "enroll", *args, *common)
        assert done.returncode == 2, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and says(lines[0]), (args, done.stderr)
        assert "cannot reach" not in done.stderr  # refused before any call to the server
