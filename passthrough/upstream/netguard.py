"""Outbound connection policy: which hosts this service may connect to.

The request-selected routes let any client make the service connect anywhere, and a
registry's challenge names the token realm and its redirects name the storage host, so
all three are attacker-controlled. The policy is enforced where every connection is
made — inside the HTTP connection class of the session — so it holds for registries,
token realms and redirect targets alike, and it checks the address actually connected
to (after DNS resolution), which defeats names that resolve to a metadata endpoint.

- Always refused (unless REGISTRY_ALLOW_LINK_LOCAL=true): link-local addresses and
  cloud metadata endpoints (169.254.0.0/16 incl. 169.254.169.254, fe80::/10,
  fd00:ec2::254).
- With REGISTRY_ALLOWLIST set, every host must match one of its patterns (``ghcr.io``,
  ``*.docker.io``, ``registry.internal:5000``, ``127.0.0.1:*``), except the hosts of
  REGISTRY_URL and REGISTRY_AUTH_URL, which the operator configured.
- What reading from upstreams may cost per second (UPSTREAM_MAX_RATE,
  :mod:`passthrough.upstream.rate`), for the registry client to obey.
- The CAs a TLS connection trusts: the public ones, plus UPSTREAM_CA_FILE's when set
  (``ca_bundle``, built by :mod:`passthrough.upstream.trust`), given to every request
  by the adapter, so registries, realms and redirect targets are verified alike.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from requests import PreparedRequest, Response
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from passthrough.errors import Forbidden
from passthrough.oci.reference import quote_input
from passthrough.upstream.rate import UpstreamRates

BLOCKED_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in ("169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128", "100.100.100.200/32")
)


@dataclass(frozen=True)
class HostPolicy:
    allowlist: tuple[str, ...] = ()
    #: host or host:port that are always allowed (the operator's own registry).
    trusted: frozenset[str] = field(default_factory=frozenset)
    allow_link_local: bool = False
    #: The CA bundle file every https connection verifies with (the public CAs and the
    #: operator's, :func:`passthrough.upstream.trust.ca_bundle`); None: requests' own.
    ca_bundle: str | None = None
    #: UPSTREAM_MAX_RATE: the throttles every registry client's reads obey (None: no cap).
    rates: UpstreamRates | None = field(default=None, compare=False)

    def check_host(self, host: str, port: int | None) -> None:
        """Raise :class:`Forbidden` unless the allowlist (when set) admits host:port."""
        if not self.allowlist:
            return
        host = host.lower().strip("[]")
        candidates = {host} if port is None else {host, f"{host}:{port}"}
        if candidates & self.trusted:
            return
        for pattern in self.allowlist:
            for candidate in candidates:
                if fnmatch.fnmatchcase(candidate, pattern):
                    return
        shown = host if port is None else f"{host}:{port}"
        raise Forbidden(f"the host {quote_input(shown)} is not in REGISTRY_ALLOWLIST")

    def check_address(self, host: str, address: str) -> None:
        """Raise :class:`Forbidden` when the connected address is link-local/metadata."""
        if self.allow_link_local:
            return
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in network for network in BLOCKED_NETWORKS):
            raise Forbidden(
                f"refusing to connect to {quote_input(host)}: it resolves to a link-local "
                "or cloud metadata address"
            )


class _GuardMixin:
    policy: HostPolicy
    host: str
    port: int

    def _check_before_connect(self) -> None:
        """Host allowlist, then every address the name resolves to (so a refused target
        is a quick 403, not a connect timeout towards a metadata endpoint)."""
        self.policy.check_host(self.host, self.port)
        if self.policy.allow_link_local:
            return
        try:
            infos = socket.getaddrinfo(self.host.strip("[]"), self.port, type=socket.SOCK_STREAM)
        except OSError:
            return  # the connect below reports the resolution failure itself
        for info in infos:
            self.policy.check_address(self.host, str(info[4][0]))

    def _guarded(self, sock: socket.socket) -> socket.socket:
        """After connecting: the peer actually reached (defeats DNS rebinding between the
        check above and the connect)."""
        try:
            peer = sock.getpeername()[0]
            self.policy.check_address(self.host, peer)
        except BaseException:
            sock.close()
            raise
        return sock


class GuardedHTTPConnection(_GuardMixin, HTTPConnection):
    def _new_conn(self) -> socket.socket:
        self._check_before_connect()
        return self._guarded(super()._new_conn())


class GuardedHTTPSConnection(_GuardMixin, HTTPSConnection):
    def _new_conn(self) -> socket.socket:
        self._check_before_connect()
        return self._guarded(super()._new_conn())


class GuardedAdapter(HTTPAdapter):
    """An HTTPAdapter whose connections obey a :class:`HostPolicy`."""

    def __init__(self, policy: HostPolicy, **kwargs: Any) -> None:
        self.policy = policy
        super().__init__(**kwargs)

    def send(
        self,
        request: PreparedRequest,
        stream: bool = False,
        timeout: float | tuple[float, float] | tuple[float, None] | None = None,
        verify: bool | str = True,
        cert: bytes | str | tuple[bytes | str, bytes | str] | None = None,
        proxies: Mapping[str, str] | None = None,
    ) -> Response:
        # Here rather than on each session: every request of every session this adapter
        # serves (the registry client's, the /ready probe's) verifies with the bundle.
        # Only the default is replaced; nothing here ever turns verification off.
        if verify is True and self.policy.ca_bundle is not None:
            verify = self.policy.ca_bundle
        return super().send(
            request, stream=stream, timeout=timeout, verify=verify, cert=cert, proxies=proxies
        )

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        policy = self.policy
        http_conn = type("PolicyHTTPConnection", (GuardedHTTPConnection,), {"policy": policy})
        https_conn = type("PolicyHTTPSConnection", (GuardedHTTPSConnection,), {"policy": policy})
        self.poolmanager.pool_classes_by_scheme = {
            "http": type("PolicyHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": http_conn}),
            "https": type("PolicyHTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": https_conn}),
        }


def trusted_hosts(urls: Iterable[str | None]) -> frozenset[str]:
    from urllib.parse import urlsplit

    hosts: set[str] = set()
    for url in urls:
        if not url:
            continue
        parts = urlsplit(url)
        if parts.hostname:
            port = parts.port or (443 if parts.scheme == "https" else 80)
            hosts.add(f"{parts.hostname.lower()}:{port}")
    return frozenset(hosts)
