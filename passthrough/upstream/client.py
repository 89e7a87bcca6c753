"""The registry HTTP client: V2 requests with the token dance, safe redirects and
status codes mapped to meaningful errors.

- ``trust_env=False``: no .netrc, proxy or CA settings leak in from the environment.
- Authorization goes only to the registry's own origin (and credentials to the token
  realm the registry names); a redirect to another host (S3, a CDN) gets none.
- Every failure becomes a :class:`~passthrough.errors.UpstreamError` leaf whose message
  names the cause and never holds a secret or an upstream body; a refused certificate
  is :class:`~passthrough.errors.UpstreamCertificateError`, named as such and never
  retried.
"""

from __future__ import annotations

import email.utils
import json
import logging
import random
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

import requests

from passthrough.errors import (
    PassthroughError,
    TooLarge,
    UpstreamCertificateError,
    UpstreamError,
    UpstreamForbidden,
    UpstreamInvalid,
    UpstreamNotFound,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnauthorized,
    UpstreamUnavailable,
    UpstreamUnreachable,
)
from passthrough.observe import metrics, telemetry
from passthrough.oci.manifest import MAX_MANIFEST_BYTES
from passthrough.oci.reference import DIGEST_RE
from passthrough.upstream.auth import (
    DEFAULT_EXPIRES_IN,
    Challenge,
    TokenCache,
    TokenKey,
    parse_challenges,
)
from passthrough.upstream.failures import cannot_connect, timed_out, where
from passthrough.upstream.netguard import GuardedAdapter, HostPolicy
from passthrough.upstream.target import AuthKind, Target
from passthrough.upstream.trust import tls_failure

log = logging.getLogger(__name__)

USER_AGENT = "passthrough/0.1 (+docker-save over HTTP)"
MAX_REDIRECTS = 5
MAX_TOKEN_RESPONSE_BYTES = 1 << 20


def origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, f"{(parts.hostname or '').lower()}:{port}"


@dataclass
class Timeouts:
    connect: float
    read: float

    def as_tuple(self) -> tuple[float, float]:
        return (self.connect, self.read)


#: Statuses worth another try: the registry or something in front of it is overloaded.
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
BACKOFF_BASE = 0.5
BACKOFF_CAP = 10.0


@dataclass
class RetryPolicy:
    """Retries with exponential backoff and full jitter; Retry-After honoured up to a cap;
    nothing waits past the download's deadline."""

    attempts: int = 4
    retry_after_max: float = 30.0
    deadline: float = field(default_factory=lambda: time.monotonic() + 3600.0)
    #: Set when nobody wants the result any more (the client left a download whose
    #: fetches are its own): no further retries, no waiting.
    abandoned: threading.Event | None = None

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.retry_after_max)
        ceiling = min(BACKOFF_CAP, BACKOFF_BASE * (2.0**attempt))
        return ceiling / 2 + random.uniform(0, ceiling / 2)  # noqa: S311 - jitter, not crypto

    def wait(self, attempt: int, retry_after: float | None = None) -> bool:
        """Sleep before retry number ``attempt + 1``; False when no retry is left."""
        if attempt >= self.attempts or (self.abandoned is not None and self.abandoned.is_set()):
            return False
        pause = self.delay(attempt, retry_after)
        if pause >= self.remaining():
            return False
        if self.abandoned is None:
            time.sleep(pause)
            return True
        return not self.abandoned.wait(pause)

    def check_deadline(self, what: str) -> None:
        if self.remaining() <= 0:
            raise UpstreamTimeout(f"{what}: the download took longer than DOWNLOAD_DEADLINE")


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: a number, or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


@dataclass(frozen=True)
class ManifestHead:
    """What a manifest HEAD said: ``digest`` is "" and ``size`` None when missing."""

    digest: str
    size: int | None
    media_type: str


