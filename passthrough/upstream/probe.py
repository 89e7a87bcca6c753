"""A cheap reachability probe of a registry, for GET /ready: ``GET /v2/`` with a short
timeout, through the outbound policy like every other upstream connection.

No credentials are sent: a 401 (the registry asks for them) proves it reachable as well
as a 200 does, and the answer never depends on, or reveals, the service's identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

import requests

from passthrough.errors import PassthroughError
from passthrough.upstream.failures import cannot_connect, timed_out
from passthrough.upstream.netguard import GuardedAdapter, HostPolicy
from passthrough.upstream.trust import tls_failure

#: Seconds a probe waits to connect, and then for the answer.
PROBE_TIMEOUT = 2.0
USER_AGENT = "passthrough-ready-probe"


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    #: The HTTP status of ``GET /v2/``; None when there was no answer.
    status: int | None
    detail: str


def probe_registry(url: str, policy: HostPolicy, timeout: float = PROBE_TIMEOUT) -> ProbeResult:
    """``GET <url>/v2/``: reachable when it answers 2xx or 401."""
    host = urlsplit(url).netloc
    session = requests.Session()
    # No proxy, .netrc or CA bundle from the environment, as for the registry client;
    # UPSTREAM_CA_FILE's CAs come with the policy, through the adapter.
    session.trust_env = False
    session.headers["User-Agent"] = USER_AGENT
    adapter = GuardedAdapter(policy, pool_connections=1, pool_maxsize=1, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    try:
        response = session.get(
            url.rstrip("/") + "/v2/", timeout=timeout, allow_redirects=False, stream=True
        )
        response.close()
    except PassthroughError as exc:  # refused by the outbound policy
        return ProbeResult(False, None, exc.message)
    except requests.Timeout as exc:
        connecting = isinstance(exc, requests.ConnectTimeout)
        detail = timed_out(url, connecting=connecting, seconds=timeout, bounded=False)
        return ProbeResult(False, None, detail)
    except requests.exceptions.SSLError as exc:
        return ProbeResult(False, None, tls_failure(url, exc))
    except requests.ConnectionError as exc:
        return ProbeResult(False, None, cannot_connect(url, exc))
    except requests.RequestException as exc:
        return ProbeResult(False, None, f"{host}: {type(exc).__name__}")
    finally:
        session.close()
    status = response.status_code
    if status == 401:
        return ProbeResult(True, status, "reachable (it asks for credentials)")
    if 200 <= status < 300:
        return ProbeResult(True, status, "reachable")
    return ProbeResult(False, status, f"GET /v2/ answered {status}")
