"""One /v2 repository, whoever holds it: the interface every /v2 view works with.

As in distribution, where a pull-through cache is just another repository, the views
never ask "proxy or hosted?": the dispatcher (:mod:`passthrough.web.v2`) checks the
name, routes it, authorizes the action and hands the view a :class:`Repository`:

- :class:`HostedRepository`, over :class:`~passthrough.registry.hosted.Hosted`, for
  names HOSTED_REPOSITORIES matches: reads, pushes, deletes and upload sessions;
- :class:`ProxiedRepository`, over :class:`~passthrough.registry.proxy.Proxy`, the
  name's route and the client's upstream credentials: reads only. A write raises the
  one refusal, :func:`~passthrough.registry.access.not_hosted` (403 DENIED).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator

from passthrough.config import Settings
from passthrough.errors import BadRequest
from passthrough.oci.manifest import OCI_INDEX
from passthrough.registry.access import not_hosted
from passthrough.registry.hosted import Hosted, Pushed, check_digest
from passthrough.registry.pages import paged
from passthrough.registry.proxy import BlobAnswer, Listing, Manifest, Proxy
from passthrough.registry.pulls import CACHED, HOSTED, Served
from passthrough.registry.routing import ProxyRoute
from passthrough.store.readthrough import BlobStream
from passthrough.store.uploads import UploadState
from passthrough.upstream.auth import Credentials


class BlobUploads:
    """The blob upload sessions of one hosted repository (``/blobs/uploads/``)."""

    def __init__(self, hosted: Hosted, name: str, may_read: Callable[[str], bool]) -> None:
        self._hosted = hosted
        self._name = name
        self._may_read = may_read

    @property
    def min_chunk(self) -> int:
        """The smallest chunk the store takes (OCI-Chunk-Min-Length), 0 for any."""
        return self._hosted.store.uploads.min_chunk

    def start(self) -> UploadState:
        return self._hosted.start_upload(self._name)

    def status(self, upload_id: str) -> UploadState:
        return self._hosted.upload(self._name, upload_id)

    def append(
        self, upload_id: str, chunks: Iterator[bytes], *, start: int | None, length: int | None
    ) -> UploadState:
        return self._hosted.append(self._name, upload_id, chunks, start=start, length=length)

    def finish(
        self,
        upload_id: str,
        digest: str,
        chunks: Iterator[bytes],
        *,
        start: int | None,
        length: int | None,
    ) -> int:
        return self._hosted.finish(
            self._name, upload_id, digest, chunks, start=start, length=length
        )

    def monolithic(self, digest: str, chunks: Iterator[bytes], length: int | None) -> int:
        return self._hosted.monolithic(self._name, digest, chunks, length)

    def cancel(self, upload_id: str) -> None:
        self._hosted.cancel(self._name, upload_id)

    def mount(self, source: str, digest: str) -> bool:
        """Link ``digest`` from ``source``: False (the spec's answer is then a new
        session) when the client may not read ``source`` or it lacks the blob."""
        check_digest(digest)
        if not self._may_read(source):
            return False
        return self._hosted.mount(self._name, source, digest) is not None


class Repository(ABC):
    """A repository as the /v2 views see it (distribution's ``Repository``): manifests,
    blobs, tags and referrers; pushes, deletes and uploads where it is writable."""

    #: What answered, for the metrics, where the answer does not say more precisely.
    source: str

    def __init__(self, settings: Settings, name: str) -> None:
        self.settings = settings
        #: The name as the client wrote it.
        self.name = name

    @property
    @abstractmethod
    def private(self) -> bool:
        """Whether only some clients may read it, so shared caches must not keep what
        it serves (``Cache-Control: private``)."""

    @abstractmethod
    def manifest(self, reference: str, *, want_body: bool) -> Manifest: ...

    @abstractmethod
    def blob(self, digest: str, *, want_body: bool) -> BlobAnswer:
        """The blob to send: a stream (None for a HEAD), or a redirect."""

    @abstractmethod
    def tags(self, n: str | None, last: str | None) -> Listing:
        """The tag list's page (the spec's n and last) with its Link header."""

    @abstractmethod
    def referrers(self, digest: str, artifact_type: str | None) -> Listing:
        """The referrers index of ``digest``, filtered by ``artifact_type``."""

    @abstractmethod
    def served(self, tag: str, digest: str) -> Served:
        """What the inventory counts a pull of ``tag`` (answered as ``digest``) as."""

    # -- writes: a hosted repository's; anywhere else the one refusal --------------------

    def put_manifest(self, reference: str, body: bytes, content_type: str) -> Pushed:
        raise not_hosted(self.settings, self.name)

    def delete_manifest(self, reference: str) -> None:
        raise not_hosted(self.settings, self.name)

    def delete_blob(self, digest: str) -> None:
        raise not_hosted(self.settings, self.name)

    def uploads(self) -> BlobUploads:
        raise not_hosted(self.settings, self.name)


class HostedRepository(Repository):
    """A repository of the hosted area; ``may_read`` says whether the client may read
    another hosted repository (a mount's source)."""

    source = "hosted"

    def __init__(self, hosted: Hosted, name: str, may_read: Callable[[str], bool]) -> None:
        super().__init__(hosted.settings, name)
        self._hosted = hosted
        self._may_read = may_read

    @property
    def private(self) -> bool:
        # Behind users, each client reads only what ACCESS_FILE grants it.
        return self.settings.auth_enabled

    def manifest(self, reference: str, *, want_body: bool) -> Manifest:
        return self._hosted.manifest(self.name, reference)

    def blob(self, digest: str, *, want_body: bool) -> BlobAnswer:
        opened = self._hosted.open_blob(self.name, digest)
        if not want_body:
            opened.close()
            return BlobAnswer(opened.size, self.source)
        return BlobAnswer(opened.size, self.source, stream=BlobStream(opened.size, stored=opened))

    def tags(self, n: str | None, last: str | None) -> Listing:
        path = f"/v2/{self.name}/tags/list"
        chosen, headers = paged(self._hosted.tags(self.name), n, last, path)
        body = json.dumps({"name": self.name, "tags": chosen}).encode()
        return Listing(body, "application/json", headers)

    def referrers(self, digest: str, artifact_type: str | None) -> Listing:
        found = self._hosted.referrers(self.name, digest, artifact_type)
        headers = {"OCI-Filters-Applied": "artifactType"} if artifact_type else {}
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": found}
        return Listing(json.dumps(index).encode(), OCI_INDEX, headers)

    def served(self, tag: str, digest: str) -> Served:
        return Served(HOSTED, None, None, self.name, tag, digest)

    def put_manifest(self, reference: str, body: bytes, content_type: str) -> Pushed:
        return self._hosted.put_manifest(self.name, reference, body, content_type)

    def delete_manifest(self, reference: str) -> None:
        self._hosted.delete_manifest(self.name, reference)

    def delete_blob(self, digest: str) -> None:
        self._hosted.delete_blob(self.name, digest)

    def uploads(self) -> BlobUploads:
        return BlobUploads(self._hosted, self.name, self._may_read)


class ProxiedRepository(Repository):
    """A name read through from the upstream its route names, as the client
    (``credentials``: its upstream login in PROXY_MODE=authenticated, else None)."""

    source = "upstream"

    def __init__(self, proxy: Proxy, route: ProxyRoute, credentials: Credentials | None) -> None:
        super().__init__(proxy.settings, route.name)
        self._proxy = proxy
        self._route = route
        self._credentials = credentials

    @property
    def private(self) -> bool:
        # Read with each client's own upstream identity, upstream decides who may.
        return self.settings.uses_client_identity

    def manifest(self, reference: str, *, want_body: bool) -> Manifest:
        return self._proxy.manifest(self._route, reference, self._credentials, want_body=want_body)

    def blob(self, digest: str, *, want_body: bool) -> BlobAnswer:
        return self._proxy.blob(
            self._route, digest, self._credentials, want_body=want_body, allow_redirect=True
        )

    def tags(self, n: str | None, last: str | None) -> Listing:
        query = {k: v for k, v in (("n", n), ("last", last)) if v is not None}
        if n is not None and not n.isdigit():
            raise BadRequest("n must be a whole number")
        return self._proxy.tags(self._route, self._credentials, query)

    def referrers(self, digest: str, artifact_type: str | None) -> Listing:
        return self._proxy.referrers(self._route, digest, self._credentials, artifact_type)

    def served(self, tag: str, digest: str) -> Served:
        upstream = self._route.upstream
        return Served(CACHED, upstream.url, upstream.name, self._route.repository, tag, digest)
