"""Small facts about network addresses, shared by the REST service and the launcher."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps a service on this machine (``localhost``, 127/8,
    ``::1``); ``0.0.0.0``, ``::`` and every other address or name count as exposed."""
    host = host.strip().strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