class RegistryClient:
    """One request's conversation with one registry, for one repository.

    Shared by the threads of one download (requests' connection pool is thread-safe);
    never shared across requests, so credentials live exactly as long as the download.
    """

    def __init__(
        self,
        target: Target,
        repository: str,
        tokens: TokenCache,
        timeouts: Timeouts,
        pool_size: int = 8,
        policy: HostPolicy | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.target = target
        self.repository = repository
        self.tokens = tokens
        self.timeouts = timeouts
        self.retry = retry or RetryPolicy()
        self.session = requests.Session()
        self.session.trust_env = False
        self.session.headers["User-Agent"] = USER_AGENT
        adapter = GuardedAdapter(
            policy or HostPolicy(), pool_connections=2, pool_maxsize=pool_size, max_retries=0
        )
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        rates = (policy or HostPolicy()).rates
        #: UPSTREAM_MAX_RATE's caps for this registry (None: reads at full speed).
        self.throttle = rates.for_upstream(target.registry.url) if rates else None
        self._authorization: str | None = None
        if target.auth is AuthKind.STATIC_BEARER and target.bearer_token:
            self._authorization = f"Bearer {target.bearer_token}"
        #: What the last challenge asked for, for observability (never a secret).
        self.auth_scheme_used: str | None = None
        self.last_ratelimit_remaining: str | None = None

    def close(self) -> None:
        self.session.close()

    # -- plumbing ---------------------------------------------------------------------

    @property
    def base(self) -> str:
        return self.target.registry.url

    def _send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        *,
        stream: bool,
        what: str,
        authorization: str | None,
    ) -> requests.Response:
        """One request, retried on connection errors, timeouts, 5xx and 429."""
        attempt = 0
        while True:
            self.retry.check_deadline(what)
            try:
                response = self._send_once(
                    method, url, headers, stream=stream, what=what, authorization=authorization
                )
            except (UpstreamUnreachable, UpstreamTimeout):
                if self.retry.wait(attempt):
                    attempt += 1
                    log.info("%s: retrying after a network error (attempt %d)", what, attempt + 1)
                    continue
                raise
            if response.status_code in RETRY_STATUSES:
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                if self.retry.wait(attempt, retry_after):
                    response.close()
                    attempt += 1
                    log.info(
                        "%s: registry answered %d; retrying (attempt %d)",
                        what,
                        response.status_code,
                        attempt + 1,
                    )
                    continue
            return response

    def _send_once(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        *,
        stream: bool,
        what: str,
        authorization: str | None,
    ) -> requests.Response:
        send_headers = dict(headers)
        if authorization and origin(url) == origin(self.base):
            send_headers["Authorization"] = authorization
        call = telemetry.classify(method, url, self.base, self.target.registry.name)
        try:
            with telemetry.upstream_call(call):
                response = self.session.request(
                    method,
                    url,
                    headers=send_headers,
                    stream=stream,
                    allow_redirects=False,
                    timeout=self.timeouts.as_tuple(),
                )
        except requests.exceptions.SSLError as exc:
            # Before ConnectionError, its parent: "cannot connect" would hide that the
            # host answered and its certificate was refused (a private CA, a wrong name).
            metrics.upstream_response(call.operation, method, "tls_error")
            raise UpstreamCertificateError(f"{what}: {tls_failure(url, exc)}") from None
        except requests.Timeout as exc:
            metrics.upstream_response(call.operation, method, "timeout")
            connecting = isinstance(exc, requests.ConnectTimeout)
            seconds = self.timeouts.connect if connecting else self.timeouts.read
            raise UpstreamTimeout(
                f"{what}: {timed_out(url, connecting=connecting, seconds=seconds)}"
            ) from None
        except requests.ConnectionError as exc:
            metrics.upstream_response(call.operation, method, "connection_error")
            raise UpstreamUnreachable(f"{what}: {cannot_connect(url, exc)}") from None
        except requests.RequestException as exc:
            metrics.upstream_response(call.operation, method, "error")
            raise UpstreamError(f"{what}: request failed ({type(exc).__name__})") from None
        metrics.upstream_response(call.operation, method, str(response.status_code))
        if self.throttle is not None:
            self.throttle.wrap(response.raw)
        return response

    def get_manifest(self, reference: str, accept: str, what: str) -> tuple[bytes, str, str]:
        """``GET /v2/<repository>/manifests/<reference>``: the bytes (at most
        MAX_MANIFEST_BYTES), the media type upstream named (no parameters) and the digest
        it claimed for them (``""`` when it named none)."""
        response = self.request(
            "GET",
            f"/v2/{self.repository}/manifests/{reference}",
            headers={"Accept": accept},
            stream=True,
            what=what,
        )
        with response:
            body = read_limited(response, MAX_MANIFEST_BYTES, what)
            media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
            claimed = response.headers.get("Docker-Content-Digest", "").strip()
        return body, media_type, claimed

    def head_manifest(self, reference: str, accept: str, what: str) -> ManifestHead:
        """``HEAD /v2/<repository>/manifests/<reference>`` (free of Docker Hub's pull
        quota): the digest, size and media type upstream named, each empty (``""``,
        None) when it named none or something malformed."""
        response = self.request(
            "HEAD",
            f"/v2/{self.repository}/manifests/{reference}",
            headers={"Accept": accept},
            what=what,
        )
        response.close()
        digest = response.headers.get("Docker-Content-Digest", "").strip()
        length = response.headers.get("Content-Length", "")
        return ManifestHead(
            digest=digest if DIGEST_RE.fullmatch(digest) else "",
            size=int(length) if length.isdigit() else None,
            media_type=response.headers.get("Content-Type", "").split(";")[0].strip(),
        )

    def request(
        self,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str] | None = None,
        stream: bool = False,
        what: str,
        follow_redirects: bool = True,
    ) -> requests.Response:
        """Send a V2 request, authenticating on demand and following redirects safely.

        Returns a 2xx response (or a 3xx when ``follow_redirects`` is false); anything
        else raises the matching :class:`UpstreamError`.
        """
        url = self.base + path
        headers = dict(headers or {})

        def send() -> requests.Response:
            return self._send(
                method, url, headers, stream=stream, what=what, authorization=self._authorization
            )

        if self._authorization is None and self.target.auth is not AuthKind.STATIC_BEARER:
            remembered = self.tokens.challenges_for(self.base, self.repository)
            if remembered:
                try:
                    self._authenticate(remembered, what)
                except UpstreamError:
                    self._authorization = None  # the 401 below will tell what is needed
        response = send()
        if response.status_code == 401:
            challenges = parse_challenges(response.headers.get("WWW-Authenticate", ""))
            self.tokens.remember_challenges(self.base, self.repository, challenges)
            response.close()
            self._authenticate(challenges, what)
            response = send()
            if response.status_code == 401 and self.auth_scheme_used == "bearer":
                # A cached token may be stale or have lost its scope: one fresh try.
                retry = parse_challenges(response.headers.get("WWW-Authenticate", ""))
                response.close()
                self._authenticate(retry or challenges, what, fresh=True)
                response = send()
        hops = 0
        while follow_redirects and response.status_code in (301, 302, 303, 307, 308):
            location = response.headers.get("Location")
            response.close()
            if not location or hops >= MAX_REDIRECTS:
                raise UpstreamInvalid(f"{what}: too many or empty redirects")
            hops += 1
            url = urljoin(url, location)
            if urlsplit(url).scheme not in ("http", "https"):
                raise UpstreamInvalid(f"{what}: redirect to a non-HTTP location")
            # _send adds Authorization only when the redirect stays on the registry.
            response = self._send(
                "GET" if response.status_code == 303 else method,
                url,
                headers,
                stream=stream,
                what=what,
                authorization=self._authorization,
            )
        self._note_rate_limit(response)
        if response.status_code >= 400 or (response.status_code >= 300 and follow_redirects):
            raise_for_status(response, what)
        return response

    def _note_rate_limit(self, response: requests.Response) -> None:
        remaining = response.headers.get("ratelimit-remaining")
        if remaining:
            self.last_ratelimit_remaining = remaining.split(";")[0].strip()
            if self.target.registry.is_docker_hub:
                metrics.ratelimit_remaining(self.last_ratelimit_remaining)

    # -- authentication ----------------------------------------------------------------

    def _authenticate(self, challenges: list[Challenge], what: str, *, fresh: bool = False) -> None:
        target = self.target
        if target.auth is AuthKind.STATIC_BEARER:
            raise UpstreamUnauthorized(f"{what}: the registry rejected the configured bearer token")
        bearer = next((c for c in challenges if c.scheme == "bearer"), None)
        basic = next((c for c in challenges if c.scheme == "basic"), None)
        if bearer is not None or (target.realm_override and basic is None):
            self.auth_scheme_used = "bearer"
            self._authorization = f"Bearer {self._token(bearer, what, fresh=fresh)}"
            return
        if basic is not None:
            self.auth_scheme_used = "basic"
            if target.credentials is None:
                raise UpstreamUnauthorized(f"{what}: the registry requires credentials")
            if self._authorization == target.credentials.basic_header():
                raise UpstreamUnauthorized(f"{what}: the registry rejected the credentials")
            self._authorization = target.credentials.basic_header()
            return
        raise UpstreamUnauthorized(
            f"{what}: the registry refused access without a usable challenge"
        )

    def _token(self, challenge: Challenge | None, what: str, *, fresh: bool) -> str:
        target = self.target
        params = challenge.params if challenge else {}
        realm = target.realm_override or params.get("realm")
        if not realm:
            raise UpstreamInvalid(f"{what}: the registry's Bearer challenge names no realm")
        if urlsplit(realm).scheme not in ("http", "https"):
            raise UpstreamInvalid(f"{what}: the token realm is not an http(s) URL")
        service = target.service_override or params.get("service") or ""
        wanted = {f"repository:{self.repository}:pull"}
        wanted.update(s for s in params.get("scope", "").split() if s)
        scopes = tuple(sorted(wanted))
        identity = target.credentials.identity if target.credentials else "anonymous"
        key = TokenKey(realm, service, scopes, identity)
        if fresh:
            self.tokens.discard(key)
        else:
            cached = self.tokens.get(key)
            if cached and f"Bearer {cached}" != self._authorization:
                return cached

        query: list[tuple[str, str]] = []
        if service:
            query.append(("service", service))
        # One `scope` parameter per scope, as the token spec and Docker Hub expect.
        query.extend(("scope", s) for s in scopes)
        headers = {"Accept": "application/json"}
        if target.credentials is not None:
            query.append(("account", target.credentials.username))
            headers["Authorization"] = target.credentials.basic_header()
        url = realm + ("&" if "?" in realm else "?") + urlencode(query)
        token_what = f"{what}: token service {urlsplit(realm).netloc}"
        # The realm's own Authorization (Basic) is passed in headers, never the registry's.
        with telemetry.token_request():
            response = self._send(
                "GET", url, headers, stream=True, what=token_what, authorization=None
            )
        with response:
            if response.status_code in (401, 403):
                if target.credentials is None:
                    raise UpstreamUnauthorized(f"{token_what} requires credentials")
                raise UpstreamUnauthorized(f"{token_what} rejected the credentials")
            if response.status_code >= 300:
                raise_for_status(response, token_what)
            body = read_limited(
                response,
                MAX_TOKEN_RESPONSE_BYTES,
                f"{token_what}: the answer",
                error=UpstreamInvalid,
            )
        try:
            document: Any = json.loads(body) if body else {}
        except ValueError:
            raise UpstreamInvalid(f"{token_what} answered something that is not JSON") from None
        if not isinstance(document, dict):
            raise UpstreamInvalid(f"{token_what} answered something that is not a token")
        token = document.get("token") or document.get("access_token")
        if not isinstance(token, str) or not token:
            raise UpstreamInvalid(f"{token_what} answered without a token")
        expires_in = document.get("expires_in")
        if not isinstance(expires_in, int | float) or expires_in <= 0:
            expires_in = DEFAULT_EXPIRES_IN
        self.tokens.put(key, token, float(expires_in))
        return token

    # -- V2 operations -----------------------------------------------------------------

    @contextmanager
    def blob(self, digest: str, *, offset: int = 0, what: str) -> Iterator[requests.Response]:
        """Stream a blob (following redirects to storage); the caller reads ``.raw`` or
        iterates. ``offset`` asks for the rest of a blob with a Range request."""
        headers = {"Accept": "*/*"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        response = self.request(
            "GET", f"/v2/{self.repository}/blobs/{digest}", headers=headers, stream=True, what=what
        )
        try:
            yield response
        finally:
            response.close()

    def blob_exists(self, digest: str, *, what: str) -> int | None:
        """HEAD a blob without following redirects (a presigned storage URL is often signed
        for GET only): 2xx or a redirect means readable. Returns the size when given."""
        response = self.request(
            "HEAD",
            f"/v2/{self.repository}/blobs/{digest}",
            what=what,
            follow_redirects=False,
        )
        response.close()
        length = response.headers.get("Content-Length")
        if response.status_code < 300 and length and length.isdigit():
            return int(length)
        return None

    def blob_size(self, digest: str, *, what: str) -> int:
        """A blob's size from a HEAD. Registries on S3 or a CDN (Docker Hub among them)
        answer it with a redirect to their storage and no Content-Length: the redirect is
        then asked (:meth:`_size_at`), without our Authorization off the registry's
        origin."""
        path = f"/v2/{self.repository}/blobs/{digest}"
        response = self.request("HEAD", path, what=what, follow_redirects=False)
        response.close()
        size = _content_length(response)
        if response.status_code < 300 and size is not None:
            return size
        location = response.headers.get("Location")
        if 300 <= response.status_code < 400 and location:
            url = urljoin(self.base + path, location)
            if urlsplit(url).scheme in ("http", "https"):
                found = self._size_at(url, what)
                if found is not None:
                    return found
        raise UpstreamInvalid(
            f"{what}: neither the registry nor the storage it redirects to gave the blob's size"
        )

    def _size_at(self, url: str, what: str) -> int | None:
        """The size of what a storage URL serves: its HEAD's Content-Length, else the total
        of a one-byte Range GET's Content-Range (a URL presigned for GET alone refuses a
        HEAD); None when neither tells."""
        for method, headers in (("HEAD", {}), ("GET", {"Range": "bytes=0-0"})):
            response = self._send(
                method, url, headers, stream=True, what=what, authorization=self._authorization
            )
            response.close()
            if response.status_code == 206:
                total = response.headers.get("Content-Range", "").rpartition("/")[2]
                if total.isdigit():
                    return int(total)
            elif response.status_code == 200:
                size = _content_length(response)
                if size is not None:
                    return size
        return None


def _content_length(response: requests.Response) -> int | None:
    length = response.headers.get("Content-Length", "")
    return int(length) if length.isdigit() else None


def read_limited(
    response: requests.Response,
    limit: int,
    what: str,
    *,
    error: type[PassthroughError] = TooLarge,
) -> bytes:
    """A body that must be small (a manifest, a config, a token, an error document):
    refused as soon as it is known to exceed ``limit``, by its Content-Length or while
    reading; a connection that breaks meanwhile is the registry's fault."""
    too_large = error(f"{what} is larger than {_human(limit)}")
    length = response.headers.get("Content-Length")
    if length and length.isdigit() and int(length) > limit:
        raise too_large
    chunks: list[bytes] = []
    total = 0
    try:
        for chunk in response.iter_content(65536):
            total += len(chunk)
            if total > limit:
                raise too_large
            chunks.append(chunk)
    except requests.RequestException:
        raise UpstreamUnreachable(f"{what}: the connection broke") from None
    return b"".join(chunks)


def _human(size: int) -> str:
    return f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"


def raise_for_status(response: requests.Response, what: str) -> None:
    """Map a non-2xx registry answer to the error that names it."""
    status = response.status_code
    if status < 300:
        return
    code = _registry_error_code(response)
    detail = f" ({code})" if code else ""
    try:
        _raise_mapped(response, status, what, detail)
    except UpstreamError as exc:
        # The registry's own code (NAME_UNKNOWN, DENIED…), for the /v2 API to pass on.
        exc.registry_code = code
        raise


def _raise_mapped(response: requests.Response, status: int, what: str, detail: str) -> None:
    if status == 404:
        raise UpstreamNotFound(f"{what}: not found on the registry{detail}")
    if status == 401:
        raise UpstreamUnauthorized(f"{what}: the registry requires other credentials{detail}")
    if status == 403:
        raise UpstreamForbidden(f"{what}: the registry denied access{detail}")
    # Overload and outages name the host that answered (the registry, or the storage
    # it redirected to): the first thing an operator checks.
    host = where(response.url) if response.url else "the registry"
    if status == 429:
        retry_after = response.headers.get("Retry-After", "").strip()
        headers = {"Retry-After": retry_after} if retry_after.isdigit() else {}
        after = f", retry after {retry_after} s" if retry_after.isdigit() else ""
        raise UpstreamRateLimited(
            f"{what}: the registry is rate-limiting us ({host} answered 429{after}){detail}",
            headers=headers,
        )
    if status in (500, 502, 503, 504):
        raise UpstreamUnavailable(f"{what}: the registry answered {status} ({host}){detail}")
    if 300 <= status < 400:
        raise UpstreamInvalid(f"{what}: unexpected redirect {status}")
    raise UpstreamError(f"{what}: the registry answered {status}{detail}")


def _registry_error_code(response: requests.Response) -> str | None:
    """The first error code of a distribution error body (MANIFEST_UNKNOWN, DENIED…),
    read only when small; codes are a fixed vocabulary, so safe to show."""
    if response.request is not None and response.request.method == "HEAD":
        return None
    try:
        document = json.loads(read_limited(response, 65536, "error body"))
        code = document["errors"][0]["code"]
    except (ValueError, KeyError, IndexError, TypeError, PassthroughError):
        return None
    if isinstance(code, str) and code.replace("_", "").isalnum() and len(code) < 64:
        return code
    return None
