"""OpenTelemetry tracing: one trace per request, exported over OTLP.

Off unless ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set; then, and only then, the SDK is
loaded, a tracer provider with a ``BatchSpanProcessor`` is made and the Flask and
requests instrumentors are called. Off, every helper here returns at once and nothing is
patched. The endpoint, ``OTEL_EXPORTER_OTLP_PROTOCOL`` (``grpc``, the default, or
``http/protobuf``) and ``OTEL_SERVICE_NAME`` (default ``passthrough``) come from
:class:`~passthrough.config.Settings`, checked there once; the other standard ``OTEL_*``
variables (``OTEL_BSP_*``, ``OTEL_RESOURCE_ATTRIBUTES``) are the SDK's own, read by it.

Under gunicorn the provider is made per worker after the fork (``post_fork`` in
gunicorn.conf.py) and flushed when the worker exits (``worker_exit``); elsewhere (the
Flask test client, ``flask run``) :func:`passthrough.create_app` makes it.

The span tree of a download::

    GET /docker/{filename}                       SERVER, ends when the view returns
    ├── parse_image_request
    ├── extract_registry_client_credentials
    ├── resolve_manifest
    │   ├── GET /v2/{repository}/manifests/{reference}     CLIENT (one per attempt)
    │   ├── GET {registry_token_endpoint}                   CLIENT
    │   └── fetch_config_blob
    │       └── GET /v2/{repository}/blobs/{digest}
    ├── HEAD /v2/{repository}/blobs/{digest}               layer pre-flight
    ├── download_layer_N                          in the layer pool, N = 1-based
    │   └── GET /v2/{repository}/blobs/{digest}   (and GET {redirect_location})
    └── stream_archive                            the real transfer, ends with the body
        └── write_layer_tar_N

Secrets never reach a span: headers are never recorded (the instrumentors' header
capture variables are dropped), query strings are cut from ``url.full`` (the token
endpoint keeps ``service`` and ``scope``, never ``account``), and an exception adds only
its type as ``error.type`` — the status description is the message only for a
:class:`~passthrough.errors.PassthroughError`, whose messages are written to be shown.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode

from passthrough.errors import PassthroughError

if TYPE_CHECKING:
    from flask import Flask
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from requests import PreparedRequest, Response

    from passthrough.config import Settings


log = logging.getLogger(__name__)

DEFAULT_SERVICE_NAME = "passthrough"
TRACER_NAME = "passthrough"

#: Never traced: probes and scrapes would drown the downloads.
EXCLUDED_URLS = r"^[a-z]+://[^/]+/(health|metrics)(\?.*)?$"

#: Header capture is never wanted: an Authorization value must not reach a span.
_HEADER_CAPTURE_VARIABLES = (
    "OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST",
    "OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_RESPONSE",
    "OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_REQUEST",
    "OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_RESPONSE",
)

#: Query parameters of our own routes that may show in url.query; others are redacted.
_ROUTE_QUERY_PARAMETERS = frozenset({"platform", "layers", "format"})
#: Token endpoint parameters kept in url.full (``account`` is a user name: dropped).
_TOKEN_QUERY_PARAMETERS = frozenset({"service", "scope"})

#: Where the request's error kind waits for the server span's response hook.
_ERROR_KIND_KEY = "passthrough.error_kind"


# -- state ---------------------------------------------------------------------------------


@dataclass
class _Tracing:
    sdk_provider: TracerProvider
    provider: trace.TracerProvider  # the safe wrapper every tracer comes from
    tracer: trace.Tracer


_active: _Tracing | None = None
_lock = threading.Lock()


def is_active() -> bool:
    """Whether this process traces (a provider was set up and not shut down)."""
    return _active is not None


def tracing_enabled(settings: Settings) -> bool:
    """Whether OTEL_EXPORTER_OTLP_ENDPOINT asks for traces."""
    return settings.otel_endpoint is not None


def under_gunicorn() -> bool:
    """Whether this process is gunicorn's (master or worker): then its hooks own setup."""
    import sys

    return "gunicorn.arbiter" in sys.modules


# -- setup and shutdown ----------------------------------------------------------------------


