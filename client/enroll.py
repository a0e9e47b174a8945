"""Enrolling an edge device: its key pair, its registration, its bundle.

`enroll` makes an ECDSA P-384 key pair for the device, sends the public key to the REST
service (``POST /clients`` with an admin token), which registers it with the SuperLink
(the registration ``flwr supernode register`` performs) and records the client with its
Flower node id in the store; then it writes the device's *bundle*:

    bundle.json   name, client id, node id, SuperLink address, partition settings
    node.key      the private key (OpenSSH format, mode 0600; never printed or logged)
    node.pub      the public key (OpenSSH format)
    ca.crt        the CA certificate that signed the SuperLink's TLS certificate

as a directory, or as a ``.tar.gz`` of those files (the key member keeps mode 0600).
The private key never leaves the machine that runs `enroll`: run it on the device itself
(with an enrolment token) to keep it there, or on the operator's host and copy the bundle.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from server.deploy.certs import NodeKeyPair, write_private, write_public

BUNDLE_FORMAT = 1
BUNDLE_FILES = ("bundle.json", "node.key", "node.pub", "ca.crt")


class EnrollError(RuntimeError):
    """Enrolment failed; the message says why."""


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

    def validate(self) -> None:
        if self.format != BUNDLE_FORMAT:
            raise ValueError(
                f"bundle format {self.format} is not supported (expected {BUNDLE_FORMAT})"
            )
        if not self.name:
            raise ValueError("bundle has no name")
        if ":" not in self.superlink:
            raise ValueError(f"bundle SuperLink address {self.superlink!r} is not host:port")
        if self.num_partitions < 1 or not 0 <= self.partition_id < self.num_partitions:
            raise ValueError(
                f"bundle partition-id {self.partition_id} out of range for "
                f"{self.num_partitions} partitions"
            )


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


def write_bundle(
    dest: Path, info: BundleInfo, keys: NodeKeyPair, ca_cert_pem: bytes, *, force: bool = False
) -> Path:
    """Write a bundle to `dest`: a directory, or a tarball if `dest` ends in .tar.gz/.tgz."""
    info.validate()
    as_tar = dest.name.endswith((".tar.gz", ".tgz"))
    if dest.exists() and not force:
        raise FileExistsError(f"{dest} exists: remove it or pass --force")
    meta = (json.dumps(asdict(info), indent=2) + "\n").encode()
    if not as_tar:
        dest.mkdir(parents=True, exist_ok=True)
        dest.chmod(0o700)
        write_private(dest / "node.key", keys.private_openssh)
        write_public(dest / "node.pub", keys.public_openssh)
        write_public(dest / "ca.crt", ca_cert_pem)
        write_public(dest / "bundle.json", meta)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".bundle-", suffix=".tar.gz", dir=dest.parent)
    os.fchmod(fd, 0o600)  # the tarball holds the private key
    with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
        for name, data, mode in (
            ("bundle.json", meta, 0o644),
            ("node.key", keys.private_openssh, 0o600),
            ("node.pub", keys.public_openssh, 0o644),
            ("ca.crt", ca_cert_pem, 0o644),
        ):
            member = tarfile.TarInfo(name)
            member.size = len(data)
            member.mode = mode
            member.mtime = int(datetime.now(UTC).timestamp())
            tar.addfile(member, io.BytesIO(data))
    os.replace(tmp_name, dest)
    return dest


def _read_info(path: Path) -> BundleInfo:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        info = BundleInfo(**data)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"{path} is not a valid bundle description: {exc}") from exc
    info.validate()
    return info


def open_bundle(path: Path, unpack_dir: Path | None = None) -> Bundle:
    """Open a bundle directory or tarball (unpacked into `unpack_dir`, default
    ``$FEDSQUEEZE_HOME/bundles/<name>``, mode 0700)."""
    if not path.exists():
        raise FileNotFoundError(f"bundle {path} does not exist")
    if path.is_dir():
        root = path
    else:
        try:
            tar = tarfile.open(path, mode="r:*")  # noqa: SIM115 - closed by the `with` below
        except (tarfile.TarError, OSError) as exc:
            raise ValueError(
                f"{path} is neither a bundle directory nor a readable tarball: {exc}"
            ) from exc
        with tar:
            names = set(tar.getnames())
            missing = [n for n in BUNDLE_FILES if n not in names]
            if missing:
                raise ValueError(f"bundle {path} lacks {', '.join(missing)}")
            meta = tar.extractfile("bundle.json")
            assert meta is not None
            info = BundleInfo(**json.loads(meta.read().decode()))
            info.validate()
            if unpack_dir is None:
                from api.settings import fedsqueeze_home

                unpack_dir = fedsqueeze_home() / "bundles" / info.name
            unpack_dir.mkdir(parents=True, exist_ok=True)
            unpack_dir.chmod(0o700)
            for name in BUNDLE_FILES:
                member = tar.extractfile(name)
                assert member is not None
                data = member.read()
                if name == "node.key":
                    write_private(unpack_dir / name, data)
                else:
                    write_public(unpack_dir / name, data)
        root = unpack_dir
    missing = [n for n in BUNDLE_FILES if not (root / n).is_file()]
    if missing:
        raise ValueError(f"bundle {root} lacks {', '.join(missing)}")
    key = root / "node.key"
    mode = key.stat().st_mode & 0o777
    if mode & 0o077:
        raise PermissionError(
            f"{key} is readable by others (mode {mode:o}): run `chmod 600 {key}` first"
        )
    return Bundle(root, _read_info(root / "bundle.json"))


class RestClients:
    """The client-management calls of the REST service (admin token)."""

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
            raise EnrollError(f"{method} {path} failed with HTTP {response.status_code}: {detail}")
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
    """Make a key pair, enrol it over REST, write the bundle; return (path, info)."""
    if dest.exists() and not force:
        raise FileExistsError(f"{dest} exists: remove it or pass --force")
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
    keys = NodeKeyPair.generate()
    with RestClients(api_url, token) as api:
        result = api.enroll(name, keys.public_pem, location)
    info.node_id = int(result["node_id"])
    info.client_id = int(result["id"]) if result.get("id") is not None else None
    return write_bundle(dest, info, keys, ca_cert_pem, force=force), info
