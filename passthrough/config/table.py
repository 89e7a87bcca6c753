"""The settings table: every environment variable passthrough reads, declared once.

Each field of :class:`Settings` (the service) and :class:`ServerSettings` (gunicorn.conf.py)
is one row: the variable, its parser (:mod:`passthrough.config.parse`), its default, one
line of documentation, whether it is a secret, and the group it is documented under.
:data:`EXTERNAL` declares the variables other code reads (boto3, prometheus-client) so
they are documented with the rest. The README's table is generated from these rows and
a test holds .env.example, the Helm chart and tests/deploy to them.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import Field, dataclass, field, fields, replace
from typing import Any

from passthrough.config import parse as p
from passthrough.config.upstream_rules import UpstreamRule, parse_upstream_rules
from passthrough.oci.endpoint import DOCKER_HUB_URL, RegistryEndpoint

# The groups of the documentation, in their order.
REGISTRY = "Upstream registry"
V2 = "The /v2 pull-through API"
HOSTED = "The hosted area"
TLS = "TLS"
LIMITS = "Limits and timeouts"
DISK = "Disk"
STORE = "Shared content store"
OBSERVE = "Logging and telemetry"
SERVER = "gunicorn"
GROUPS = (REGISTRY, V2, HOSTED, TLS, LIMITS, DISK, STORE, OBSERVE, SERVER)


#: MAX_TRANSFERS when unset (or 0, the old MAX_CONCURRENT_DOWNLOADS's "automatic").
DEFAULT_TRANSFERS = 512


def _transfers(name: str, raw: str) -> int:
    return int(p.integer(0)(name, raw)) or DEFAULT_TRANSFERS


@dataclass(frozen=True)
class Variable:
    """One environment variable: how it is read and how it is documented."""

    name: str
    parse: p.Parser
    default: Any
    doc: str
    group: str
    #: A credential: never in a repr, from a Secret in the chart, empty in .env.example.
    secret: bool = False
    #: The default as the README shows it, in Markdown (None: ``default`` as code).
    shown: str | None = None
    #: Leading and trailing blanks are part of the value (passwords, keys).
    keep_blanks: bool = False
    #: Older names read when this one is unset.
    aliases: tuple[str, ...] = ()
    #: Why the Helm chart does not set it (None: values.yaml and the ConfigMap do).
    not_in_chart: str | None = None
    #: One of the standard OpenTelemetry variables (the SDK reads them too).
    opentelemetry: bool = False
    #: The attribute it fills (set by :func:`variables_of`; None for EXTERNAL rows).
    field: str | None = None

    def raw(self, env: Mapping[str, str]) -> str | None:
        """The variable's text, or None when it (and every alias) is unset or empty."""
        for name in (self.name, *self.aliases):
            value = env.get(name)
            if value is not None and not self.keep_blanks:
                value = value.strip()
            if value:
                return value
        return None

    def read(self, env: Mapping[str, str]) -> Any:
        """The parsed value, or the default when the variable is unset."""
        raw = self.raw(env)
        return copy.copy(self.default) if raw is None else self.parse(self.name, raw)

    def default_text(self) -> str:
        """The default as a value of the variable would write it ("" for none)."""
        value = self.default
        if value is None:
            return ""
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, tuple):
            return ",".join(str(v) for v in value)
        if isinstance(value, float) and value.is_integer():
            return str(int(value))
        return str(value)


_VARIABLE = "passthrough.variable"


def setting(name: str, parse: p.Parser, default: Any, doc: str, group: str, **more: Any) -> Any:
    """A dataclass field declared by its variable (keywords: those of :class:`Variable`,
    and ``hidden`` for a value kept out of the repr that is no secret of its own)."""
    shown_in_repr = not more.pop("hidden", False) and not more.get("secret", False)
    metadata = {_VARIABLE: Variable(name, parse, default, doc, group, **more)}
    if isinstance(default, dict):
        return field(
            default_factory=lambda: copy.copy(default), repr=shown_in_repr, metadata=metadata
        )
    return field(default=default, repr=shown_in_repr, metadata=metadata)


