"""Why a connection to an upstream failed, in one line that names the host and the
cause: the name does not resolve (DNS), nothing listens on the port (refused), the
host is unreachable, the connection was reset, or it timed out (a failed TLS
handshake has its own words, :func:`passthrough.upstream.trust.tls_failure`). The
registry client and the /ready probe both speak these words, so a log
line, a tar route's plain-text answer and a /v2 JSON error read alike, and the
README's troubleshooting table maps each wording to its fix.
"""

from __future__ import annotations

import errno
import socket

from passthrough.upstream.trust import upstream_origin

#: getaddrinfo's codes for "this name has no address" (as opposed to a DNS server
#: that did not answer, EAI_AGAIN).
_NAME_NOT_FOUND = frozenset(
    code
    for code in (
        getattr(socket, "EAI_NONAME", None),
        getattr(socket, "EAI_NODATA", None),
    )
    if code is not None
)
_UNREACHABLE = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EHOSTDOWN})


def where(url: str) -> str:
    """``host:port`` of ``url`` (the port always shown, so a wrong one is visible)."""
    return upstream_origin(url).partition("://")[2]


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and what lies under requests' and urllib3's wrappers (``args``,
    ``reason``, ``__cause__``, ``__context__``), outermost first."""
    seen: set[int] = set()
    found: list[BaseException] = []
    stack: list[object] = [exc]
    while stack:
        current = stack.pop(0)
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        found.append(current)
        stack.extend(current.args)
        stack.extend((getattr(current, "reason", None), current.__cause__, current.__context__))
    return found


def connection_cause(exc: BaseException) -> str:
    """The cause of a failed connection, in a few words: ``DNS name not found``,
    ``connection refused``…; ``""`` when nothing underneath says."""
    for cause in _causes(exc):
        if isinstance(cause, socket.gaierror):
            if cause.errno in _NAME_NOT_FOUND:
                return "DNS name not found (the host name does not resolve)"
            return "DNS lookup failed (no answer from the DNS server)"
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused (nothing listens on that port)"
        if isinstance(cause, ConnectionResetError):
            return "connection reset by the peer"
        if isinstance(cause, OSError) and cause.errno in _UNREACHABLE:
            return "no route to the host (network unreachable)"
    # urllib3 names a failed resolution in words only, without the gaierror, when it
    # resolves itself; "Name or service not known" is glibc's, "nodename nor servname"
    # musl's and BSD's.
    text = " ".join(str(cause) for cause in _causes(exc))
    if "Name or service not known" in text or "nodename nor servname" in text:
        return "DNS name not found (the host name does not resolve)"
    return ""


def cannot_connect(url: str, exc: BaseException) -> str:
    """``cannot connect to host:port: <cause>`` (the cause left out when unknown)."""
    cause = connection_cause(exc)
    return f"cannot connect to {where(url)}" + (f": {cause}" if cause else "")


def timed_out(url: str, *, connecting: bool, seconds: float, bounded: bool = True) -> str:
    """A connect timeout (the host never accepted) or a read timeout (it accepted and
    then said nothing); ``bounded``: name the setting that sets the limit."""
    if connecting:
        setting = ", UPSTREAM_CONNECT_TIMEOUT" if bounded else ""
        return (
            f"cannot connect to {where(url)}: connect timeout (no answer in {seconds:g} s{setting})"
        )
    setting = ", UPSTREAM_READ_TIMEOUT" if bounded else ""
    return f"{where(url)} did not answer in {seconds:g} s (read timeout{setting})"
