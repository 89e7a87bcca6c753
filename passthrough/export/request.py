"""The request and its options, the download's first stages:

parse the file name or reference (:mod:`passthrough.oci.reference`) → choose the
registry and credentials (:mod:`passthrough.upstream.target`; the hosted area for the
names HOSTED_REPOSITORIES matches) → open a client for them.

A :class:`DownloadRequest` is what the client asked for, straight from the URL and
headers (``OutputOptions`` from the query); :func:`select` turns it into a
:class:`Selection` without any upstream call. Both the download
(:mod:`passthrough.export.download`) and describe (:mod:`passthrough.export.describe`)
start here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from passthrough.config import Settings
from passthrough.errors import BadRequest
from passthrough.export.archive import FORMATS
from passthrough.export.trace import annotate_credentials, annotate_reference
from passthrough.observe import telemetry
from passthrough.oci.endpoint import RegistryEndpoint
from passthrough.oci.platforms import DEFAULT_PLATFORM, Platform
from passthrough.oci.reference import (
    ImageReference,
    familiar_name,
    parse_filename,
    parse_reference_path,
    qualify,
    synthetic_tag,
)
from passthrough.registry.routing import is_hosted
from passthrough.registry.upstream_rules import upstream_allowed
from passthrough.services import Services
from passthrough.upstream.auth import Credentials
from passthrough.upstream.client import RegistryClient, RetryPolicy, Timeouts
from passthrough.upstream.offline import offline_reason
from passthrough.upstream.target import AuthKind, Route, Target, choose_target, registry_from_url

LAYER_MODES = ("tar", "gzip")


@dataclass(frozen=True)
class OutputOptions:
    """How the archive is packaged.

    - ``format=docker`` (default): the Docker 1.10–24 layout IOx documents;
      ``format=oci``: the Docker 25+ OCI layout.
    - ``layers=gzip`` keeps the registry's gzip blobs as the layer files (docker, podman
      and containerd load them; IOx is unknown); ``layers=tar`` (default) decompresses.
    """

    layers: str = "tar"
    format: str = "docker"

    @classmethod
    def from_query(
        cls, layers: str | None = None, output_format: str | None = None
    ) -> OutputOptions:
        mode = (layers or "tar").lower()
        if mode not in LAYER_MODES:
            raise BadRequest(f"layers must be one of {', '.join(LAYER_MODES)}")
        chosen = (output_format or "docker").lower()
        if chosen not in FORMATS:
            raise BadRequest(f"format must be one of {', '.join(FORMATS)}")
        return cls(layers=mode, format=chosen)

    @property
    def tag(self) -> str:
        return f"{self.format}-{self.layers}"


def parse_platform(text: str | None, default: str) -> Platform:
    try:
        return Platform.parse(text or default)
    except ValueError as exc:
        raise BadRequest(f"invalid platform: {exc}") from None


@dataclass(frozen=True)
class DownloadRequest:
    """What the client asked for, straight from the URL and headers."""

    route: Route
    #: ``nginx_latest.tar`` on the /docker/ routes; None on the /ref/ routes.
    filename: str | None
    scheme: str | None = None
    host: str | None = None
    client_credentials: Credentials | None = field(default=None, repr=False)
    client_address: str | None = None
    platform: Platform = DEFAULT_PLATFORM
    #: The client named the platform (?platform=): a single-platform image of another
    #: platform is then refused rather than delivered.
    platform_explicit: bool = False
    options: OutputOptions = field(default_factory=OutputOptions)
    #: ``team/api:v1_beta.tar`` or ``team/api@sha256:….tar`` on the /ref/ routes.
    reference_path: str | None = None


@dataclass(frozen=True)
class Selection:
    """Stages 1 and 2: the parsed reference and the chosen registry and credentials."""

    reference: ImageReference
    target: Target
    #: A repository of the hosted area (HOSTED_REPOSITORIES): read from the store only,
    #: never from any upstream.
    hosted: bool = False
    #: Why the registry is never contacted (offline mode), or None.
    offline: str | None = None

    @property
    def repo_tag(self) -> str:
        """RepoTags: familiar name and the tag (a synthetic one for a digest download)."""
        name = familiar_name(self.target.registry, self.reference.repository)
        return f"{name}:{synthetic_tag(self.reference)}"

    @property
    def full_name(self) -> str:
        """The fully qualified name containerd records (io.containerd.image.name)."""
        return f"{self.target.registry.name}/{self.reference.repository}:" + synthetic_tag(
            self.reference
        )

    @property
    def access_class(self) -> str:
        """Who is asking, coarsely, for serving from the store (:mod:`passthrough.export.stale`):
        only anonymous and the service's own identity may be served without asking the
        registry."""
        if self.target.credentials_source == "client":
            return "client"
        if self.target.auth is AuthKind.ANONYMOUS:
            return "anonymous"
        return "environment"


def select(services: Services, request: DownloadRequest) -> Selection:
    """Parse the filename and choose registry and credentials; no upstream call yet."""
    settings = services.settings
    with telemetry.span("parse_image_request"):
        if request.reference_path is not None:
            reference = parse_reference_path(request.reference_path)
        else:
            reference = parse_filename(request.filename or "")
    if request.route is Route.ENVIRONMENT and is_hosted(settings, reference.repository):
        # The hosted area answers for its names whatever REGISTRY_URL is: no upstream
        # is ever asked for them (nothing public can shadow a team's image).
        target = Target(hosted_endpoint(settings), "hosted", AuthKind.ANONYMOUS)
        annotate_reference(reference, target)
        return Selection(reference, target, hosted=True)
    with telemetry.span("extract_registry_client_credentials"):
        annotate_credentials(settings, request.client_credentials)
        registry: RegistryEndpoint | None = None
        if request.route is not Route.ENVIRONMENT:
            registry = registry_from_url(request.scheme or "", request.host or "")
        if registry is not None:
            # Before anything else: a client may not make us connect where policy forbids.
            services.policy.check_host(*_host_port(registry.url))
        target = choose_target(settings, request.route, request.client_credentials, registry)
        annotate_credentials(settings, request.client_credentials, target)
    annotate_credentials(settings, request.client_credentials, target)
    # REGISTRY_DEFAULT_NAMESPACE belongs to the environment's registry: another registry
    # named in the URL keeps its own defaults (library/ on Docker Hub).
    namespace = settings.default_namespace if target.source == "environment" else None
    reference = qualify(reference, target.registry, namespace)
    upstream_allowed(settings, target.registry, reference.repository)
    annotate_reference(reference, target)
    return Selection(reference, target, offline=offline_reason(settings, target.registry))


def hosted_endpoint(settings: Settings) -> RegistryEndpoint:
    """How archives name the hosted area's images: PUBLIC_URL's host (``localhost``
    without one), as ``docker pull`` from this service would."""
    if settings.public_url:
        parts = urlsplit(settings.public_url)
        return RegistryEndpoint(f"{parts.scheme}://{parts.netloc}", parts.netloc.lower())
    return RegistryEndpoint("http://localhost", "localhost")


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def open_client(services: Services, selection: Selection, *, pool_size: int) -> RegistryClient:
    """A client for this request's registry, repository and credentials, with the
    service's timeouts, retries, deadline and outbound policy."""
    settings = services.settings
    return RegistryClient(
        selection.target,
        selection.reference.repository,
        services.tokens,
        Timeouts(settings.connect_timeout, settings.read_timeout),
        pool_size=pool_size,
        policy=services.policy,
        retry=RetryPolicy(
            attempts=settings.upstream_retries,
            retry_after_max=settings.retry_after_max,
            deadline=time.monotonic() + settings.download_deadline,
        ),
    )
