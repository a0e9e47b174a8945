"""A SuperNode's authentication key pair, and the public keys Flower accepts.

Made with the `cryptography` package; both sides use it: a device makes its key pair at
enrolment (`client.enroll`), the server registers the public key with the SuperLink
(`server.deploy.registrar`). A SuperNode key is ECDSA on NIST P-384 (SECP384R1), the curve
Flower's ``flwr supernode register`` documents (any NIST curve is accepted by flwr 1.42's
``uses_nist_ec_curve``); the private key is stored in OpenSSH format, which is what
``flower-supernode --auth-supernode-private-key`` loads, the public key in OpenSSH format
as ``flwr supernode register`` reads it, and registration sends it as PEM
SubjectPublicKeyInfo (Flower's ``public_key_to_bytes``). Private keys are written with
`core.files.write_private` and never logged or printed.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

#: the curve of every key fedsqueeze makes (node keys, the CA, the server certificate)
CURVE = ec.SECP384R1


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


def fingerprint(public_pem: bytes) -> str:
    """SHA-256 of the public key's DER encoding, hex (safe to log and show)."""
    key = load_public_key(public_pem)
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = hashes.Hash(hashes.SHA256())
    digest.update(der)
    return digest.finalize().hex()
