"""Describe what a download URL would deliver, without downloading a layer.

``GET /describe`` + any download path (``/describe/docker/nginx_latest.tar``,
``/describe/registry/https/ghcr.io/ref/org/app:v1.tar?platform=linux/arm64``, …) runs the
download's first stages — parse, choose registry and credentials, resolve manifest and
config — and answers JSON::

    {
      "reference": "docker.io/library/nginx:latest",
      "registry": {"url": "https://registry-1.docker.io", "name": "docker.io"},
      "repository": "library/nginx",
      "tag": "latest",                 # null for a digest-only reference
      "digest": "sha256:…",            # what the tag points at (index or manifest)
      "mediaType": "application/vnd.oci.image.index.v1+json",
      "requestedPlatform": "linux/amd64",
      "platforms": [                   # attestation entries left out
        {"platform": "linux/arm64/v8", "digest": "sha256:…", "size": 1234}
      ],
      "selected": {
        "platform": "linux/amd64",
        "manifestDigest": "sha256:…", "manifestMediaType": "…",
        "configDigest": "sha256:…", "created": "2024-01-01T00:00:00Z",
        "layerCount": 7,
        "layers": [{"digest": "sha256:…", "size": 123, "mediaType": "…"}],
        "compressedSize": 12345,       # sum of the layer blobs, bytes
        "tarSize": 25600,              # the archive's size (passthrough.export.size)
        "tarSizeExact": true           # false: an estimate, layers not cached yet
      },
      "download": {
        "url": "/docker/nginx_latest.tar",    # the path described (query kept)
        "pinnedUrl": "/ref/library/nginx:latest@sha256:….tar",  # same image, pinned
        "repoTag": "nginx:latest",            # RepoTags in the archive
        "filename": "nginx_latest.tar"        # its Content-Disposition name
      }
    }

``platforms[].size`` is the size of that platform's manifest as the index lists it (the
image sizes would need one more request per platform); a single-platform image lists
its one platform, read from its config, with the manifest's own digest and size.

A platform the image lacks answers 404 with the same JSON less ``selected`` and with an
``"error"`` line naming the available platforms, so a client can offer them. Every other
failure goes through the central error mapping, as downloads do (one-line text).

A hosted image (HOSTED_REPOSITORIES) is described from the store alone, under the same
pull rules as its download (a passthrough user's HTTP Basic login). ``download.filename``
carries the platform when it is not the server's default (``nginx_latest_linux-arm64.tar``),
as the download's ``Content-Disposition`` does.

Describe always asks the registry (SERVE_STALE does not apply; in offline mode it answers
503) and does not check that layer blobs are readable, so a download may still fail
where describe succeeded.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote, urlencode

from passthrough.errors import (
    NotAcceptable,
    OfflineMode,
    PlatformNotFound,
    UnsupportedImage,
    UpstreamInvalid,
)
from passthrough.export.hosted import hosted_digest
from passthrough.export.request import DownloadRequest, Selection, open_client, select
from passthrough.export.resolve import Documents, resolve_image
from passthrough.export.size import archive_size
from passthrough.oci.manifest import INDEX_TYPES, ResolvedImage, choose_platform, index_platforms
from passthrough.oci.platforms import Platform
from passthrough.oci.reference import (
    DIGEST_RE,
    ImageReference,
    archive_filename,
    platform_filename,
)
from passthrough.services import Services
from passthrough.store.content import ContentStore
from passthrough.upstream.client import RegistryClient
from passthrough.upstream.target import Route

__all__ = ["PlatformNotFound", "describe", "download_path", "download_query"]

#: Query parameters that change what a download delivers, in the order they are written.
DOWNLOAD_QUERY = ("platform", "format", "layers")


def download_path(
    route: Route,
    *,
    filename: str | None = None,
    reference_path: str | None = None,
    scheme: str | None = None,
    host: str | None = None,
    query: Mapping[str, str] | None = None,
) -> str:
    """The download URL path for these route arguments (host ``:`` as ``%3A``), with the
    query parameters that matter to a download."""
    if route is Route.ENVIRONMENT:
        prefix = ""
    else:
        prefix = f"/{route.value}/{quote(scheme or '', safe='')}/{quote(host or '', safe='')}"
    if reference_path is not None:
        path = f"{prefix}/ref/{quote(reference_path, safe='/:@')}"
    else:
        path = f"{prefix}/docker/{quote(filename or '', safe='')}"
    wanted = [(k, query[k]) for k in DOWNLOAD_QUERY if query and query.get(k)]
    if wanted:
        path += "?" + urlencode(wanted, safe="/")
    return path


def describe(
    services: Services,
    request: DownloadRequest,
    *,
    url: str,
    query: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Describe what ``request`` would download; ``url`` is its download path. Raises
    :class:`PlatformNotFound` (with the partial description) or any
    :class:`~passthrough.errors.PassthroughError` a download would raise first."""
    selection = select(services, request)
    if selection.offline is not None:
        raise OfflineMode(
            f"offline mode ({selection.offline}): describe asks the registry, "
            "which is never contacted; the download routes serve what the store holds"
        )
    client = open_client(services, selection, pool_size=2)
    try:
        return _describe(services, selection, client, request, url, query or {})
    finally:
        client.close()


