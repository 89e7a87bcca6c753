"""The client's address behind a reverse proxy (TRUSTED_PROXIES).

Behind a Kubernetes ingress or a load balancer every connection comes from the proxy,
so the address that failed logins are counted and rate limited against
(:meth:`passthrough.registry.access.Gate.login`), the access log and the request spans
would all name the proxy: one client typing a wrong password ten times would lock
every user out. A proxy that the operator trusts says who its client was in
``X-Forwarded-For``; this WSGI middleware puts that address in ``REMOTE_ADDR``, once,
before Flask, OpenTelemetry and gunicorn's access log read it (they share the environ).

Only a trusted peer's header counts, and in it only what trusted hops appended: the
list is read from the right, past every trusted address, and the first address that is
not trusted is the client (whatever a client writes at the left of the header itself
cannot make it anyone else). The peer's own address stays in the environ as
``passthrough.peer``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

PEER_KEY = "passthrough.peer"


def _address(text: str) -> IPAddress | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # [2001:db8::1]:443, as some proxies write it
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # 192.0.2.7:51234
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    # An IPv4 client seen through an IPv6 socket (::ffff:192.0.2.7) is that IPv4 client.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class ClientAddress:
    """Sets ``REMOTE_ADDR`` to the client a trusted proxy forwarded for."""

    def __init__(self, app: WSGIApplication, trusted: Iterable[str]) -> None:
        self.app = app
        self.trusted: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(n) for n in trusted)

    def is_trusted(self, address: IPAddress) -> bool:
        return any(address.version == net.version and address in net for net in self.trusted)

    def client_of(self, peer: str, forwarded_for: str | None) -> str:
        """The client's address: ``peer`` unless it is trusted and says otherwise."""
        current = _address(peer)
        if current is None or not forwarded_for or not self.is_trusted(current):
            return peer
        for item in reversed(forwarded_for.split(",")):
            hop = _address(item)
            if hop is None:
                # Not an address (unknown, a hostname, garbage): what lies to its left
                # was not written by a hop we trust; the last good hop is the client.
                break
            current = hop
            if not self.is_trusted(hop):
                break
        return str(current)

    def __call__(self, request: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        # ``request`` is the WSGI environ: the request's variables, not the process's.
        peer = request.get("REMOTE_ADDR") or ""
        request[PEER_KEY] = peer
        request["REMOTE_ADDR"] = self.client_of(peer, request.get("HTTP_X_FORWARDED_FOR"))
        return self.app(request, start_response)