def variables_of(cls: type) -> tuple[Variable, ...]:
    """The rows of a settings dataclass, each knowing its field."""
    found: list[Variable] = []
    for item in fields(cls):
        variable = item.metadata.get(_VARIABLE)
        if isinstance(variable, Variable):
            found.append(_with_field(variable, item))
    return tuple(found)


def _with_field(variable: Variable, item: Field[Any]) -> Variable:
    return replace(variable, field=item.name)


_HUB = RegistryEndpoint(DOCKER_HUB_URL, "docker.io")


@dataclass(frozen=True)
class Settings:
    """Validated settings of one running service: one field per variable."""

    # -- the upstream registry of the tar routes --------------------------------------------
    registry: RegistryEndpoint = setting(  # noqa: RUF009 - a dataclasses.field
        "REGISTRY_URL", p.registry, _HUB,
        "registry of `/docker/`; `docker.io`, `index.docker.io` and `registry-1.docker.io` "
        "all mean Docker Hub; `http://host:5000` for plain HTTP",
        REGISTRY, shown="`docker.io`",
    )  # fmt: skip
    registry_auth_url: str | None = setting(
        "REGISTRY_AUTH_URL", p.http_url, None,
        "token service (realm) of `REGISTRY_URL`, instead of the challenge's", REGISTRY,
        shown="the challenge's realm",
    )  # fmt: skip
    registry_service: str | None = setting(
        "REGISTRY_SERVICE", p.text, None, "`service` parameter sent to that token service",
        REGISTRY, shown="the challenge's service",
    )  # fmt: skip
    username: str | None = setting(
        "REGISTRY_USERNAME", p.credential_user, None,
        "user for `REGISTRY_URL` only (with `REGISTRY_PASSWORD`)", REGISTRY, secret=True,
    )  # fmt: skip
    password: str | None = setting(
        "REGISTRY_PASSWORD", p.text, None, "password or access token of `REGISTRY_USERNAME`",
        REGISTRY, secret=True, keep_blanks=True,
    )  # fmt: skip
    bearer_token: str | None = setting(
        "REGISTRY_BEARER_TOKEN", p.text, None,
        "a static bearer token for `REGISTRY_URL` (alias `REGISTRY_TOKEN`)", REGISTRY,
        secret=True, aliases=("REGISTRY_TOKEN",),
    )  # fmt: skip
    client_auth: str = setting(
        "REGISTRY_CLIENT_AUTH", p.choice(p.CLIENT_AUTH_MODES), "optional",
        "`optional`: client Basic credentials used when sent; `required`: every route "
        "needs them; `off`: never used",
        REGISTRY,
    )  # fmt: skip
    default_namespace: str | None = setting(
        "REGISTRY_DEFAULT_NAMESPACE", p.namespace, None,
        "prepended to one-component names (Docker Hub's is `library`)", REGISTRY,
    )  # fmt: skip
    registry_allowlist: tuple[str, ...] = setting(
        "REGISTRY_ALLOWLIST", p.allowlist, (),
        "host patterns the service may connect to (see Security); empty: no restriction",
        REGISTRY,
    )  # fmt: skip
    allow_link_local: bool = setting(
        "REGISTRY_ALLOW_LINK_LOCAL", p.boolean, False,
        "allow link-local and cloud metadata addresses", REGISTRY,
    )  # fmt: skip
    default_platform: str = setting(
        "DEFAULT_PLATFORM", p.platform, "linux/amd64",
        "platform picked from multi-platform images", REGISTRY,
    )  # fmt: skip
    serve_stale: bool = setting(
        "SERVE_STALE", p.boolean, True,
        "tar routes: serve what the store holds while the registry is unreachable, times "
        "out or answers 429/5xx, with a `Warning` (anonymous and environment identities "
        "only; see [When the upstream goes away](#when-the-upstream-goes-away))",
        REGISTRY,
    )  # fmt: skip
    serve_stale_timeout: float = setting(
        "SERVE_STALE_TIMEOUT", p.number(0.1), 0.5,
        "seconds: connect and read timeout of the one try upstream (no retries) when the "
        "store holds a copy that may be served instead",
        REGISTRY,
    )  # fmt: skip
    offline: bool = setting(
        "OFFLINE", p.boolean, False,
        "never contact any upstream: serve what the store holds, answer the rest "
        "`404`/`503` naming offline mode",
        REGISTRY,
    )  # fmt: skip
    offline_upstreams: tuple[str, ...] = setting(
        "OFFLINE_UPSTREAMS", p.offline_upstreams, (),
        "offline mode for some upstreams only: `UPSTREAMS` aliases, `default` "
        "(`REGISTRY_URL`) or registry hosts, comma-separated (`lab,docker.io`)",
        REGISTRY,
    )  # fmt: skip
    #: Which upstream repositories may be pulled at all, per upstream (tar routes, /v2, sync).
    upstream_rules: tuple[UpstreamRule, ...] = setting(
        "UPSTREAM_RULES", parse_upstream_rules, (),
        "YAML: allow/deny globs of upstream repositories per upstream host or alias, e.g. "
        "`{docker.io: {allow: [library/*, our-org/*]}}`; see "
        "[Rules for proxied names](#rules-for-proxied-names)",
        REGISTRY,
    )  # fmt: skip

    # -- the /v2 API -------------------------------------------------------------------------
    #: (alias, endpoint) pairs; ``/v2/<alias>/<repository>/…`` is proxied there.
    upstreams: tuple[tuple[str, RegistryEndpoint], ...] = setting(
        "UPSTREAMS", p.upstreams, (), "`/v2` aliases: `alias=url` pairs, comma-separated", V2,
    )  # fmt: skip
    #: The service's identity per upstream host, from REGISTRY_AUTH_FILE.
    upstream_credentials: dict[str, tuple[str, str]] = setting(  # noqa: RUF009 - a field
        "REGISTRY_AUTH_FILE", p.auth_file, {},
        "`/v2`: the service's identity per upstream host (docker `config.json` format)", V2,
        hidden=True, shown="",
    )  # fmt: skip
    upstream_ca_file: str | None = setting(
        "UPSTREAM_CA_FILE", p.ca_file, None,
        "a PEM file of CA certificates trusted for every upstream connection (registries, "
        "token services, blob redirects, `/ready`) besides the public CAs; see "
        "[Registries behind a private CA](#registries-behind-a-private-ca)",
        V2,
    )  # fmt: skip
    proxy_mode: str = setting(
        "PROXY_MODE", p.choice(p.PROXY_MODES), "transparent",
        "`/v2`: `transparent` (the service's identity; the cache is served to anyone) or "
        "`authenticated` (each client's own, through the token service)",
        V2,
    )  # fmt: skip
    #: How clients reach this service (the token realm); never the Host header.
    public_url: str | None = setting(
        "PUBLIC_URL", p.public_url, None,
        "the token realm's base URL; required with `PROXY_MODE=authenticated` and "
        "`HTPASSWD_FILE`",
        V2,
    )  # fmt: skip
    #: The key every worker and replica signs and encrypts tokens with.
    token_secret: str | None = setting(
        "TOKEN_SECRET", p.secret_key, None,
        "the key every replica signs and encrypts tokens with (16+ characters); required "
        "with `PROXY_MODE=authenticated` and `HTPASSWD_FILE`",
        V2, secret=True, keep_blanks=True,
    )  # fmt: skip
    token_ttl: int = setting(
        "TOKEN_TTL", p.integer(10), 300, "seconds a token the service issues stays valid", V2,
    )  # fmt: skip
    tag_ttl: float = setting(
        "TAG_TTL", p.number(0), 0.0,
        "`/v2`: seconds a tag is trusted without asking upstream (`0`: a `HEAD` every time)",
        V2,
    )  # fmt: skip
    proxy_serve_stale: bool = setting(
        "PROXY_SERVE_STALE", p.boolean, True,
        "`/v2`: serve a tag seen before while upstream is down, with a `Warning`", V2,
    )  # fmt: skip
    sync_file: str | None = setting(
        "SYNC_FILE", p.existing_file, None,
        "YAML: the images `passthrough sync` and `POST /api/v1/sync` keep in the store; see "
        "[Pre-stage images: sync](#pre-stage-images-sync)",
        V2,
    )  # fmt: skip
    s3_redirect: bool = setting(
        "S3_REDIRECT", p.boolean, False,
        "`/v2`: a blob hit on S3 is a `307` to a presigned URL (`STORE=s3` only)", V2,
    )  # fmt: skip

    # -- the hosted area ---------------------------------------------------------------------
    #: Glob patterns (``*`` one component, ``**`` any depth) of the pushed repositories.
    hosted_repositories: tuple[str, ...] = setting(
        "HOSTED_REPOSITORIES", p.hosted_patterns, (),
        "globs of the hosted repositories (`team/*,apps/**`); needs `HTPASSWD_FILE`", HOSTED,
    )  # fmt: skip
    htpasswd_file: str | None = setting(
        "HTPASSWD_FILE", p.existing_file, None,
        "passthrough's users (`htpasswd -B`); users need `PUBLIC_URL` and `TOKEN_SECRET`",
        HOSTED,
    )  # fmt: skip
    access_file: str | None = setting(
        "ACCESS_FILE", p.existing_file, None,
        "YAML: who may pull, push and delete which hosted repositories", HOSTED,
    )  # fmt: skip
    hosted_anonymous_pull: bool = setting(
        "HOSTED_ANONYMOUS_PULL", p.boolean, False,
        "clients without a login may pull hosted repositories", HOSTED,
    )  # fmt: skip
    hosted_manifest_max_bytes: int = setting(
        "HOSTED_MANIFEST_MAX_BYTES", p.size, 4 << 20, "the largest manifest a push may `PUT`",
        HOSTED, shown="`4M`",
    )  # fmt: skip
    #: Addresses and networks (an ingress) whose X-Forwarded-For names the client.
    trusted_proxies: tuple[str, ...] = setting(
        "TRUSTED_PROXIES", p.networks, (),
        "addresses and CIDR networks of reverse proxies whose `X-Forwarded-For` names the "
        "client (the failed-login limit, the access log, spans)",
        HOSTED,
    )  # fmt: skip

    # -- TLS (gunicorn's certfile/keyfile, or a certificate made at start-up) ----------------
    tls_cert_file: str | None = setting(
        "TLS_CERT_FILE", p.existing_file, None,
        "HTTPS with this certificate (PEM, chain after it); with `TLS_KEY_FILE`", TLS,
    )  # fmt: skip
    tls_key_file: str | None = setting(
        "TLS_KEY_FILE", p.existing_file, None, "the private key of `TLS_CERT_FILE` (PEM)", TLS,
    )  # fmt: skip
    tls_self_signed: bool = setting(
        "TLS_SELF_SIGNED", p.boolean, False,
        "HTTPS with a CA and certificate made at start-up (its CA at `/ca.crt`)", TLS,
    )  # fmt: skip
    tls_names: tuple[str, ...] = setting(
        "TLS_NAMES", p.tls_names, ("localhost", "127.0.0.1"),
        "names and addresses the self-signed certificate is valid for", TLS,
    )  # fmt: skip
    #: Where TLS_SELF_SIGNED keeps its CA (None: a private directory under TMPDIR).
    tls_dir: str | None = setting(
        "TLS_DIR", p.text, None,
        "where `TLS_SELF_SIGNED` keeps its CA (reused while valid) and certificate; 0700",
        TLS, shown="`$TMPDIR/passthrough-tls-<uid>`",
        not_in_chart="each pod makes its own CA under TMPDIR",
    )  # fmt: skip

    # -- limits and timeouts -----------------------------------------------------------------
    connect_timeout: float = setting(
        "UPSTREAM_CONNECT_TIMEOUT", p.number(0.1), 10.0,
        "seconds to wait for a connection to a registry", LIMITS,
    )  # fmt: skip
    read_timeout: float = setting(
        "UPSTREAM_READ_TIMEOUT", p.number(0.1), 60.0,
        "seconds without a byte from a registry before a request is abandoned", LIMITS,
    )  # fmt: skip
    layer_concurrency: int = setting(
        "LAYER_CONCURRENCY", p.integer(1), 3, "layers of one download fetched in parallel",
        LIMITS,
    )  # fmt: skip
    upstream_retries: int = setting(
        "UPSTREAM_RETRIES", p.integer(0), 4,
        "retries on connection errors, 5xx and 429 (backoff and jitter)", LIMITS,
    )  # fmt: skip
    retry_after_max: float = setting(
        "UPSTREAM_RETRY_AFTER_MAX", p.number(0), 30.0,
        "seconds: the longest `Retry-After` honoured", LIMITS,
    )  # fmt: skip
    download_deadline: float = setting(
        "DOWNLOAD_DEADLINE", p.number(1), 3600.0,
        "seconds: bound on one download's upstream work", LIMITS,
    )  # fmt: skip
    max_image_bytes: int = setting(
        "MAX_IMAGE_BYTES", p.size, 20 << 30,
        "the largest image (sum of its layers), answered with `413`", LIMITS, shown="`20G`",
    )  # fmt: skip
    max_layers: int = setting(
        "MAX_LAYERS", p.integer(1), 500, "the most layers an image may have (`413`)", LIMITS,
    )  # fmt: skip
    #: Concurrent transfers (tar downloads, /v2 blob bodies) of the whole pod.
    max_transfers: int = setting(
        "MAX_TRANSFERS", _transfers, DEFAULT_TRANSFERS,
        "transfers (tar downloads and `/v2` blob bodies) the pod sends at once, shared by "
        "its workers; beyond it `503` with `Retry-After` at once (the old per-worker "
        "`MAX_CONCURRENT_DOWNLOADS` is read as this; `0`: the default)",
        LIMITS, aliases=("MAX_CONCURRENT_DOWNLOADS",),
    )  # fmt: skip
    #: UPSTREAM_MAX_RATE: what reading from upstreams may cost the link, per second.
    upstream_max_rate: p.RateCaps = setting(  # noqa: RUF009 - a field
        "UPSTREAM_MAX_RATE", p.rate_caps, p.RateCaps(),
        "bytes/s every upstream read of the pod shares (all workers; cache hits are never "
        "slowed): `10M`, or `10M,lab=2M` to cap an `UPSTREAMS` alias (`default`: "
        "`REGISTRY_URL`) on its own as well",
        LIMITS, shown="off",
    )  # fmt: skip
    client_idle_timeout: float = setting(
        "CLIENT_IDLE_TIMEOUT", p.number(1), 120.0,
        "seconds a client may leave sent data unacknowledged before it is dropped "
        "(`TCP_USER_TIMEOUT`)",
        LIMITS,
    )  # fmt: skip

    # -- disk --------------------------------------------------------------------------------
    temp_dir: str | None = setting(
        "TEMP_DIR", p.directory, None,
        "where uncached layers are spooled (anonymous temp files); must exist", DISK,
        shown="system temp",
    )  # fmt: skip
    #: None here; load_settings fills in DEFAULT_CACHE_DIR for the filesystem store.
    cache_dir: str | None = setting(
        "CACHE_DIR", p.writable_directory, None,
        "the filesystem store (created if missing); `STORE=off` for none", DISK,
        shown="`./passthrough-store` (under the working directory)",
    )  # fmt: skip
    #: The store's size limit (least recently used evicted); 0: no limit (S3's default).
    cache_max_bytes: int = setting(
        "CACHE_MAX_BYTES", p.size_or_off, 20 << 30,
        "the store's size (least recently used evicted, never a pinned entry); `0`: no "
        "limit, the default with `STORE=s3`",
        DISK, shown="`20G`",
    )  # fmt: skip
    #: How often one process writes a tag's pull count to the store (the inventory).
    pull_count_interval: float = setting(
        "PULL_COUNT_INTERVAL", p.number(0), 30.0,
        "seconds one process gathers a tag's pulls before it writes them to the store "
        "(the inventory's pull counts and last pulled time); `0`: a write per pull",
        DISK,
    )  # fmt: skip

    # -- the shared content store ------------------------------------------------------------
    store: str = setting(
        "STORE", p.choice(p.STORES), "filesystem",
        "the content store's backend: `filesystem` (`CACHE_DIR`), `s3` (a bucket shared "
        "by every replica; see [The content store](#the-content-store)) or `off` (none: "
        "the tar routes only, every download from upstream)",
        STORE,
    )  # fmt: skip
    s3_bucket: str | None = setting(
        "S3_BUCKET", p.s3_bucket, None, "`STORE=s3`: the bucket (required)", STORE,
    )  # fmt: skip
    s3_prefix: str = setting(
        "S3_PREFIX", p.s3_prefix, "", "`STORE=s3`: a key prefix (installations share a bucket)",
        STORE,
    )  # fmt: skip
    s3_endpoint_url: str | None = setting(
        "S3_ENDPOINT_URL", p.endpoint_url, None,
        "`STORE=s3`: an S3-compatible endpoint (MinIO, SeaweedFS, Ceph RGW)", STORE,
        shown="AWS",
    )  # fmt: skip
    s3_region: str | None = setting(
        "AWS_REGION", p.text, None, "`STORE=s3`: the bucket's region", STORE,
        shown="the AWS chain's",
    )  # fmt: skip
    s3_lifecycle_days: int = setting(
        "S3_LIFECYCLE_DAYS", p.integer(0), 0,
        "`STORE=s3`: a lifecycle rule's expiry in days (`0`: none); not with "
        "`HOSTED_REPOSITORIES`",
        STORE,
    )  # fmt: skip
    #: Redis for the cross-replica locks; None: one fetch per replica.
    redis_url: str | None = setting(
        "REDIS_URL", p.redis_url, None,
        "the cross-replica locks (single-flight, gc's push lock); a password makes it a "
        "credential",
        STORE, hidden=True, shown="off",
    )  # fmt: skip
    redis_lock_lease: float = setting(
        "REDIS_LOCK_LEASE", p.number(1), 60.0,
        "seconds a lock outlives a replica killed while holding it", STORE,
    )  # fmt: skip

    # -- logging and telemetry ---------------------------------------------------------------
    log_level: str = setting(
        "LOG_LEVEL", p.choice(p.LOG_LEVELS, upper=True), "INFO",
        "`DEBUG`, `INFO`, `WARNING`, `ERROR` or `CRITICAL` (gunicorn's too)", OBSERVE,
    )  # fmt: skip
    #: text, or json (one object per line).
    log_format: str = setting(
        "LOG_FORMAT", p.choice(p.LOG_FORMATS), "text",
        "`text`, or `json` for one JSON object per line", OBSERVE,
    )  # fmt: skip
    otel_endpoint: str | None = setting(
        "OTEL_EXPORTER_OTLP_ENDPOINT", p.text, None,
        "OpenTelemetry traces go to this OTLP collector (unset: no tracing at all)", OBSERVE,
        shown="off", opentelemetry=True,
    )  # fmt: skip
    otel_protocol: str = setting(
        "OTEL_EXPORTER_OTLP_PROTOCOL", p.choice(p.OTLP_PROTOCOLS, echo_raw=True), "grpc",
        "the OTLP transport: `grpc` or `http/protobuf`", OBSERVE, opentelemetry=True,
    )  # fmt: skip
    otel_service_name: str | None = setting(
        "OTEL_SERVICE_NAME", p.text, None,
        "`service.name` of the traces (other standard `OTEL_*` variables apply too)", OBSERVE,
        shown="`passthrough`", opentelemetry=True,
    )  # fmt: skip

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


