"""The tar export's spans: what a download resolved (image, layers, credentials used) on
the request's span, and the spans that outlive it: each layer's fetch in the pool
(``download_layer_N``), the stream (``stream_archive``, which runs after the server span
ended) and each layer's entry written into it (``write_layer_tar_N``).

The tracer itself and the rules of what may be recorded live in
:mod:`passthrough.observe.telemetry`; this module only knows the export's objects.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import INVALID_SPAN, Span, Status, StatusCode

from passthrough.export.tarstream import FileEntrySegment, FileSource, Piece, PieceT
from passthrough.observe import telemetry

if TYPE_CHECKING:
    from passthrough.config import Settings
    from passthrough.oci.manifest import LayerDescriptor, ResolvedImage
    from passthrough.oci.reference import ImageReference
    from passthrough.store.base import BlobSource, LayerFile
    from passthrough.upstream.auth import Credentials
    from passthrough.upstream.target import Target


def annotate_credentials(
    settings: Settings, client_credentials: Credentials | None, target: Target | None = None
) -> None:
    """The registry.* and registry.client_auth.* attributes on the current span: known
    before the target is chosen (mode, whether the client sent credentials) and after."""
    if telemetry.active_tracer() is None:
        return
    attributes: dict[str, Any] = {
        "registry.client_auth.mode": settings.client_auth,
        "registry.client_auth.credentials_present": client_credentials is not None,
        "registry.default_namespace": settings.default_namespace,
    }
    if target is not None:
        environment_registry = target.registry.url == settings.registry.url
        attributes.update(
            {
                "registry.name": target.registry.name,
                "registry.url": target.registry.url,
                "registry.target.source": target.source,
                "registry.auth.type": target.auth.value,
                "registry.auth.configured": environment_registry
                and bool(settings.bearer_token or settings.has_env_credentials),
                "registry.auth.service": target.service_override,
                "registry.client_auth.credentials_used": target.credentials_source == "client",
            }
        )
    telemetry.set_attributes(attributes)


def annotate_reference(reference: ImageReference, target: Target) -> None:
    """The image's name attributes, on the current span."""
    if telemetry.active_tracer() is None:
        return
    name = f"{target.registry.name}/{reference.repository}"
    ref = f"{name}@{reference.digest}" if reference.digest else f"{name}:{reference.tag}"
    telemetry.set_attributes(
        {
            "container.image.name": name,
            "container.image.tag": reference.tag,
            "oci.image.ref": ref,
            "oci.manifest.reference": reference.reference,
        }
    )


def annotate_image(image: ResolvedImage, target: Span | None = None) -> None:
    """What resolving proved, on ``target`` (default: the current span)."""
    if telemetry.active_tracer() is None:
        return
    telemetry.set_attributes(
        {
            "oci.manifest.digest": image.manifest_digest,
            "oci.manifest.media_type": image.manifest_media_type,
            "oci.image.index.digest": image.index_digest,
            "oci.image.config.digest": image.config_digest,
            "container.image.id": image.config_digest,
            "oci.image.platform": str(image.platform),
            "oci.image.layer_count": len(image.layers),
            "oci.image.compressed_size": image.total_compressed_size,
        },
        target,
    )


def _layer_attributes(layer: LayerDescriptor, compressed: bool) -> dict[str, Any]:
    return {
        "oci.layer.index": layer.index + 1,
        "oci.layer.digest": layer.digest,
        "oci.layer.diff_id": layer.diff_id,
        "oci.layer.media_type": layer.media_type,
        "oci.layer.compressed_size": layer.size,
        "passthrough.layer.sent_compressed": compressed,
    }


# -- the download's own spans: layer fetches and the stream -------------------------------


