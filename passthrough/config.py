"""Settings: read once from the environment (and a `.env` file) when the app is created.

Nothing here runs at import time. :func:`load_settings` validates every value and
raises :class:`ConfigError` naming the variable, so a bad deployment stops at
start-up instead of failing on the first download.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from dotenv import dotenv_values

from passthrough.oci.endpoint import (
    DOCKER_HUB_ALIASES,
    DOCKER_HUB_REALM,
    DOCKER_HUB_SERVICE,
    DOCKER_HUB_URL,
    RegistryEndpoint,
)
from passthrough.oci.platforms import Platform
from passthrough.oci.reference import PATH_COMPONENT_RE

CLIENT_AUTH_MODES = ("optional", "required", "off")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")
OTLP_PROTOCOLS = ("grpc", "http/protobuf")

_HOST_RE = re.compile(
    r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)(?::\d{1,5})?$"
)


STORES = ("filesystem", "s3")
PROXY_MODES = ("transparent", "authenticated")
_ALIAS_RE = re.compile(r"^[a-z0-9]+(?:[._-][a-z0-9]+)*$")


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    """Validated settings of one running service."""

    registry: RegistryEndpoint = field(
        default_factory=lambda: RegistryEndpoint(DOCKER_HUB_URL, "docker.io")
    )
    registry_auth_url: str | None = None
    registry_service: str | None = None
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    bearer_token: str | None = field(default=None, repr=False)
    client_auth: str = "optional"
    default_namespace: str | None = None
    log_level: str = "INFO"
    #: text, or json (one object per line).
    log_format: str = "text"
    # Timeouts for upstream requests, in seconds.
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    # How many layers of one download are fetched at once.
    layer_concurrency: int = 3
    # Where temp files go (None: the system default, honouring TMPDIR).
    temp_dir: str | None = None
    #: The content store's backend: "filesystem" (CACHE_DIR) or "s3" (S3_BUCKET).
    store: str = "filesystem"
    # The shared layer cache on disk (STORE=filesystem): off when cache_dir is None.
    cache_dir: str | None = None
    #: The store's size limit (least recently used evicted); 0: no limit (S3's default,
    #: where a lifecycle rule usually expires objects instead).
    cache_max_bytes: int = 20 << 30
    # STORE=s3: bucket, key prefix, endpoint of an S3-compatible service (None: AWS),
    # region (None: the AWS chain's), a lifecycle rule's expiry in days (0: none).
    s3_bucket: str | None = None
    s3_prefix: str = ""
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_lifecycle_days: int = 0
    #: Redis for the cross-replica single-flight lock; None: one fetch per replica.
    redis_url: str | None = field(default=None, repr=False)
    #: Seconds a lock outlives a replica killed while holding it.
    redis_lock_lease: float = 60.0
    # Serve the last known digest of a tag while the registry is unreachable.
    serve_stale: bool = False
    # The platform picked from a multi-platform image when the request names none.
    default_platform: str = "linux/amd64"
    # Upstream faults: retries with backoff and jitter, a cap on honoured Retry-After,
    # and a deadline for a whole download's upstream work.
    upstream_retries: int = 4
    retry_after_max: float = 30.0
    download_deadline: float = 3600.0
    # Limits.
    max_image_bytes: int = 20 << 30
    max_layers: int = 500
    #: Concurrent downloads per worker; 0 means "gunicorn threads minus 2".
    max_concurrent_downloads: int = 0
    #: Seconds a client may leave sent data unacknowledged before it is dropped.
    client_idle_timeout: float = 120.0
    # Outbound policy (passthrough.netguard).
    registry_allowlist: tuple[str, ...] = ()
    allow_link_local: bool = False
    # -- the /v2 API ---------------------------------------------------------------------
    #: UPSTREAMS: (alias, endpoint) pairs; ``/v2/<alias>/<repository>/…`` is proxied there.
    upstreams: tuple[tuple[str, RegistryEndpoint], ...] = ()
    #: REGISTRY_AUTH_FILE: the service's identity per upstream host (docker config.json).
    upstream_credentials: dict[str, tuple[str, str]] = field(default_factory=dict, repr=False)
    #: UPSTREAM_CA_FILE: a PEM file of CA certificates trusted for every upstream
    #: connection (registries, token realms, blob redirects) besides the public CAs.
    upstream_ca_file: str | None = None
    #: PROXY_MODE: "transparent" (the service's identity upstream; cached content is
    #: served to anyone who reaches the port) or "authenticated" (each client's own).
    proxy_mode: str = "transparent"
    #: PUBLIC_URL: how clients reach this service (the token realm); never the Host header.
    public_url: str | None = None
    #: TOKEN_SECRET: the key every worker and replica signs and encrypts tokens with.
    token_secret: str | None = field(default=None, repr=False)
    #: Seconds a token passthrough issues stays valid.
    token_ttl: int = 300
    #: Seconds a tag is trusted without asking upstream again (0: a HEAD every time).
    tag_ttl: float = 0.0
    #: Serve a tag seen before from the store while upstream is down (/v2 only).
    proxy_serve_stale: bool = True
    #: Answer a blob hit on the S3 store with a 307 to a presigned URL.
    s3_redirect: bool = False
    # TLS (gunicorn's certfile/keyfile, or a certificate made at start-up).
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_self_signed: bool = False
    tls_names: tuple[str, ...] = ("localhost", "127.0.0.1")
    #: TLS_DIR: where TLS_SELF_SIGNED keeps its CA and certificate (None: a private
    #: directory under TMPDIR); on a volume, the CA outlives restarts.
    tls_dir: str | None = None

    # -- the hosted area --------------------------------------------------------------------
    #: HOSTED_REPOSITORIES: glob patterns (``*`` one component, ``**`` any depth) of the
    #: repositories pushed into passthrough; never fetched from any upstream.
    hosted_repositories: tuple[str, ...] = ()
    #: HTPASSWD_FILE: passthrough's own users (bcrypt, ``htpasswd -B``).
    htpasswd_file: str | None = None
    #: ACCESS_FILE: YAML narrowing who may pull, push and delete which repositories.
    access_file: str | None = None
    #: Anonymous clients may pull hosted repositories.
    hosted_anonymous_pull: bool = False
    #: The largest manifest a push may PUT.
    hosted_manifest_max_bytes: int = 4 << 20

    # -- the clients' addresses -------------------------------------------------------------
    #: TRUSTED_PROXIES: addresses and networks (an ingress, a load balancer) whose
    #: X-Forwarded-For names the client. Empty: the peer of the connection is the client.
    trusted_proxies: tuple[str, ...] = ()

    @property
    def auth_enabled(self) -> bool:
        """Whether /v2 asks clients to authenticate (the Bearer challenge): with
        PROXY_MODE=authenticated, or when passthrough has users of its own."""
        return self.proxy_mode == "authenticated" or self.htpasswd_file is not None

    @property
    def uses_client_identity(self) -> bool:
        """Whether proxied reads go upstream with each client's own identity, every
        cached read confirmed upstream first (PROXY_MODE=authenticated). Users of the
        hosted area (HTPASSWD_FILE) turn authentication on without changing this: in
        transparent mode the service's identity still serves proxied names."""
        return self.proxy_mode == "authenticated"

    @property
    def tls_enabled(self) -> bool:
        return self.tls_self_signed or self.tls_cert_file is not None

    @property
    def has_env_credentials(self) -> bool:
        return bool(self.username and self.password)