@dataclass(frozen=True)
class ServerSettings:
    """What gunicorn.conf.py reads when gunicorn loads it (before the app's settings)."""

    bind: str = setting(
        "BIND", p.text, "0.0.0.0:8080",
        "the address gunicorn listens on (command-line flags such as `--bind` win)", SERVER,
    )  # fmt: skip
    port: int = setting(
        "PORT", p.integer(1, 65535), 8080,
        "BIND's port: `passthrough healthcheck` probes it on 127.0.0.1 when `HEALTH_BIND` is "
        "`off`", SERVER,
    )  # fmt: skip
    workers: int = setting(
        "WEB_CONCURRENCY", p.integer(1), 2,
        "worker processes (each download holds one thread for its whole life)", SERVER,
    )  # fmt: skip
    #: 0: MAX_TRANSFERS + 32, so any one worker can hold every slot of the pod.
    threads: int = setting(
        "GUNICORN_THREADS", p.integer(0), 0,
        "threads per worker (started as needed); `0`: `MAX_TRANSFERS` + 32, so one worker "
        "can hold every transfer of the pod however the kernel spreads connections",
        SERVER, shown="`0`",
    )  # fmt: skip
    health_bind: str = setting(
        "HEALTH_BIND", p.text, "0.0.0.0:8081",
        "the probe port: only `/health`, `/ready` and `/metrics`, served by a process of its "
        "own (started by gunicorn's master), so probes answer however busy the workers "
        "are; `off`: none",
        SERVER,
    )  # fmt: skip
    header_timeout: float = setting(
        "HEADER_TIMEOUT", p.number(0.5), 10.0,
        "seconds from a connection (or the previous response) to its request's last header "
        "line; a connection slower than that is dropped",
        SERVER,
    )  # fmt: skip
    body_timeout: float = setting(
        "BODY_TIMEOUT", p.number(0.5), 30.0,
        "seconds a request body (an upload) may go without a byte before it is dropped",
        SERVER,
    )  # fmt: skip
    body_min_rate: int = setting(
        "BODY_MIN_RATE", p.size_or_off, 16 << 10,
        "bytes per second a request body must average after its first 10 s (`0`: no "
        "minimum)",
        SERVER, shown="`16K`",
    )  # fmt: skip
    send_timeout: float = setting(
        "SEND_TIMEOUT", p.number(1), 60.0,
        "seconds a response may go without the client taking a byte before the connection "
        "is dropped",
        SERVER,
    )  # fmt: skip
    graceful_timeout: int = setting(
        "GRACEFUL_TIMEOUT", p.integer(0), 120,
        "seconds in-flight downloads get to finish after SIGTERM (keep the orchestrator's "
        "grace above it)",
        SERVER,
    )  # fmt: skip

    @property
    def health_address(self) -> tuple[str, int] | None:
        """HEALTH_BIND as (host, port), brackets off an IPv6 host; None when it is
        ``off`` (or not ``host:port``)."""
        host, _, port = self.health_bind.rpartition(":")
        if self.health_bind.strip().lower() == "off" or not host or not port.isdigit():
            return None
        return host.strip("[]"), int(port)

    @property
    def health_port(self) -> int | None:
        """HEALTH_BIND's TCP port; None when it is ``off`` (or not ``host:port``)."""
        address = self.health_address
        return None if address is None else address[1]


