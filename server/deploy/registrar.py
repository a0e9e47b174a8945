"""Registering SuperNode public keys with the SuperLink, from Python.

This does what ``flwr supernode register`` / ``unregister`` / ``ls`` do (flwr 1.42,
``flwr/cli/supernode/*.py``), with Flower's own Control API client
(``flwr.supercore.control.ControlHttpClient``, protobuf over HTTPS): no shelling out, no
Flower CLI configuration file needed. In flwr 1.42 the Control API shares the SuperLink's
single HTTPS port with the Fleet API.

The REST service (api/) receives a `SuperLinkRegistrar` (it implements the
``api.app.Registrar`` protocol: ``register(public_key_pem) -> node_id`` and
``unregister(node_id)``) so that enrolment, disabling and removal of clients over HTTP
also (un)register the node on the SuperLink.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.keys import load_public_key, public_key_pem


class RegistrarError(RuntimeError):
    """The SuperLink refused or could not be reached; the message says which."""


@dataclass(frozen=True)
class NodeInfo:
    """A SuperNode as the SuperLink lists it."""

    node_id: int
    name: str
    status: str  # "registered" | "online" | "offline" | "unregistered"
    public_key_pem: bytes
    last_activated_at: str
    registered_at: str


def _explain(exc: Exception, address: str, action: str) -> RegistrarError:
    import httpx

    if isinstance(exc, httpx.HTTPStatusError):
        body = exc.response.text.strip()[:300]
        return RegistrarError(
            f"SuperLink at {address} refused to {action}: HTTP {exc.response.status_code} {body}"
        )
    if isinstance(exc, httpx.ConnectError):
        return RegistrarError(
            f"cannot reach the SuperLink at {address} to {action}: {exc} "
            "(is `fedsqueeze server start` running, and is the CA certificate the right one?)"
        )
    return RegistrarError(f"could not {action} at the SuperLink {address}: {exc}")


class SuperLinkRegistrar:
    """Registers and unregisters SuperNode keys on one SuperLink over its Control API.

    `address` is ``host:port`` of the SuperLink; `ca_cert` the CA that signed its TLS
    certificate (TLS is always on: SuperNode authentication requires it).
    """

    def __init__(self, address: str, ca_cert: Path, timeout: float = 15.0) -> None:
        if not ca_cert.is_file():
            raise FileNotFoundError(f"CA certificate {ca_cert} does not exist")
        self.address = address
        self.ca_cert = ca_cert
        self.timeout = timeout

    def _client(self) -> Any:
        from flwr.supercore.control import ControlHttpClient
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

        return ControlHttpClient.from_server_address(
            server_address=self.address,
            insecure=False,
            root_certificates=self.ca_cert.read_bytes(),
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr CLI")],
        )

    def register_node(
        self, public_key: bytes, name: str | None = None, location: str | None = None
    ) -> int:
        from flwr.proto.control_pb2 import RegisterNodeRequest
        from flwr.supercore.utils import validate_node_location

        pem = public_key_pem(load_public_key(public_key))
        if location is not None:
            validate_node_location(location)
        client = self._client()
        try:
            response = client.RegisterNode(
                RegisterNodeRequest(public_key=pem, name=name, location=location)
            )
        except Exception as exc:
            raise _explain(exc, self.address, "register the node") from exc
        finally:
            client.close()
        if not response.node_id:
            raise RegistrarError(f"SuperLink at {self.address} returned no node id")
        return int(response.node_id)

    def unregister_node(self, node_id: int) -> None:
        from flwr.proto.control_pb2 import UnregisterNodeRequest

        client = self._client()
        try:
            client.UnregisterNode(UnregisterNodeRequest(node_id=node_id))
        except Exception as exc:
            raise _explain(exc, self.address, f"unregister node {node_id}") from exc
        finally:
            client.close()

    # ---- the interface of api.app.Registrar (the REST service calls these)
    def register(self, public_key_pem: str) -> int:
        """`register_node` for the REST service (which keeps name and location itself)."""
        return self.register_node(public_key_pem.encode("utf-8"))

    def unregister(self, node_id: int) -> None:
        """`unregister_node` for the REST service."""
        self.unregister_node(node_id)

    def list_nodes(self) -> list[NodeInfo]:
        from flwr.proto.control_pb2 import ListNodesRequest

        client = self._client()
        try:
            response = client.ListNodes(ListNodesRequest())
        except Exception as exc:
            raise _explain(exc, self.address, "list nodes") from exc
        finally:
            client.close()
        return [
            NodeInfo(
                node_id=int(n.node_id),
                name=n.name,
                status=n.status,
                public_key_pem=bytes(n.public_key),
                last_activated_at=n.last_activated_at,
                registered_at=n.registered_at,
            )
            for n in response.nodes_info
        ]
