"""Enrolling an edge device: its key pair, its registration, its bundle.

`enroll` makes an ECDSA P-384 key pair for the device, sends the public key to the REST
service (``POST /clients`` with an admin token, or an enrolment-only token whose one right
is that call), which registers it with the SuperLink (the registration ``flwr supernode
register`` performs) and records the client with its Flower node id in the store; the
device's *bundle* is written before and completed after that call (see `enroll`):

    bundle.json   name, client id, node id, SuperLink address, partition settings
    node.key      the private key (OpenSSH format, mode 0600; never printed or logged)
    node.pub      the public key (OpenSSH format)
    ca.crt        the CA certificate that signed the SuperLink's TLS certificate

as a directory, or as a ``.tar.gz`` of those files (the key member keeps mode 0600).
The device name is a safe slug (`check_name`): it names the folder a tarball is unpacked
to, ``$FEDSQUEEZE_HOME/bundles/NAME``, and a tarball holds exactly those four regular files
(`open_bundle` refuses anything else before writing a byte).
The private key never leaves the machine that runs `enroll`: run it on the device itself
(with an enrolment token) to keep it there, or on the operator's host and copy the bundle.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from core.files import write_private, write_public
from core.keys import NodeKeyPair

BUNDLE_FORMAT = 1
BUNDLE_FILES = ("bundle.json", "node.key", "node.pub", "ca.crt")
#: a bundle member larger than this is refused (a key, a certificate and a small JSON file)
MAX_MEMBER_BYTES = 1 << 20
#: device names: they name the unpacked folder, so they are safe slugs (no '/', no '..')
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: node-config keys written into the SuperNode's ``--node-config`` string
NODE_CONFIG_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")


class EnrollError(RuntimeError):
    """Enrolment failed; the message says why (`status_code`: the REST answer's, if any)."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


def check_name(name: object) -> str:
    """`name` if it is a safe device name (1-64 of letters, digits, '.', '_', '-', not
    starting with '.' or '-'), else ValueError. Names become folder names
    (``$FEDSQUEEZE_HOME/bundles/NAME``), so nothing else is allowed."""
    if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None:
        raise ValueError(
            f"device name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


#: bundle.json's fields and the types each accepts (None: the field may be null)
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "superlink": (str,),
    "node_id": (int,),
    "client_id": (int, type(None)),
    "partition_id": (int,),
    "num_partitions": (int,),
    "location": (str, type(None)),
    "node_config": (dict,),
    "created_at": (str,),
    "format": (int,),
}
_REQUIRED_FIELDS = ("name", "superlink", "node_id")


@dataclass
class BundleInfo:
    """The non-secret part of a bundle (bundle.json)."""

    name: str
    superlink: str
    node_id: int
    client_id: int | None = None
    partition_id: int = 0
    num_partitions: int = 1
    location: str | None = None
    node_config: dict[str, Any] = field(default_factory=dict)
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    format: int = BUNDLE_FORMAT

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "bundle.json") -> BundleInfo:
        """Parse and check bundle.json: unknown or missing keys and wrong types are one
        clear ValueError naming them."""
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{where} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{where} must hold a JSON object")
        unknown = sorted(set(data) - set(_FIELD_TYPES))
        if unknown:
            raise ValueError(
                f"{where} has unknown keys {', '.join(map(repr, unknown))}; a bundle "
                f"description holds {', '.join(_FIELD_TYPES)}"
            )
        missing = [k for k in _REQUIRED_FIELDS if k not in data]
        if missing:
            raise ValueError(f"{where} lacks the keys {', '.join(missing)}")
        for key, value in data.items():
            types = _FIELD_TYPES[key]
            if isinstance(value, bool) or not isinstance(value, types):
                wanted = " or ".join("null" if t is type(None) else t.__name__ for t in types)
                raise ValueError(f"{where}: {key} must be {wanted}, got {value!r}")
        info = cls(**data)
        info.validate()
        return info

    def validate(self) -> None:
        if self.format != BUNDLE_FORMAT:
            raise ValueError(
                f"bundle format {self.format} is not supported (expected {BUNDLE_FORMAT})"
            )
        check_name(self.name)
        if ":" not in self.superlink or any(c.isspace() for c in self.superlink):
            raise ValueError(f"bundle SuperLink address {self.superlink!r} is not host:port")
        if self.num_partitions < 1 or not 0 <= self.partition_id < self.num_partitions:
            raise ValueError(
                f"bundle partition-id {self.partition_id} out of range for "
                f"{self.num_partitions} partitions"
            )
        for key, value in self.node_config.items():
            if NODE_CONFIG_KEY.fullmatch(str(key)) is None:
                raise ValueError(f"bundle node_config key {key!r} is not a plain name")
            if not isinstance(value, bool | int | float | str):
                raise ValueError(f"bundle node_config {key}: {value!r} is not a scalar")


