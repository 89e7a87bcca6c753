"""The composition root: everything that lives for the whole process, made once from the
settings by :meth:`Services.create` (``create_app`` calls it and keeps the result in
``app.extensions["passthrough"]``).

Every blueprint and the tar export take what they need from here: the content store,
the upstream token cache and outbound policy, the gate (users, rules, the failed-login
limiter), the service's own token issuer, the pod's transfer slots, and the hosted area and
pull-through proxy built on the store. It sits below the wings that use it (web,
export) and above those it wires (registry, store, upstream, capacity), so no view has
to import the tar pipeline, or any wing another, just to reach a shared object.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flask import Flask

from passthrough.capacity import TransferSlots
from passthrough.config import Settings
from passthrough.config.table import DEFAULT_TRANSFERS
from passthrough.registry.access import Gate
from passthrough.registry.hosted import Hosted
from passthrough.registry.proxy import Proxy
from passthrough.registry.pulls import PullCounter
from passthrough.registry.tokens import TokenService
from passthrough.store import open_store
from passthrough.store.content import ContentStore
from passthrough.upstream.auth import TokenCache
from passthrough.upstream.netguard import HostPolicy, trusted_hosts
from passthrough.upstream.rate import UpstreamRates
from passthrough.upstream.trust import ca_bundle

__all__ = ["EXTENSION", "Services", "services_of"]

#: Where the app keeps its Services (``app.extensions``).
EXTENSION = "passthrough"


@dataclass
class Services:
    """What lives for the whole process: settings, the token cache, the content store."""

    settings: Settings
    tokens: TokenCache = field(default_factory=TokenCache)
    store: ContentStore | None = None
    policy: HostPolicy = field(default_factory=HostPolicy)
    #: The pod's transfer slots (MAX_TRANSFERS), shared by every worker of the master.
    slots: TransferSlots = field(default_factory=lambda: TransferSlots(DEFAULT_TRANSFERS))
    #: Who may do what (HTPASSWD_FILE, ACCESS_FILE, the failed-login limiter).
    gate: Gate | None = None
    #: The service's own Bearer tokens (TOKEN_SECRET; None without one): every worker
    #: derives the same key from the secret.
    token_service: TokenService | None = None
    #: The hosted area and the pull-through proxy, both on the content store (None
    #: without one: the /v2 API then answers 503).
    hosted: Hosted | None = None
    proxy: Proxy | None = None
    #: The inventory's pull counts, gathered and written now and then (None without a
    #: store).
    pulls: PullCounter | None = None

    def access(self) -> Gate:
        """The gate; made on first use for Services built without :meth:`create`."""
        if self.gate is None:
            self.gate = Gate.create(self.settings)
        return self.gate

    @classmethod
    def create(cls, settings: Settings) -> Services:
        """Open the store, read the users and rules (ConfigError), build the rest."""
        store = open_store(settings)
        slots = TransferSlots.for_pod(settings.max_transfers)
        policy = outbound_policy(settings, pod_file=slots.path)
        tokens = TokenCache()
        token_service = None
        if settings.token_secret is not None:
            token_service = TokenService(settings.token_secret, settings.token_ttl)
        return cls(
            settings,
            tokens=tokens,
            store=store,
            policy=policy,
            slots=slots,
            gate=Gate.create(settings),
            token_service=token_service,
            hosted=Hosted(settings, store) if store is not None else None,
            proxy=Proxy(settings, store, tokens, policy) if store is not None else None,
            pulls=(PullCounter(store, settings.pull_count_interval) if store is not None else None),
        )


def outbound_policy(settings: Settings, *, pod_file: str | None = None) -> HostPolicy:
    """Where the service may connect: REGISTRY_ALLOWLIST, link-local, the CA bundle;
    and how fast it may read (UPSTREAM_MAX_RATE, in the buckets of ``pod_file``, the
    pod's shared file)."""
    return HostPolicy(
        allowlist=settings.registry_allowlist,
        # The operator's own registries: REGISTRY_URL, its realm and UPSTREAMS.
        trusted=trusted_hosts(
            [settings.registry.url, settings.registry_auth_url]
            + [endpoint.url for _, endpoint in settings.upstreams]
        ),
        allow_link_local=settings.allow_link_local,
        # UPSTREAM_CA_FILE: the bundle is written once per process, here.
        ca_bundle=(
            str(ca_bundle(settings.upstream_ca_file)) if settings.upstream_ca_file else None
        ),
        rates=upstream_rates(settings, pod_file) if pod_file else None,
    )


def upstream_rates(settings: Settings, pod_file: str) -> UpstreamRates | None:
    """UPSTREAM_MAX_RATE's caps, each alias's by its registry URL (None: no cap)."""
    caps = settings.upstream_max_rate
    if not caps:
        return None
    urls = {"default": settings.registry.url}
    urls.update((alias, endpoint.url) for alias, endpoint in settings.upstreams)
    per_url = [(urls[alias], rate) for alias, rate in caps.per_alias if alias in urls]
    return UpstreamRates(pod_file, caps.pod, per_url)


def services_of(app: Flask) -> Services:
    """The app's Services (``create_app`` made them)."""
    found: Services = app.extensions[EXTENSION]
    return found