def setup_tracing(
    settings: Settings | None = None,
    *,
    exporter: SpanExporter | None = None,
    environ: Mapping[str, str] | None = None,
    set_global: bool = True,
    batch: bool = True,
) -> TracerProvider:
    """Make this process's tracer provider and instrument ``requests``; idempotent.

    ``settings`` default to those of ``environ`` (the process environment and .env).
    ``exporter`` defaults to OTLP (``OTEL_EXPORTER_OTLP_PROTOCOL``); tests pass an
    in-memory one with ``set_global=False`` (the global provider can be set only once
    per process) and ``batch=False`` (spans exported as they end).
    """
    global _active
    with _lock:
        if _active is not None:
            return _active.sdk_provider
        from opentelemetry.instrumentation.requests import RequestsInstrumentor
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        if settings is None:
            from passthrough.config import load_settings

            settings = load_settings(environ, concerns=())
        _prepare_environment(environ)
        detected = Resource.create({}).attributes.get(SERVICE_NAME)
        service = settings.otel_service_name
        if not service:
            default = isinstance(detected, str) and detected.startswith("unknown_service")
            service = DEFAULT_SERVICE_NAME if detected is None or default else str(detected)
        resource = Resource.create({SERVICE_NAME: service, "service.version": _version()})
        if exporter is None:
            exporter = _otlp_exporter(settings.otel_protocol)
        sdk_provider = TracerProvider(resource=resource)
        processor = BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
        sdk_provider.add_span_processor(processor)
        provider = SafeTracerProvider(sdk_provider)
        if set_global:
            trace.set_tracer_provider(provider)
        RequestsInstrumentor().instrument(
            tracer_provider=provider,
            request_hook=_client_request_hook,
            response_hook=_client_response_hook,
        )
        _active = _Tracing(sdk_provider, provider, provider.get_tracer(TRACER_NAME, _version()))
        return sdk_provider


def shutdown_tracing(timeout_millis: int = 10_000) -> None:
    """Export what is pending, stop the provider and take ``requests`` back (a gunicorn
    worker's exit, or the end of a test)."""
    global _active
    with _lock:
        tracing, _active = _active, None
    if tracing is None:
        return
    from opentelemetry.instrumentation.requests import RequestsInstrumentor

    RequestsInstrumentor().uninstrument()
    try:
        tracing.sdk_provider.force_flush(timeout_millis)
    finally:
        tracing.sdk_provider.shutdown()


def instrument_app(app: Flask) -> None:
    """Trace the app's requests (server spans named by their templated route); nothing
    when tracing is off or the app already is instrumented."""
    tracing = _active
    if tracing is None or getattr(app, "_is_instrumented_by_opentelemetry", False):
        return
    from opentelemetry.instrumentation.flask import FlaskInstrumentor

    FlaskInstrumentor().instrument_app(  # type: ignore[no-untyped-call]
        app,
        request_hook=_server_request_hook,
        response_hook=_server_response_hook,
        tracer_provider=tracing.provider,
        excluded_urls=EXCLUDED_URLS,
        enable_commenter=False,
    )


def _prepare_environment(environ: Mapping[str, str] | None) -> None:
    """OTEL_* from .env (or create_app's overrides) are copied into the process
    environment (the SDK and the exporters read only that: the endpoint, OTEL_BSP_*),
    the stable HTTP semantic conventions are asked for, and header capture is switched
    off."""
    from passthrough.config import read_environment

    for name, value in read_environment(environ).items():
        if name.startswith("OTEL_"):
            os.environ.setdefault(name, value)
    os.environ.setdefault("OTEL_SEMCONV_STABILITY_OPT_IN", "http")
    for name in _HEADER_CAPTURE_VARIABLES:
        if os.environ.pop(name, None):
            log.warning("%s is ignored: passthrough never records HTTP headers", name)


def _otlp_exporter(protocol: str) -> SpanExporter:
    """The OTLP exporter of OTEL_EXPORTER_OTLP_PROTOCOL (one of config.OTLP_PROTOCOLS)."""
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HTTPSpanExporter,
        )

        return HTTPSpanExporter()
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("passthrough")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0"


# -- a tracer that never records an exception's message --------------------------------------


class SafeTracerProvider(trace.TracerProvider):
    """Wraps the SDK provider: every tracer it hands out (ours and the instrumentors')
    records no exception event and sets no status from an exception's text."""

    def __init__(self, inner: trace.TracerProvider) -> None:
        self.inner = inner

    def get_tracer(
        self,
        instrumenting_module_name: str,
        instrumenting_library_version: str | None = None,
        schema_url: str | None = None,
        attributes: Any = None,
    ) -> trace.Tracer:
        return SafeTracer(
            self.inner.get_tracer(
                instrumenting_module_name, instrumenting_library_version, schema_url, attributes
            )
        )