@dataclass(frozen=True)
class Bundle:
    """A bundle on disk (a directory: tarballs are unpacked first by `open_bundle`)."""

    root: Path
    info: BundleInfo

    @property
    def private_key(self) -> Path:
        return self.root / "node.key"

    @property
    def public_key(self) -> Path:
        return self.root / "node.pub"

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"


def _write_files(
    root: Path, info: BundleInfo | None, keys: NodeKeyPair, ca_cert_pem: bytes
) -> None:
    """The files of a bundle into the existing directory `root` (bundle.json when `info`)."""
    write_private(root / "node.key", keys.private_openssh)
    write_public(root / "node.pub", keys.public_openssh)
    write_public(root / "ca.crt", ca_cert_pem)
    if info is not None:
        write_public(root / "bundle.json", (json.dumps(asdict(info), indent=2) + "\n").encode())


def _tar_from(root: Path, dest: Path) -> None:
    """Pack the bundle directory `root` into the tarball `dest` (0600, replaced atomically)."""
    fd, tmp_name = tempfile.mkstemp(prefix=".bundle-", suffix=".tar.gz", dir=dest.parent)
    os.fchmod(fd, 0o600)  # the tarball holds the private key
    try:
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
            for name in BUNDLE_FILES:
                data = (root / name).read_bytes()
                member = tarfile.TarInfo(name)
                member.size = len(data)
                member.mode = 0o600 if name == "node.key" else 0o644
                member.mtime = int(datetime.now(UTC).timestamp())
                tar.addfile(member, io.BytesIO(data))
        os.replace(tmp_name, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise


def _replace_dir(staging: Path, dest: Path) -> None:
    """Move the complete directory `staging` to `dest`, replacing what `dest` held (a link
    at `dest` is removed, never followed)."""
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        dest.unlink()
    if dest.is_dir():
        trash = Path(tempfile.mkdtemp(prefix=f".{dest.name}-old-", dir=dest.parent))
        os.replace(dest, trash / dest.name)
        os.replace(staging, dest)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, dest)


def _finish_bundle(staging: Path, dest: Path) -> Path:
    """Turn the complete staging directory into the bundle at `dest` (dir or tarball)."""
    if dest.name.endswith((".tar.gz", ".tgz")):
        _tar_from(staging, dest)
        shutil.rmtree(staging, ignore_errors=True)
    else:
        _replace_dir(staging, dest)
    return dest


def prepare_destination(dest: Path, *, force: bool = False) -> Path:
    """Check that a bundle can be written at `dest`, before anything is registered: it
    does not exist (unless `force`), and an empty staging directory can be made beside it.
    Returns that staging directory (0700); the caller fills it and `_finish_bundle`s it."""
    if (dest.exists() or dest.is_symlink()) and not force:
        raise FileExistsError(f"{dest} exists: remove it or pass --force")
    if dest.exists() and dest.is_dir() == dest.name.endswith((".tar.gz", ".tgz")):
        raise FileExistsError(f"{dest} exists and is not a bundle of the same kind")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    except OSError as exc:
        raise EnrollError(f"cannot write a bundle at {dest}: {exc.strerror or exc}") from None