class DownloadTrace:
    """The spans of one download that live outside the request's span: the layer
    fetches (pool threads) and the stream (the body generator, which runs after the
    server span ended). Captures the request's context when the download is prepared."""

    def __init__(self, route: str, parent: otel_context.Context | None) -> None:
        self.route = route
        self._parent = parent
        self._stream: Span | None = None
        self._stream_context: otel_context.Context | None = None

    @classmethod
    def capture(cls, route: str, by_reference: bool) -> DownloadTrace:
        parent = otel_context.get_current() if telemetry.is_active() else None
        return cls(telemetry.download_route(route, by_reference), parent)

    @property
    def tracing(self) -> bool:
        return self._parent is not None and telemetry.is_active()

    def fetch_layer(
        self,
        fetch: Callable[..., LayerFile],
        source: BlobSource,
        layer: LayerDescriptor,
        *,
        compressed: bool,
        cancel: threading.Event,
    ) -> LayerFile:
        """Run ``fetch`` (a store's ``layer_file``) in a pool thread, inside the request's
        context and a ``download_layer_N`` span."""
        tracer = telemetry.active_tracer()
        if self._parent is None or tracer is None:
            return fetch(source, layer, compressed=compressed, cancel=cancel)
        token = otel_context.attach(self._parent)
        try:
            with tracer.start_as_current_span(
                f"download_layer_{layer.index + 1}",
                attributes=_layer_attributes(layer, compressed),
            ) as current:
                layer_file = fetch(source, layer, compressed=compressed, cancel=cancel)
                current.set_attribute("passthrough.cache.hit", layer_file.cache_hit)
                if not compressed:
                    current.set_attribute("oci.layer.decompressed_size", layer_file.size)
                return layer_file
        finally:
            otel_context.detach(token)

    def layer_segment(
        self,
        layer: LayerDescriptor,
        compressed: bool,
        name: str,
        opener: Callable[[], FileSource],
        known_size: int | None,
    ) -> FileEntrySegment:
        """The archive entry of a layer: traced as ``write_layer_tar_N`` when tracing."""
        if self._parent is None:
            return FileEntrySegment(name, opener, known_size=known_size)
        return _TracedLayerSegment(self, layer, compressed, name, opener, known_size)

    def stream_started(self, start: int, end: int | None) -> None:
        tracer = telemetry.active_tracer()
        if self._parent is None or tracer is None:
            return
        self._stream = tracer.start_span(
            "stream_archive",
            context=self._parent,
            attributes=telemetry.clean_attributes(
                {
                    "http.route": self.route,
                    "passthrough.range.start": start if start or end is not None else None,
                    "passthrough.range.end": end,
                }
            ),
        )
        self._stream_context = trace.set_span_in_context(self._stream, self._parent)

    def stream_finished(self, outcome: str, sent: int, failure: str | None) -> None:
        stream, self._stream = self._stream, None
        if stream is None:
            return
        stream.set_attribute("http.response.body.size", sent)
        stream.set_attribute("passthrough.download.outcome", outcome)
        if outcome == "aborted":
            stream.set_attribute("error.type", failure or "aborted")
            stream.set_status(Status(StatusCode.ERROR))
        elif outcome == "client_gone":
            stream.add_event("client_gone", {"http.response.body.size": sent})
        stream.end()

    def child_span(self, name: str, attributes: Mapping[str, Any]) -> Span:
        """A span under the stream (or the request when there is none), never current."""
        tracer = telemetry.active_tracer()
        if tracer is None:
            return INVALID_SPAN
        parent = self._stream_context or self._parent
        cleaned = telemetry.clean_attributes(attributes)
        return tracer.start_span(name, context=parent, attributes=cleaned)

    def log_fields(self) -> dict[str, str]:
        """The trace id for the download's log line, when tracing."""
        if self._parent is None:
            return {}
        context = trace.get_current_span(self._parent).get_span_context()
        return {"trace_id": f"{context.trace_id:032x}"} if context.is_valid else {}


class _TracedLayerSegment(FileEntrySegment):
    """A layer's archive entry whose production is the ``write_layer_tar_N`` span: the
    wait for the layer's fetch, then the bytes written into the stream."""

    def __init__(
        self,
        trace_: DownloadTrace,
        layer: LayerDescriptor,
        compressed: bool,
        name: str,
        opener: Callable[[], FileSource],
        known_size: int | None,
    ) -> None:
        super().__init__(name, opener, known_size=known_size)
        self._trace = trace_
        self._layer = layer
        self._compressed = compressed

    def produce(self, offset: int = 0) -> Iterator[bytes]:
        return self._traced(super().produce(offset))

    def pieces(self, offset: int = 0) -> Iterator[Piece]:
        return self._traced(super().pieces(offset))

    def _traced(self, chunks: Iterator[PieceT]) -> Iterator[PieceT]:
        attributes = _layer_attributes(self._layer, self._compressed)
        attributes["archive.entry.name"] = self.name
        current = self._trace.child_span(f"write_layer_tar_{self._layer.index + 1}", attributes)
        written = 0
        try:
            for chunk in chunks:
                if not written:
                    current.add_event("layer_ready")
                written += len(chunk)
                yield chunk
        except GeneratorExit:
            current.set_attribute("passthrough.download.outcome", "client_gone")
            raise
        except BaseException as exc:
            telemetry.mark_error(current, exc)
            raise
        finally:
            current.set_attribute("archive.entry.bytes_written", written)
            current.end()