class SafeTracer(trace.Tracer):
    def __init__(self, inner: trace.Tracer) -> None:
        self.inner = inner

    def start_span(
        self,
        name: str,
        context: otel_context.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Any = None,
        links: Any = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> Span:
        return self.inner.start_span(
            name,
            context,
            kind,
            attributes,
            links,
            start_time,
            record_exception=False,
            set_status_on_exception=False,
        )

    @contextlib.contextmanager
    def start_as_current_span(  # type: ignore[override]
        self,
        name: str,
        context: otel_context.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Any = None,
        links: Any = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> Iterator[Span]:
        span = self.start_span(name, context, kind, attributes, links, start_time)
        with trace.use_span(
            span, end_on_exit=end_on_exit, record_exception=False, set_status_on_exception=False
        ):
            try:
                yield span
            except BaseException as exc:
                mark_error(span, exc)
                raise


def error_type(exc: BaseException) -> str:
    """``error.type``: a PassthroughError's kind, else the exception's class name."""
    if isinstance(exc, PassthroughError):
        return exc.kind
    return type(exc).__qualname__


def mark_error(span: Span, exc: BaseException) -> None:
    """Mark ``span`` failed by ``exc``: its type always, its message only when it is ours."""
    if isinstance(exc, GeneratorExit) or not span.is_recording():
        return
    span.set_attribute("error.type", error_type(exc))
    description = exc.message if isinstance(exc, PassthroughError) else None
    span.set_status(Status(StatusCode.ERROR, description))


# -- our spans -------------------------------------------------------------------------------


@contextlib.contextmanager
def span(name: str, attributes: Mapping[str, Any] | None = None) -> Iterator[Span]:
    """A child of the current span, current while the block runs; a non-recording span
    when tracing is off."""
    tracing = _active
    if tracing is None:
        yield INVALID_SPAN
        return
    with tracing.tracer.start_as_current_span(name, attributes=_clean(attributes)) as current:
        yield current


def set_attributes(attributes: Mapping[str, Any], target: Span | None = None) -> None:
    """Set attributes on ``target`` (default: the current span); None values are left out."""
    if _active is None:
        return
    chosen = target if target is not None else trace.get_current_span()
    if chosen.is_recording():
        chosen.set_attributes(_clean(attributes))


def record_error(exc: BaseException) -> None:
    """The request failed with ``exc``: its kind goes on the current (route) span, and
    stays there when the server instrumentation sets the status afterwards."""
    if _active is None:
        return
    kind = error_type(exc)
    trace.get_current_span().set_attribute("error.type", kind)
    with contextlib.suppress(ImportError, RuntimeError):
        from flask import has_request_context, request

        if has_request_context():
            request.environ[_ERROR_KIND_KEY] = kind


def _clean(attributes: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (attributes or {}).items() if v is not None}


# -- route names -----------------------------------------------------------------------------

_RULE_VARIABLE = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")


def route_template(rule: str) -> str:
    """A Flask rule as the templated route: ``/ref/<path:reference>`` → ``/ref/{reference}``."""
    return _RULE_VARIABLE.sub(r"{\1}", rule)


def download_route(route: str, by_reference: bool) -> str:
    """The templated route of a download, from its route family (Route's value)."""
    prefix = "" if route == "docker" else f"/{route}/{{scheme}}/{{host}}"
    return prefix + ("/ref/{reference}" if by_reference else "/docker/{filename}")


def _server_request_hook(span: Span, environ: Mapping[str, Any]) -> None:
    from flask import request

    rule = request.url_rule
    if rule is not None and span.is_recording():
        span.update_name(f"{request.method} {route_template(rule.rule)}")


def _server_response_hook(span: Span, status: str, headers: Any) -> None:
    if span is None or not span.is_recording():
        return
    from flask import request

    rule = request.url_rule
    if rule is not None:
        span.set_attribute("http.route", route_template(rule.rule))
    if request.query_string:
        span.set_attribute("url.query", _route_query(request.query_string.decode("latin-1")))
    kind = request.environ.get(_ERROR_KIND_KEY)
    if kind:
        span.set_attribute("error.type", kind)


def _route_query(query: str) -> str:
    pairs = parse_qsl(query, keep_blank_values=True)
    return urlencode(
        [(k, v if k in _ROUTE_QUERY_PARAMETERS else "REDACTED") for k, v in pairs], safe="/,"
    )


# -- upstream requests -----------------------------------------------------------------------

_MANIFEST_PATH = re.compile(r"^/v2/(?P<repository>.+)/manifests/(?P<reference>[^/]+)$")
_BLOB_PATH = re.compile(r"^/v2/(?P<repository>.+)/blobs/(?P<digest>[^/]+)$")


@dataclass(frozen=True)
class UpstreamCall:
    """One HTTP exchange with a registry, its token service or its blob storage."""

    operation: str  # manifest, blob, token, redirect, other
    span_name: str
    attributes: dict[str, Any]
    keep_parameters: frozenset[str] = frozenset()


_current_call: ContextVar[UpstreamCall | None] = ContextVar("passthrough_call", default=None)
_token_request: ContextVar[bool] = ContextVar("passthrough_token_request", default=False)


@contextlib.contextmanager
def token_request() -> Iterator[None]:
    """Requests made inside go to the registry's token endpoint."""
    reset = _token_request.set(True)
    try:
        yield
    finally:
        _token_request.reset(reset)


def classify(method: str, url: str, registry_url: str, registry_name: str) -> UpstreamCall:
    """Name an upstream request by what it does (never by its variable parts)."""
    parts = urlsplit(url)
    if _active is None:  # only the operation is needed, for the metrics
        return UpstreamCall(_operation(parts, registry_url), "", {})
    attributes: dict[str, Any] = {"registry.name": registry_name, "registry.url": registry_url}
    if _token_request.get():
        params = dict(parse_qsl(parts.query))
        attributes.update(
            {
                "registry.operation": "token",
                "registry.auth.service": params.get("service"),
                "registry.auth.scope_present": "scope" in params,
            }
        )
        return UpstreamCall(
            "token", f"{method} {{registry_token_endpoint}}", attributes, _TOKEN_QUERY_PARAMETERS
        )
    same_origin = (parts.scheme, parts.netloc.lower()) == _origin(registry_url)
    manifest = _MANIFEST_PATH.match(parts.path) if same_origin else None
    blob = _BLOB_PATH.match(parts.path) if same_origin else None
    if manifest:
        attributes.update(
            {
                "registry.operation": "manifest",
                "registry.repository": manifest["repository"],
                "oci.manifest.reference": manifest["reference"],
            }
        )
        return UpstreamCall(
            "manifest", f"{method} /v2/{{repository}}/manifests/{{reference}}", attributes
        )
    if blob:
        attributes.update(
            {
                "registry.operation": "blob",
                "registry.repository": blob["repository"],
                "oci.blob.digest": blob["digest"],
            }
        )
        return UpstreamCall("blob", f"{method} /v2/{{repository}}/blobs/{{digest}}", attributes)
    if not same_origin:
        attributes["registry.operation"] = "redirect"
        return UpstreamCall("redirect", f"{method} {{redirect_location}}", attributes)
    attributes["registry.operation"] = "other"
    return UpstreamCall("other", method, attributes)


def _operation(parts: Any, registry_url: str) -> str:
    if _token_request.get():
        return "token"
    if (parts.scheme, parts.netloc.lower()) != _origin(registry_url):
        return "redirect"
    if _MANIFEST_PATH.match(parts.path):
        return "manifest"
    return "blob" if _BLOB_PATH.match(parts.path) else "other"


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc.lower()


@contextlib.contextmanager
def upstream_call(call: UpstreamCall) -> Iterator[None]:
    """The requests instrumentation names and annotates what is sent inside."""
    if _active is None:
        yield
        return
    reset = _current_call.set(call)
    try:
        yield
    finally:
        _current_call.reset(reset)


def sanitize_url(url: str, keep: frozenset[str] = frozenset()) -> str:
    """``url`` without user info, fragment, or any query parameter not in ``keep``."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k in keep], safe=":/")
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def _client_request_hook(span: Span, request: PreparedRequest) -> None:
    if not span.is_recording():
        return
    call = _current_call.get()
    url = sanitize_url(request.url or "", call.keep_parameters if call else frozenset())
    span.set_attribute("url.full", url)
    existing = getattr(span, "attributes", None) or {}
    if "http.url" in existing:  # old semantic conventions asked for too
        span.set_attribute("http.url", url)
    if call is not None:
        span.update_name(call.span_name)
        span.set_attributes(_clean(call.attributes))


def _client_response_hook(span: Span, request: PreparedRequest, response: Response) -> None:
    if not span.is_recording():
        return
    length = response.headers.get("Content-Length", "")
    if request.method != "HEAD" and length.isdigit():
        span.set_attribute("http.response.body.size", int(length))
    if response.status_code == 401:
        scheme = response.headers.get("WWW-Authenticate", "").strip().split(" ", 1)[0].lower()
        if scheme in ("basic", "bearer"):
            span.set_attribute("registry.auth.challenge", scheme)


def active_tracer() -> trace.Tracer | None:
    """The tracer of this process while it traces, else None."""
    tracing = _active
    return tracing.tracer if tracing is not None else None


def clean_attributes(attributes: Mapping[str, Any] | None) -> dict[str, Any]:
    """Attributes without the None values (OpenTelemetry refuses them)."""
    return _clean(attributes)