def normalize_registry(value: str, *, variable: str = "REGISTRY_URL") -> RegistryEndpoint:
    """Turn `docker.io`, `host:5000` or `http://host:5000/` into an endpoint.

    Every Docker Hub alias means the same registry; a value without a scheme is https.
    """
    raw = value.strip()
    if not raw:
        raise ConfigError(f"{variable} is empty")
    if "://" not in raw:
        raw = "https://" + raw
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"{variable} must use http or https, not {parts.scheme!r}")
    if parts.username or parts.password:
        raise ConfigError(f"{variable} must not carry credentials; use REGISTRY_USERNAME/PASSWORD")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"{variable} must be scheme://host[:port] with no path")
    host = parts.netloc.lower()
    if not _HOST_RE.match(host):
        raise ConfigError(f"{variable} has an invalid host {parts.netloc!r}")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"{variable} has an invalid port") from None
    if port == 0 or parts.netloc.endswith(":"):
        raise ConfigError(f"{variable} has an invalid port")
    if host in DOCKER_HUB_ALIASES:
        return RegistryEndpoint(DOCKER_HUB_URL, "docker.io")
    return RegistryEndpoint(f"{parts.scheme}://{host}", host)


def _optional(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    if value is None:
        return None
    value = value.strip()
    return value or None


def _number(env: Mapping[str, str], name: str, default: float, *, minimum: float) -> float:
    raw = _optional(env, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum:g}, got {raw!r}")
    return value


def _integer(env: Mapping[str, str], name: str, default: int, *, minimum: int) -> int:
    raw = _optional(env, name)
    if raw is None:
        return default
    if not re.fullmatch(r"\d+", raw):
        raise ConfigError(f"{name} must be a whole number, got {raw!r}")
    value = int(raw)
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {raw!r}")
    return value


_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _size(env: Mapping[str, str], name: str, default: int) -> int:
    """A byte count: 1073741824, 500M, 20GiB, 1.5G (binary units)."""
    raw = _optional(env, name)
    if raw is None:
        return default
    match = _SIZE_RE.match(raw)
    if not match:
        raise ConfigError(f"{name} must be a size such as 20G or 500MiB, got {raw!r}")
    unit = (match.group(2) or "").lower()[:1]
    value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise ConfigError(f"{name} must be more than zero")
    return value


def _boolean(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = _optional(env, name)
    if raw is None:
        return default
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def parse_allowlist(text: str | None) -> tuple[str, ...]:
    """Comma- or space-separated host patterns, lower-cased."""
    if not text:
        return ()
    return tuple(p.strip().lower() for p in text.replace(",", " ").split() if p.strip())


def _allowlist(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    patterns = parse_allowlist(env.get(name))
    for pattern in patterns:
        if not re.fullmatch(r"[a-z0-9.*?\[\]:-]+", pattern):
            raise ConfigError(f"{name} has an invalid host pattern {pattern!r}")
    return patterns


def parse_networks(text: str | None, name: str = "TRUSTED_PROXIES") -> tuple[str, ...]:
    """Comma- or space-separated addresses and CIDR networks, normalised
    (``10.0.0.0/8``, ``fd00::/8``, ``192.0.2.7`` → ``192.0.2.7/32``)."""
    networks: list[str] = []
    for item in (text or "").replace(",", " ").split():
        try:
            networks.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise ConfigError(f"{name} has {item!r}, which is not an address or network") from None
    return tuple(networks)


def _platform(env: Mapping[str, str], name: str) -> str:
    raw = _optional(env, name) or "linux/amd64"
    try:
        return str(Platform.parse(raw))
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def _url(env: Mapping[str, str], name: str) -> str | None:
    raw = _optional(env, name)
    if raw is None:
        return None
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{name} must be an http(s) URL")
    return raw


def parse_upstreams(text: str | None) -> tuple[tuple[str, RegistryEndpoint], ...]:
    """UPSTREAMS: ``alias=url`` pairs, comma-separated (``hub=https://registry-1.docker.io,
    lab=http://10.1.2.3:5000``)."""
    found: list[tuple[str, RegistryEndpoint]] = []
    seen: set[str] = set()
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        alias, equals, url = item.partition("=")
        alias = alias.strip().lower()
        if not equals or not url.strip():
            raise ConfigError(f"UPSTREAMS: {item!r} is not alias=url")
        if not _ALIAS_RE.fullmatch(alias) or alias == "v2":
            raise ConfigError(
                f"UPSTREAMS: alias {alias!r} must be a lowercase name such as hub or ghcr"
            )
        if alias in seen:
            raise ConfigError(f"UPSTREAMS: alias {alias!r} is given twice")
        seen.add(alias)
        found.append((alias, normalize_registry(url, variable=f"UPSTREAMS ({alias})")))
    return tuple(found)


_PATTERN_COMPONENT_RE = re.compile(r"^(?:\*\*|\*|[a-z0-9*]+(?:(?:[._]|__|[-]+)[a-z0-9*]+)*)$")


def parse_hosted_patterns(text: str | None) -> tuple[str, ...]:
    """HOSTED_REPOSITORIES: comma-separated globs over repository names, ``*`` one path
    component (or part of one), ``**`` any number of components (``team/*``,
    ``apps/**``)."""
    patterns: list[str] = []
    for item in (text or "").replace(" ", ",").split(","):
        pattern = item.strip().strip("/")
        if not pattern:
            continue
        components = pattern.split("/")
        if not all(_PATTERN_COMPONENT_RE.fullmatch(c) for c in components):
            raise ConfigError(
                f"HOSTED_REPOSITORIES: {pattern!r} is not a pattern such as team/* or apps/**"
            )
        patterns.append(pattern)
    return tuple(patterns)


def auth_file_host(key: str) -> str:
    """A config.json ``auths`` key as a host: ``https://index.docker.io/v1/`` and every
    Docker Hub alias mean docker.io."""
    text = key.strip().lower()
    if "://" in text:
        text = urlsplit(text).netloc
    text = text.split("/", 1)[0]
    return "docker.io" if text in DOCKER_HUB_ALIASES else text


def read_auth_file(path: str) -> dict[str, tuple[str, str]]:
    """REGISTRY_AUTH_FILE in the docker ``config.json`` / podman ``auth.json`` format:
    ``{"auths": {"ghcr.io": {"auth": "<base64 user:password>"}}}`` (or ``username`` and
    ``password``). Errors name the file and the entry, never a secret."""
    import base64
    import binascii
    import json

    try:
        with open(path, encoding="utf-8") as handle:
            document = json.load(handle)
    except OSError as exc:
        raise ConfigError(f"REGISTRY_AUTH_FILE {path!r} cannot be read: {exc.strerror}") from None
    except ValueError:
        raise ConfigError(f"REGISTRY_AUTH_FILE {path!r} is not JSON") from None
    auths = document.get("auths") if isinstance(document, dict) else None
    if not isinstance(auths, dict):
        raise ConfigError(f'REGISTRY_AUTH_FILE {path!r} has no "auths" object')
    found: dict[str, tuple[str, str]] = {}
    for key, entry in auths.items():
        host = auth_file_host(str(key))
        if not isinstance(entry, dict) or not _HOST_RE.match(host):
            raise ConfigError(f"REGISTRY_AUTH_FILE: the entry {str(key)[:80]!r} is malformed")
        username, password = entry.get("username"), entry.get("password")
        if isinstance(entry.get("auth"), str) and entry["auth"]:
            try:
                decoded = base64.b64decode(entry["auth"], validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                raise ConfigError(
                    f"REGISTRY_AUTH_FILE: the auth of {host!r} is not base64 of user:password"
                ) from None
            username, _, password = decoded.partition(":")
        if not isinstance(username, str) or not isinstance(password, str) or not username:
            raise ConfigError(f"REGISTRY_AUTH_FILE: the entry for {host!r} has no credentials")
        found[host] = (username, password)
    return found


#: One PEM certificate block; anything else in a CA file (comments, keys) is ignored.
_PEM_CERTIFICATE_RE = re.compile(
    r"-----BEGIN CERTIFICATE-----\r?\n[A-Za-z0-9+/=\r\n]+?-----END CERTIFICATE-----"
)


def read_ca_file(path: str, variable: str = "UPSTREAM_CA_FILE") -> str:
    """The PEM certificates of a CA file, one block a line apart, checked loadable by
    OpenSSL (what verification will use) so a bad file stops start-up, not every pull."""
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            # A CA file is a few KiB; a path to something huge is not read whole.
            text = handle.read(16 << 20)
    except OSError as exc:
        raise ConfigError(f"{variable} {path!r} cannot be read: {exc.strerror}") from None
    blocks = _PEM_CERTIFICATE_RE.findall(text)
    if not blocks:
        raise ConfigError(f"{variable} {path!r} holds no PEM certificate")
    pem = "\n".join(block.replace("\r\n", "\n") for block in blocks) + "\n"
    try:
        # A bare context: only these certificates are parsed, not the system's.
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=pem)
    except (ssl.SSLError, ValueError):
        raise ConfigError(f"{variable} {path!r} holds a malformed certificate") from None
    return pem


def read_environment(
    environ: Mapping[str, str] | None = None, env_file: str | None = None
) -> dict[str, str]:
    """The effective variables: a `.env` file (ENV_FILE, default ./.env) under the real
    environment, which wins."""
    real = dict(os.environ if environ is None else environ)
    path = env_file or real.get("ENV_FILE") or ".env"
    merged: dict[str, str] = {}
    if os.path.isfile(path):
        merged.update({k: v for k, v in dotenv_values(path).items() if v is not None})
    merged.update(real)
    return merged


def load_settings(
    environ: Mapping[str, str] | None = None, *, env_file: str | None = None
) -> Settings:
    """Build validated :class:`Settings` from the environment."""
    env = read_environment(environ, env_file)

    registry = normalize_registry(_optional(env, "REGISTRY_URL") or "docker.io")
    name = _optional(env, "REGISTRY_NAME")
    if name is not None:
        if not _HOST_RE.match(name):
            raise ConfigError("REGISTRY_NAME must be a host name such as registry.example.com:5000")
        registry = RegistryEndpoint(registry.url, name.lower())

    auth_url = _url(env, "REGISTRY_AUTH_URL")
    service = _optional(env, "REGISTRY_SERVICE")
    if registry.is_docker_hub:
        auth_url = auth_url or DOCKER_HUB_REALM
        service = service or DOCKER_HUB_SERVICE

    username = _optional(env, "REGISTRY_USERNAME")
    password = env.get("REGISTRY_PASSWORD") or None
    if bool(username) != bool(password):
        missing = "REGISTRY_PASSWORD" if username else "REGISTRY_USERNAME"
        raise ConfigError(f"{missing} must be set together with the other half of the credential")
    if username and ":" in username:
        raise ConfigError("REGISTRY_USERNAME must not contain ':'")

    bearer = _optional(env, "REGISTRY_BEARER_TOKEN") or _optional(env, "REGISTRY_TOKEN")

    client_auth = (_optional(env, "REGISTRY_CLIENT_AUTH") or "optional").lower()
    if client_auth not in CLIENT_AUTH_MODES:
        raise ConfigError(
            f"REGISTRY_CLIENT_AUTH must be one of {', '.join(CLIENT_AUTH_MODES)}, "
            f"got {client_auth!r}"
        )

    namespace = _optional(env, "REGISTRY_DEFAULT_NAMESPACE")
    if namespace is not None:
        namespace = namespace.strip("/")
        if not all(PATH_COMPONENT_RE.fullmatch(c) for c in namespace.split("/")):
            raise ConfigError(
                "REGISTRY_DEFAULT_NAMESPACE must be lowercase path components "
                "such as 'team' or 'org/team'"
            )

    log_level = (_optional(env, "LOG_LEVEL") or "INFO").upper()
    if log_level not in LOG_LEVELS:
        raise ConfigError(f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
    log_format = (_optional(env, "LOG_FORMAT") or "text").lower()
    if log_format not in LOG_FORMATS:
        raise ConfigError(f"LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")

    otlp_protocol = _optional(env, "OTEL_EXPORTER_OTLP_PROTOCOL")
    if otlp_protocol is not None and otlp_protocol.lower() not in OTLP_PROTOCOLS:
        raise ConfigError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL must be one of {', '.join(OTLP_PROTOCOLS)}, "
            f"got {otlp_protocol!r}"
        )

    temp_dir = _optional(env, "TEMP_DIR")
    if temp_dir is not None and not os.path.isdir(temp_dir):
        raise ConfigError(f"TEMP_DIR {temp_dir!r} is not a directory")

    cache_dir = _optional(env, "CACHE_DIR")
    if cache_dir is not None:
        try:
            os.makedirs(cache_dir, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"CACHE_DIR {cache_dir!r} cannot be created: {exc.strerror}"
            ) from None
        if not os.access(cache_dir, os.W_OK):
            raise ConfigError(f"CACHE_DIR {cache_dir!r} is not writable")

    store = (_optional(env, "STORE") or "filesystem").lower()
    if store not in STORES:
        raise ConfigError(f"STORE must be one of {', '.join(STORES)}, got {store!r}")
    s3_bucket = _optional(env, "S3_BUCKET")
    if store == "s3" and not s3_bucket:
        raise ConfigError("S3_BUCKET is required with STORE=s3")
    if s3_bucket is not None and not re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", s3_bucket):
        raise ConfigError(f"S3_BUCKET {s3_bucket!r} is not a valid bucket name")
    s3_prefix = _optional(env, "S3_PREFIX") or ""
    if s3_prefix.startswith("/") or ".." in s3_prefix.split("/"):
        raise ConfigError(f"S3_PREFIX {s3_prefix!r} must be a relative key prefix")
    if s3_prefix and not s3_prefix.endswith("/"):
        s3_prefix += "/"
    s3_endpoint = _optional(env, "S3_ENDPOINT_URL")
    if s3_endpoint is not None:
        parts = urlsplit(s3_endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"S3_ENDPOINT_URL must be http(s)://host[:port], got {s3_endpoint!r}")
        if parts.username or parts.password:
            raise ConfigError("S3_ENDPOINT_URL must not carry credentials; use AWS_ACCESS_KEY_ID")
        s3_endpoint = s3_endpoint.rstrip("/")
    redis_url = _optional(env, "REDIS_URL")
    if redis_url is not None:
        parts = urlsplit(redis_url)
        if parts.scheme not in ("redis", "rediss", "unix") or not (parts.hostname or parts.path):
            # The value may hold a password: never echo it.
            raise ConfigError("REDIS_URL must be redis://[:password@]host[:port][/db]")
    default_max = 0 if store == "s3" else 20 << 30
    # 0 turns the size limit off.
    unlimited = _optional(env, "CACHE_MAX_BYTES") == "0"
    cache_max_bytes = 0 if unlimited else _size(env, "CACHE_MAX_BYTES", default_max)

    upstreams = parse_upstreams(env.get("UPSTREAMS"))
    auth_file = _optional(env, "REGISTRY_AUTH_FILE")
    upstream_credentials = read_auth_file(auth_file) if auth_file else {}
    upstream_ca_file = _optional(env, "UPSTREAM_CA_FILE")
    if upstream_ca_file is not None:
        read_ca_file(upstream_ca_file)
    proxy_mode = (_optional(env, "PROXY_MODE") or "transparent").lower()
    if proxy_mode not in PROXY_MODES:
        raise ConfigError(f"PROXY_MODE must be one of {', '.join(PROXY_MODES)}, got {proxy_mode!r}")
    public_url = _url(env, "PUBLIC_URL")
    if public_url is not None:
        parts = urlsplit(public_url)
        if parts.query or parts.fragment or parts.username:
            raise ConfigError("PUBLIC_URL must be scheme://host[:port][/path], nothing more")
        public_url = public_url.rstrip("/")
    token_secret = env.get("TOKEN_SECRET") or None
    hosted = parse_hosted_patterns(env.get("HOSTED_REPOSITORIES"))
    htpasswd_file = _optional(env, "HTPASSWD_FILE")
    if htpasswd_file is not None and not os.path.isfile(htpasswd_file):
        raise ConfigError(f"HTPASSWD_FILE {htpasswd_file!r} is not a file")
    access_file = _optional(env, "ACCESS_FILE")
    if access_file is not None and not os.path.isfile(access_file):
        raise ConfigError(f"ACCESS_FILE {access_file!r} is not a file")
    if hosted and _integer(env, "S3_LIFECYCLE_DAYS", 0, minimum=0) > 0:
        raise ConfigError(
            "S3_LIFECYCLE_DAYS expires every object under the prefix, pushed images too: "
            "leave it off with HOSTED_REPOSITORIES (passthrough gc removes what no tag reaches)"
        )
    if hosted and htpasswd_file is None:
        raise ConfigError(
            "HOSTED_REPOSITORIES needs HTPASSWD_FILE: a push needs one of passthrough's users"
        )
    if proxy_mode == "authenticated" or htpasswd_file is not None:
        why = "PROXY_MODE=authenticated" if proxy_mode == "authenticated" else "HTPASSWD_FILE"
        if public_url is None:
            raise ConfigError(
                f"PUBLIC_URL is required with {why}: it is the token "
                "realm clients are sent to (never taken from the Host header)"
            )
        if token_secret is None:
            raise ConfigError(
                f"TOKEN_SECRET is required with {why}: every worker and "
                "replica signs tokens with it"
            )
    if token_secret is not None and len(token_secret) < 16:
        raise ConfigError("TOKEN_SECRET must be at least 16 characters")
    tls_cert = _optional(env, "TLS_CERT_FILE")
    tls_key = _optional(env, "TLS_KEY_FILE")
    if bool(tls_cert) != bool(tls_key):
        raise ConfigError("TLS_CERT_FILE and TLS_KEY_FILE must be set together")
    for variable, path in (("TLS_CERT_FILE", tls_cert), ("TLS_KEY_FILE", tls_key)):
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f"{variable} {path!r} is not a file")
    tls_self_signed = _boolean(env, "TLS_SELF_SIGNED", False)
    if tls_self_signed and tls_cert:
        raise ConfigError("TLS_SELF_SIGNED and TLS_CERT_FILE exclude each other")
    tls_names = tuple(
        n.strip().lower()
        for n in (env.get("TLS_NAMES") or "").replace(" ", ",").split(",")
        if n.strip()
    ) or ("localhost", "127.0.0.1")
    for tls_name in tls_names:
        if not re.fullmatch(r"[a-z0-9.*:-]+", tls_name):
            raise ConfigError(f"TLS_NAMES has an invalid name {tls_name!r}")

    return Settings(
        hosted_repositories=hosted,
        htpasswd_file=htpasswd_file,
        access_file=access_file,
        hosted_anonymous_pull=_boolean(env, "HOSTED_ANONYMOUS_PULL", False),
        hosted_manifest_max_bytes=_size(env, "HOSTED_MANIFEST_MAX_BYTES", 4 << 20),
        trusted_proxies=parse_networks(env.get("TRUSTED_PROXIES")),
        upstreams=upstreams,
        upstream_credentials=upstream_credentials,
        upstream_ca_file=upstream_ca_file,
        proxy_mode=proxy_mode,
        public_url=public_url,
        token_secret=token_secret,
        token_ttl=_integer(env, "TOKEN_TTL", 300, minimum=10),
        tag_ttl=_number(env, "TAG_TTL", 0.0, minimum=0),
        proxy_serve_stale=_boolean(env, "PROXY_SERVE_STALE", True),
        s3_redirect=_boolean(env, "S3_REDIRECT", False),
        tls_cert_file=tls_cert,
        tls_key_file=tls_key,
        tls_self_signed=tls_self_signed,
        tls_names=tls_names,
        tls_dir=_optional(env, "TLS_DIR"),
        registry=registry,
        registry_auth_url=auth_url,
        registry_service=service,
        username=username,
        password=password,
        bearer_token=bearer,
        client_auth=client_auth,
        default_namespace=namespace,
        log_level=log_level,
        log_format=log_format,
        connect_timeout=_number(env, "UPSTREAM_CONNECT_TIMEOUT", 10.0, minimum=0.1),
        read_timeout=_number(env, "UPSTREAM_READ_TIMEOUT", 60.0, minimum=0.1),
        layer_concurrency=_integer(env, "LAYER_CONCURRENCY", 3, minimum=1),
        temp_dir=temp_dir,
        store=store,
        cache_dir=cache_dir,
        cache_max_bytes=cache_max_bytes,
        s3_bucket=s3_bucket,
        s3_prefix=s3_prefix,
        s3_endpoint_url=s3_endpoint,
        s3_region=_optional(env, "AWS_REGION"),
        s3_lifecycle_days=_integer(env, "S3_LIFECYCLE_DAYS", 0, minimum=0),
        redis_url=redis_url,
        redis_lock_lease=_number(env, "REDIS_LOCK_LEASE", 60.0, minimum=1),
        serve_stale=_boolean(env, "SERVE_STALE", False),
        default_platform=_platform(env, "DEFAULT_PLATFORM"),
        upstream_retries=_integer(env, "UPSTREAM_RETRIES", 4, minimum=0),
        retry_after_max=_number(env, "UPSTREAM_RETRY_AFTER_MAX", 30.0, minimum=0),
        download_deadline=_number(env, "DOWNLOAD_DEADLINE", 3600.0, minimum=1),
        max_image_bytes=_size(env, "MAX_IMAGE_BYTES", 20 << 30),
        max_layers=_integer(env, "MAX_LAYERS", 500, minimum=1),
        max_concurrent_downloads=_integer(env, "MAX_CONCURRENT_DOWNLOADS", 0, minimum=0),
        client_idle_timeout=_number(env, "CLIENT_IDLE_TIMEOUT", 120.0, minimum=1),
        registry_allowlist=_allowlist(env, "REGISTRY_ALLOWLIST"),
        allow_link_local=_boolean(env, "REGISTRY_ALLOW_LINK_LOCAL", False),
    )