def write_bundle(
    dest: Path, info: BundleInfo, keys: NodeKeyPair, ca_cert_pem: bytes, *, force: bool = False
) -> Path:
    """Write a bundle to `dest`: a directory, or a tarball if `dest` ends in .tar.gz/.tgz."""
    info.validate()
    staging = prepare_destination(dest, force=force)
    try:
        _write_files(staging, info, keys, ca_cert_pem)
        return _finish_bundle(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_directory(root: Path) -> None:
    for name in BUNDLE_FILES:
        path = root / name
        if not path.exists() and not path.is_symlink():
            raise ValueError(f"bundle {root} lacks {name}")
        if path.is_symlink() or not path.is_file():
            raise ValueError(f"bundle {root}: {name} is not a regular file")
        if path.stat().st_size > MAX_MEMBER_BYTES:
            raise ValueError(f"bundle {root}: {name} is larger than {MAX_MEMBER_BYTES} bytes")


def _checked_members(tar: tarfile.TarFile, path: Path) -> dict[str, tarfile.TarInfo]:
    """The tarball's members by name, when it holds exactly the bundle files as regular
    files (no links, folders, devices, other names, absolute paths or '..'), each passing
    tarfile's ``data`` filter; else ValueError naming the offending member."""
    members: dict[str, tarfile.TarInfo] = {}
    for member in tar.getmembers():
        if member.name not in BUNDLE_FILES:
            raise ValueError(
                f"bundle {path} holds {member.name!r}: a bundle holds only "
                f"{', '.join(BUNDLE_FILES)}"
            )
        if not member.isreg():
            raise ValueError(f"bundle {path}: {member.name} is not a regular file")
        if member.name in members:
            raise ValueError(f"bundle {path} holds {member.name} twice")
        if member.size > MAX_MEMBER_BYTES:
            raise ValueError(f"bundle {path}: {member.name} is larger than {MAX_MEMBER_BYTES} B")
        try:
            tarfile.data_filter(member, str(path.parent))
        except tarfile.FilterError as exc:
            raise ValueError(f"bundle {path}: {member.name} refused: {exc}") from None
        members[member.name] = member
    missing = [n for n in BUNDLE_FILES if n not in members]
    if missing:
        raise ValueError(f"bundle {path} lacks {', '.join(missing)}")
    return members


def bundles_dir() -> Path:
    """Where tarballs are unpacked: ``$FEDSQUEEZE_HOME/bundles`` (one folder per device)."""
    from core.paths import fedsqueeze_home

    return fedsqueeze_home() / "bundles"


def open_bundle(path: Path, unpack_dir: Path | None = None, *, unpack: bool = True) -> Bundle:
    """Open a bundle directory or tarball.

    A tarball is checked member by member (`_checked_members`), its bundle.json parsed
    (`BundleInfo.from_json`: a safe slug as name, no unknown or missing keys), then
    unpacked with tarfile's ``data`` filter into a fresh folder inside `unpack_dir`'s parent
    (default ``$FEDSQUEEZE_HOME/bundles/<name>``, 0700), which replaces `unpack_dir` only
    when complete. Nothing is written anywhere else. With ``unpack=False`` nothing is
    written at all: the bundle is checked and returned with the folder it would be
    unpacked to (what ``client start --print-command`` shows).
    """
    if not path.exists():
        raise FileNotFoundError(f"bundle {path} does not exist")
    if path.is_dir():
        _check_directory(path)
        key = path / "node.key"
        mode = key.stat().st_mode & 0o777
        if mode & 0o077:
            raise PermissionError(
                f"{key} is readable by others (mode {mode:o}): run `chmod 600 {key}` first"
            )
        return Bundle(path, _read_info(path / "bundle.json"))
    try:
        tar = tarfile.open(path, mode="r:*")  # noqa: SIM115 - closed by the `with` below
    except (tarfile.TarError, OSError) as exc:
        raise ValueError(
            f"{path} is neither a bundle directory nor a readable tarball: {exc}"
        ) from exc
    with tar:
        try:
            members = _checked_members(tar, path)
            meta = tar.extractfile(members["bundle.json"])
            if meta is None:
                raise ValueError(f"bundle {path}: bundle.json is unreadable")
            info = BundleInfo.from_json(meta.read(MAX_MEMBER_BYTES + 1), f"{path}: bundle.json")
            target = unpack_dir if unpack_dir is not None else bundles_dir() / info.name
            if not unpack:
                return Bundle(target, info)
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
            try:
                tar.extractall(staging, members=list(members.values()), filter="data")
                for name in BUNDLE_FILES:
                    (staging / name).chmod(0o600 if name == "node.key" else 0o644)
                _replace_dir(staging, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        except (tarfile.TarError, EOFError, zlib.error) as exc:
            raise ValueError(f"bundle {path} is a damaged tarball: {exc}") from None
    _check_directory(target)
    return Bundle(target, _read_info(target / "bundle.json"))


def _read_info(path: Path) -> BundleInfo:
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path} is not a valid bundle description: {exc}") from exc
    return BundleInfo.from_json(text, str(path))


class RestClients:
    """The client-management calls of the REST service (an admin token; an enrolment-only
    token may only `enroll`)."""

    def __init__(self, api_url: str, token: str, timeout: float = 30.0) -> None:
        import httpx

        self._http = httpx.Client(
            base_url=api_url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
        )
        self.api_url = api_url

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RestClients:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise EnrollError(f"cannot reach the REST service at {self.api_url}: {exc}") from exc
        if response.status_code >= 400:
            try:
                detail = response.json()
            except ValueError:
                detail = response.text[:300]
            raise EnrollError(
                f"{method} {path} failed with HTTP {response.status_code}: {detail}",
                status_code=response.status_code,
            )
        return response.json() if response.content else None

    def enroll(self, name: str, public_key_pem: bytes, location: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name, "public_key_pem": public_key_pem.decode()}
        if location:
            body["location"] = location
        result = self._call("POST", "/clients", json=body)
        if not isinstance(result, dict) or "node_id" not in result:
            raise EnrollError(f"unexpected answer to POST /clients: {result!r}")
        return result

    def list(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        offset = 0
        while True:
            page = self._call("GET", "/clients", params={"limit": 100, "offset": offset})
            batch = page["items"] if isinstance(page, dict) else page
            items.extend(batch)
            total = page.get("total", len(items)) if isinstance(page, dict) else len(items)
            offset += len(batch)
            if not batch or offset >= total:
                return items

    def find(self, ref: str) -> dict[str, Any]:
        """A client by id, name or node id."""
        for c in self.list():
            if ref in (str(c.get("id")), str(c.get("name")), str(c.get("node_id"))):
                return c
        raise EnrollError(f"no enrolled client {ref!r}")

    def disable(self, client_id: int) -> dict[str, Any]:
        return dict(self._call("POST", f"/clients/{client_id}/disable"))

    def remove(self, client_id: int) -> None:
        self._call("DELETE", f"/clients/{client_id}")


def enroll(
    *,
    name: str,
    api_url: str,
    token: str,
    superlink: str,
    ca_cert_pem: bytes,
    dest: Path,
    partition_id: int,
    num_partitions: int,
    location: str | None = None,
    node_config: dict[str, Any] | None = None,
    force: bool = False,
) -> tuple[Path, BundleInfo]:
    """Make a key pair, enrol it over REST, write the bundle; return (path, info).

    The order keeps the private key and the registration together:

    1. check everything local: the name, the bundle description, that `dest` can be
       written (`prepare_destination` makes an empty 0700 staging folder beside it);
    2. write the key pair and the CA into the staging folder (the key is on disk before
       the SuperLink ever hears of it);
    3. register the public key (``POST /clients``: an admin token, or an enrolment-only
       token whose one right is this call);
    4. add bundle.json (with the node id) and move the folder to `dest` (or pack it).

    If step 3 fails, the staging folder is removed and nothing is registered. If step 4
    fails, the registration is rolled back (``DELETE /clients/{id}``); when the token may
    not do that (an enrolment-only token), the error names the client to remove and the
    folder that keeps the key, so that the key is never lost while registered.
    """
    info = BundleInfo(
        name=name,
        superlink=superlink,
        node_id=0,
        partition_id=partition_id,
        num_partitions=num_partitions,
        location=location,
        node_config=dict(node_config or {}),
    )
    info.validate()
    staging = prepare_destination(dest, force=force)
    try:
        keys = NodeKeyPair.generate()
        _write_files(staging, None, keys, ca_cert_pem)
        with RestClients(api_url, token) as api:
            result = api.enroll(name, keys.public_pem, location)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    info.node_id = int(result["node_id"])
    info.client_id = int(result["id"]) if result.get("id") is not None else None
    try:
        _write_files(staging, info, keys, ca_cert_pem)
        return _finish_bundle(staging, dest), info
    except OSError as exc:
        failure = f"the bundle could not be written to {dest} ({exc.strerror or exc})"
        try:
            if info.client_id is None:
                raise EnrollError("the REST service returned no client id")
            with RestClients(api_url, token) as api:
                api.remove(info.client_id)
        except EnrollError as undo:
            raise EnrollError(
                f"{failure}; client {info.client_id} (Flower node {info.node_id}) stays "
                f"registered and its key is kept in {staging}: remove it with `fedsqueeze "
                f"client remove {info.client_id}` (rollback refused: {undo})"
            ) from None
        shutil.rmtree(staging, ignore_errors=True)
        raise EnrollError(f"{failure}; the registration was rolled back") from None
