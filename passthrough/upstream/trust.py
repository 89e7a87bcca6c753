"""Which certificate authorities upstream TLS connections trust, and how a failed
verification is told.

By default an upstream's certificate is verified against certifi's public CAs (what
requests uses; ``trust_env=False`` keeps REQUESTS_CA_BUNDLE and SSL_CERT_FILE out).
UPSTREAM_CA_FILE adds an operator's CAs — an internal Harbor, Artifactory or
distribution registry signed by a corporate CA — *to* those, so Docker Hub and ghcr.io
keep verifying: :func:`ca_bundle` writes certifi's bundle followed by the operator's
certificates to one file, once per process, and the outbound adapter
(:class:`~passthrough.upstream.netguard.GuardedAdapter`) hands that path to every
request as ``verify``. Verification is never turned off.

Why a file rather than an ``ssl.SSLContext``: requests (2.34, pinned here) takes its
trust as ``verify=<path>`` and, in ``HTTPAdapter.cert_verify``, sets the connection's
``ca_certs`` to certifi's path whenever ``verify`` is True — a context given to the
pool would have certifi loaded into it again on every connect, and keeping requests
from doing so means overriding private parts of the adapter. A path is the interface
requests documents and urllib3 loads it per connection exactly as it loads certifi's
today, so the cost is unchanged.

The file lives in a private directory (0700, owned by this user) under TMPDIR, named
by the hash of its content, written 0600 and atomically: the workers of one master
and a restart with the same CAs all land on the same file; new CAs get a new one.
"""

from __future__ import annotations

import hashlib
import os
import ssl
import tempfile
import threading
from pathlib import Path
from urllib.parse import urlsplit

from requests.utils import DEFAULT_CA_BUNDLE_PATH

from passthrough.config import ConfigError, read_ca_file
from passthrough.tls import private_directory, write_atomically

VARIABLE = "UPSTREAM_CA_FILE"

_lock = threading.Lock()
#: (the directory, the operator's certificates) -> the bundle written for them.
_bundles: dict[tuple[str, str], Path] = {}


def bundle_directory() -> Path:
    """``$TMPDIR/passthrough-upstream-ca-<uid>``: private to this user."""
    return Path(tempfile.gettempdir()) / f"passthrough-upstream-ca-{os.getuid()}"


def bundle_pem(extra_pem: str) -> bytes:
    """The public CAs requests verifies with by default (certifi's bundle, as requests
    names it: the same file ``verify=True`` would load), then the operator's."""
    public = Path(DEFAULT_CA_BUNDLE_PATH).read_bytes()
    if not public.endswith(b"\n"):
        public += b"\n"
    header = f"# {VARIABLE}: the operator's certificate authorities\n".encode()
    return public + header + extra_pem.encode("ascii")


def ca_bundle(extra_file: str, directory: Path | None = None) -> Path:
    """The path of the CA bundle for UPSTREAM_CA_FILE ``extra_file``, written the first
    time it is asked for in this process. Raises :class:`ConfigError` naming
    UPSTREAM_CA_FILE when the file is unusable or the bundle cannot be written."""
    extra_pem = read_ca_file(extra_file, VARIABLE)
    where = directory or bundle_directory()
    key = (str(where), extra_pem)
    with _lock:
        found = _bundles.get(key)
        if found is not None and found.is_file():
            return found
        private_directory(where, f"{VARIABLE}'s bundle directory")
        try:
            data = bundle_pem(extra_pem)
            path = where / f"ca-bundle-{hashlib.sha256(data).hexdigest()[:16]}.pem"
            write_atomically(path, data, 0o600)
        except OSError as exc:
            raise ConfigError(
                f"{VARIABLE}: the CA bundle cannot be written to {str(where)!r}: {exc.strerror}"
            ) from None
        _bundles[key] = path
        return path


# -- telling a failed handshake -----------------------------------------------------------


def _ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    """The :class:`ssl.SSLError` under requests' and urllib3's wrappers (in ``args``,
    ``reason``, ``__cause__`` or ``__context__``), if any."""
    seen: set[int] = set()
    stack: list[object] = [exc]
    while stack:
        current = stack.pop()
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ssl.SSLError):
            return current
        stack.extend(current.args)
        stack.extend((getattr(current, "reason", None), current.__cause__, current.__context__))
    return None


def _printable(text: str, limit: int = 160) -> str:
    """OpenSSL's words, kept to one short printable line."""
    line = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return line[:limit].rstrip(" .")


def upstream_origin(url: str) -> str:
    """``https://host:port`` of ``url``, the port always shown (no path, no userinfo)."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        port = 443
    return f"{parts.scheme or 'https'}://{host}:{port}"


def tls_failure(url: str, exc: BaseException) -> str:
    """One line naming what went wrong in the TLS handshake with ``url``'s host:
    ``certificate verify failed for https://host:port (<OpenSSL's reason>)`` with a hint
    at UPSTREAM_CA_FILE, or ``TLS handshake with https://host:port failed (<reason>)``."""
    where = upstream_origin(url)
    cause = _ssl_cause(exc)
    if isinstance(cause, ssl.SSLCertVerificationError):
        reason = _printable(str(cause.verify_message or "")) or "untrusted certificate"
        return (
            f"certificate verify failed for {where} ({reason}); a registry signed by a "
            f"private CA needs that CA in {VARIABLE}"
        )
    reason = _printable(str(getattr(cause, "reason", None) or "")) if cause else ""
    return f"TLS handshake with {where} failed" + (f" ({reason})" if reason else "")
