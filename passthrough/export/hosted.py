"""The hosted area as the tar routes and describe see it: who may read a hosted image
(the same pull rules as /v2, with the client's HTTP Basic login) and which manifest a
tag or digest names, from the store alone. No upstream is ever asked for a hosted name.
"""

from __future__ import annotations

from passthrough.errors import ClientAuthRequired, PassthroughError, UpstreamUnavailable
from passthrough.export.request import DownloadRequest, Selection
from passthrough.registry.access import check_access
from passthrough.registry.hosted import Hosted
from passthrough.services import Services


def hosted_digest(services: Services, selection: Selection, request: DownloadRequest) -> str:
    """The digest of the manifest a hosted reference names, once the client is known to
    be allowed to pull it (401 with the Basic challenge without a login, 403 without the
    permission, 404 for a tag the repository lacks)."""
    if services.store is None:
        raise UpstreamUnavailable("the hosted area needs a content store (CACHE_DIR or STORE=s3)")
    repository = selection.reference.repository
    _check_pull(services, request, repository)
    reference = selection.reference
    found = Hosted(services.settings, services.store).manifest(
        repository, reference.digest or reference.tag or "latest"
    )
    return found.digest


def _check_pull(services: Services, request: DownloadRequest, repository: str) -> None:
    settings = services.settings
    if not settings.auth_enabled:
        return
    credentials = request.client_credentials
    authorization = credentials.basic_header() if credentials is not None else None
    try:
        check_access(
            settings,
            None,
            authorization,
            repository,
            "pull",
            gate=services.access(),
            client=request.client_address,
        )
    except PassthroughError as exc:
        if exc.status == 401:
            raise ClientAuthRequired(
                "this hosted repository needs a passthrough user (HTTP Basic)"
            ) from None
        raise