def _describe(
    services: Services,
    selection: Selection,
    client: RegistryClient,
    request: DownloadRequest,
    url: str,
    query: Mapping[str, str],
) -> dict[str, Any]:
    ref = selection.reference
    image = str(ref)
    # A hosted image comes from the store alone, once the client may pull it.
    hosted = hosted_digest(services, selection, request) if selection.hosted else None
    documents = Documents(client, services.store, offline_digest=hosted)
    body, media_type, digest, document = documents.top_manifest(
        ref.reference, f"manifest of {image}"
    )
    described = _heading(selection, request, media_type, digest)
    download = {
        "url": url,
        "pinnedUrl": _pinned_url(request, ref, digest, query),
        "repoTag": selection.repo_tag,
        "filename": platform_filename(
            request.filename or archive_filename(ref),
            request.platform,
            Platform.parse(services.settings.default_platform),
        ),
    }

    if media_type in INDEX_TYPES:
        described["platforms"] = [
            _platform_entry(str(p), entry.get("digest"), entry.get("size"))
            for p, entry in index_platforms(document)
        ]
        try:
            chosen, entry = choose_platform(document, request.platform, image)
        except NotAcceptable as exc:
            described["error"] = exc.message
            described["download"] = download
            raise PlatformNotFound(exc.message, described) from None
        resolved = _resolve_entry(client, ref, chosen, entry, services.store, hosted=bool(hosted))
        selected_platform = str(chosen)
    else:
        # Resolve by the digest just read, so the description is of one manifest even
        # if the tag moves meanwhile.
        resolved = resolve_image(
            client,
            ImageReference(ref.repository, tag=ref.tag, digest=digest),
            request.platform,
            services.store,
            offline_digest=digest if hosted else None,
        )
        selected_platform = str(config_platform(resolved))
        described["platforms"] = [_platform_entry(selected_platform, digest, len(body))]

    described["selected"] = _selected(resolved, selected_platform)
    described["selected"].update(archive_size(services, selection, request, resolved, client))
    described["download"] = download
    return described


def _heading(
    selection: Selection, request: DownloadRequest, media_type: str, digest: str
) -> dict[str, Any]:
    """The description's first keys, in the order the JSON shows them; ``platforms`` is
    filled in once the manifest was read as an index or an image."""
    ref = selection.reference
    registry = selection.target.registry
    return {
        "reference": f"{registry.name}/{ref}",
        "registry": {"url": registry.url, "name": registry.name},
        "repository": ref.repository,
        "tag": ref.tag,
        "digest": digest,
        "mediaType": media_type,
        "requestedPlatform": str(request.platform),
        "platforms": [],
    }


def _resolve_entry(
    client: RegistryClient,
    ref: ImageReference,
    chosen: Platform,
    entry: dict[str, Any],
    store: ContentStore | None,
    *,
    hosted: bool = False,
) -> ResolvedImage:
    """The image an index entry names, which must be an image manifest itself (a hosted
    one from the store alone)."""
    image = str(ref)
    entry_digest = entry.get("digest")
    if not isinstance(entry_digest, str) or not DIGEST_RE.fullmatch(entry_digest):
        raise UpstreamInvalid(f"the {chosen} entry of {image} has an invalid digest")
    resolved = resolve_image(
        client,
        ImageReference(ref.repository, tag=ref.tag, digest=entry_digest),
        chosen,
        store,
        offline_digest=entry_digest if hosted else None,
    )
    if resolved.index_digest is not None:  # an index inside the index
        raise UnsupportedImage(f"the {chosen} entry of {image} is not an image manifest")
    return resolved


def _platform_entry(platform: str, digest: Any, size: Any) -> dict[str, Any]:
    return {
        "platform": platform,
        "digest": digest if isinstance(digest, str) else None,
        "size": size if isinstance(size, int) and not isinstance(size, bool) else None,
    }


def download_query(request: DownloadRequest, given: Iterable[str]) -> dict[str, str]:
    """The download parameters among ``given`` (the query's keys), normalized."""
    values = {
        "platform": str(request.platform),
        "format": request.options.format,
        "layers": request.options.layers,
    }
    names = set(given)
    return {name: values[name] for name in DOWNLOAD_QUERY if name in names}


def config_platform(image: ResolvedImage) -> Platform:
    """The platform an image's config states (``unknown`` parts where it states none)."""
    config = image.config_document
    os_name, arch, variant = config.get("os"), config.get("architecture"), config.get("variant")
    return Platform(
        os_name if isinstance(os_name, str) and os_name else "unknown",
        arch if isinstance(arch, str) and arch else "unknown",
        variant if isinstance(variant, str) and variant else None,
    )


def _selected(image: ResolvedImage, platform: str) -> dict[str, Any]:
    created = image.config_document.get("created")
    return {
        "platform": platform,
        "manifestDigest": image.manifest_digest,
        "manifestMediaType": image.manifest_media_type,
        "configDigest": image.config_digest,
        "created": created if isinstance(created, str) else None,
        "layerCount": len(image.layers),
        "layers": [
            {"digest": layer.digest, "size": layer.size, "mediaType": layer.media_type}
            for layer in image.layers
        ],
        "compressedSize": image.total_compressed_size,
    }


def _pinned_url(
    request: DownloadRequest, ref: ImageReference, digest: str, query: Mapping[str, str]
) -> str:
    """The /ref/ URL of the same image pinned to ``digest``, keeping the tag for RepoTags."""
    name = f"{ref.repository}:{ref.tag}" if ref.tag else ref.repository
    return download_path(
        request.route,
        reference_path=f"{name}@{digest}.tar",
        scheme=request.scheme,
        host=request.host,
        query=query,
    )
