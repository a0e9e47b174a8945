"""Certificates and keys for a deployment: a private CA, the SuperLink's TLS certificate and
the SuperNodes' authentication key pairs.

Everything is made with the `cryptography` package. Private keys are written with mode
0600 (created that way, never widened afterwards) and are never logged or printed.

* The CA is a self-signed ECDSA P-384 certificate (``ca.crt``/``ca.key``).
* The server certificate (``server.crt``/``server.key``) is signed by that CA and lists as
  subject alternative names ``localhost``, ``127.0.0.1``, ``::1`` and whatever DNS names or
  IP addresses the operator adds (the names the SuperNodes will dial).
* A SuperNode key is ECDSA on NIST P-384 (SECP384R1), the curve Flower's
  ``flwr supernode register`` documents (any NIST curve is accepted by flwr 1.42's
  ``uses_nist_ec_curve``); the private key is stored in OpenSSH format, which is what
  ``flower-supernode --auth-supernode-private-key`` loads, the public key in OpenSSH format
  as ``flwr supernode register`` reads it, and registration sends it as PEM
  SubjectPublicKeyInfo (Flower's ``public_key_to_bytes``).
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: default SANs of the server certificate, always present
DEFAULT_SERVER_NAMES: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
#: the curve of every key made here
CURVE = ec.SECP384R1


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` with mode 0600 from the start (no window with wider rights)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_public(path: Path, data: bytes) -> None:
    """Write a public file (certificate, public key) with mode 0644."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(0o644)


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san_entry(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        if not name or any(c.isspace() for c in name):
            raise ValueError(f"invalid server name {name!r} for the certificate") from None
        return x509.DNSName(name)


@dataclass(frozen=True)
class TlsFiles:
    """Paths of the TLS material in a data directory."""

    ca_cert: Path
    ca_key: Path | None
    server_cert: Path
    server_key: Path

    @classmethod
    def in_dir(cls, directory: Path) -> TlsFiles:
        return cls(
            ca_cert=directory / "ca.crt",
            ca_key=directory / "ca.key",
            server_cert=directory / "server.crt",
            server_key=directory / "server.key",
        )

    def exist(self) -> bool:
        return self.ca_cert.is_file() and self.server_cert.is_file() and self.server_key.is_file()


def make_ca(common_name: str = "fedsqueeze CA", days: int = 3650) -> tuple[bytes, bytes]:
    """A self-signed CA: returns (certificate PEM, private key PEM)."""
    key = ec.generate_private_key(CURVE())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _pem_private(key)


def make_server_cert(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    names: list[str] | tuple[str, ...] = (),
    days: int = 825,
) -> tuple[bytes, bytes]:
    """A server certificate signed by the CA for ``DEFAULT_SERVER_NAMES + names``."""
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the CA key must be an EC private key")
    all_names = list(dict.fromkeys([*DEFAULT_SERVER_NAMES, *names]))
    key = ec.generate_private_key(CURVE())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, all_names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([_san_entry(n) for n in all_names]), critical=False
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _pem_private(key)


def ensure_tls(directory: Path, server_names: list[str] | tuple[str, ...] = ()) -> TlsFiles:
    """Create the CA and server certificate in `directory` unless they exist.

    Returns the paths. Existing files (the operator's own or from an earlier start) are kept
    as they are.
    """
    files = TlsFiles.in_dir(directory)
    if files.exist():
        return files
    if files.server_cert.exists() or files.server_key.exists():
        raise FileExistsError(
            f"{directory} has a partial set of TLS files: provide ca.crt, server.crt and "
            "server.key together, or remove them to have new ones made"
        )
    if files.ca_cert.exists():
        if files.ca_key is None or not files.ca_key.exists():
            raise FileNotFoundError(
                f"{files.ca_cert} exists but its key ca.key does not: cannot sign a server "
                "certificate; provide server.crt and server.key too"
            )
        ca_pem, ca_key_pem = files.ca_cert.read_bytes(), files.ca_key.read_bytes()
    else:
        ca_pem, ca_key_pem = make_ca()
        assert files.ca_key is not None
        write_private(files.ca_key, ca_key_pem)
        write_public(files.ca_cert, ca_pem)
    cert_pem, key_pem = make_server_cert(ca_pem, ca_key_pem, server_names)
    write_private(files.server_key, key_pem)
    write_public(files.server_cert, cert_pem)
    return files


def install_tls(directory: Path, ca_cert: Path, server_cert: Path, server_key: Path) -> TlsFiles:
    """Copy operator-supplied TLS files into `directory` (the key with mode 0600)."""
    for p in (ca_cert, server_cert, server_key):
        if not p.is_file():
            raise FileNotFoundError(f"TLS file {p} does not exist")
    ca_pem = ca_cert.read_bytes()
    cert_pem = server_cert.read_bytes()
    key_pem = server_key.read_bytes()
    try:
        x509.load_pem_x509_certificate(ca_pem)
        x509.load_pem_x509_certificate(cert_pem)
        serialization.load_pem_private_key(key_pem, password=None)
    except ValueError as exc:
        raise ValueError(f"invalid TLS material: {exc}") from exc
    files = TlsFiles.in_dir(directory)
    write_public(files.ca_cert, ca_pem)
    write_public(files.server_cert, cert_pem)
    write_private(files.server_key, key_pem)
    return TlsFiles(files.ca_cert, None, files.server_cert, files.server_key)


@dataclass(frozen=True)
class NodeKeyPair:
    """A SuperNode's authentication key pair (P-384)."""

    private_openssh: bytes  # secret: write with `write_private`, never log
    public_openssh: bytes
    public_pem: bytes  # what the SuperLink's registry stores (SubjectPublicKeyInfo PEM)

    @classmethod
    def generate(cls) -> NodeKeyPair:
        key = ec.generate_private_key(CURVE())
        return cls.from_private_key(key)

    @classmethod
    def from_private_key(cls, key: ec.EllipticCurvePrivateKey) -> NodeKeyPair:
        pub = key.public_key()
        return cls(
            private_openssh=key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            ),
            public_openssh=pub.public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
            ),
            public_pem=public_key_pem(pub),
        )

    def __repr__(self) -> str:  # never show the private key
        return f"NodeKeyPair(public={self.public_openssh.decode()[:40]}...)"


def public_key_pem(pub: ec.EllipticCurvePublicKey) -> bytes:
    """PEM SubjectPublicKeyInfo, byte-identical to flwr's ``public_key_to_bytes``."""
    return pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_public_key(data: bytes) -> ec.EllipticCurvePublicKey:
    """Load an EC public key given as OpenSSH or PEM; reject non-NIST curves."""
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        else:
            key = serialization.load_ssh_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not a valid public key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError(f"not an EC public key (got {type(key).__name__})")
    if not isinstance(
        key.curve, ec.SECP256R1 | ec.SECP384R1 | ec.SECP521R1 | ec.SECP224R1 | ec.SECP192R1
    ):
        raise ValueError(f"EC curve {key.curve.name} is not a NIST curve Flower accepts")
    return key


def certificate_names(cert_pem: bytes) -> list[str]:
    """The DNS names and IP addresses a certificate is valid for (its SANs)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName)] + [
        str(ip) for ip in san.get_values_for_type(x509.IPAddress)
    ]


def fingerprint(public_pem: bytes) -> str:
    """SHA-256 of the public key's DER encoding, hex (safe to log and show)."""
    key = load_public_key(public_pem)
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = hashes.Hash(hashes.SHA256())
    digest.update(der)
    return digest.finalize().hex()