#: Variables without a field: REGISTRY_NAME folds into ``Settings.registry``; boto3 and
#: prometheus-client read the others from the process environment.
EXTERNAL: tuple[Variable, ...] = (
    Variable(
        "REGISTRY_NAME", p.registry_name, None,
        "the name used in `RepoTags` (folded into `REGISTRY_URL`'s endpoint)", REGISTRY,
        shown="host of the URL",
    ),
    Variable(
        "AWS_ACCESS_KEY_ID", p.text, None,
        "`STORE=s3`: access key (boto3's chain; unset: an instance role, IRSA)", STORE,
        secret=True,
    ),
    Variable(
        "AWS_SECRET_ACCESS_KEY", p.text, None, "`STORE=s3`: the secret of `AWS_ACCESS_KEY_ID`",
        STORE, secret=True,
    ),
    Variable(
        "PROMETHEUS_MULTIPROC_DIR", p.text, None,
        "where the workers keep their metric samples; wiped at start (unset: a fresh "
        "directory, removed at exit)",
        OBSERVE, shown="a fresh directory", not_in_chart="the master makes a fresh one",
    ),
)  # fmt: skip

SETTINGS_VARIABLES = variables_of(Settings)
SERVER_VARIABLES = variables_of(ServerSettings)


def _in_group_order(variables: tuple[Variable, ...]) -> tuple[Variable, ...]:
    return tuple(sorted(variables, key=lambda v: GROUPS.index(v.group)))


#: Every declared variable, in the documentation's order (by group, then as declared).
VARIABLES: tuple[Variable, ...] = _in_group_order(
    (*SETTINGS_VARIABLES, *EXTERNAL, *SERVER_VARIABLES)
)
BY_NAME: dict[str, Variable] = {v.name: v for v in VARIABLES}
