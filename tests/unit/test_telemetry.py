"""Tracing through the Flask test client against registries simulated with `responses`:
the span tree of a download (names, kinds, parent links within one trace, attributes),
errors recorded by type only, and secrets — client Basic credentials, REGISTRY_PASSWORD,
REGISTRY_BEARER_TOKEN, the issued token — in no span and no log line. Also: with
OTEL_EXPORTER_OTLP_ENDPOINT unset nothing is instrumented at all."""

from __future__ import annotations

import base64
import gzip
import importlib.util
import io
import json
import logging
import re
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import requests
import responses
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

from passthrough import create_app
from passthrough.observe import telemetry
from passthrough.observe.logs import JsonFormatter, TextFormatter
from tests.support.helpers import digest

if TYPE_CHECKING:  # imported lazily: a test below proves the app alone never loads the SDK
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

REG = "http://reg.test:5000"
REALM = "http://auth.test/token"
REPO_ROOT = Path(__file__).resolve().parents[2]
MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"


def tar_of(name: str, payload: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        archive.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


@dataclass
class FakeRegistry:
    """One image in a simulated registry. ``authorized(header)`` says whether a /v2/
    request's Authorization is good; ``challenge`` is the 401's WWW-Authenticate; with
    ``token``, the realm issues it to ``token_credentials`` (Basic) or anyone (None)."""

    repository: str = "team/api"
    tag: str = "v1"
    base: str = REG
    authorized: Callable[[str | None], bool] = lambda header: True
    challenge: str = 'Basic realm="registry"'
    token: str | None = None
    token_credentials: tuple[str, str] | None = None
    extra_headers: dict[str, str] = field(default_factory=dict)
    manifest_status: int = 200
    tars: list[bytes] = field(
        default_factory=lambda: [tar_of("a.txt", b"a" * 1500), tar_of("b.txt", b"b" * 5000)]
    )

    def __post_init__(self) -> None:
        self.blobs = [gzip.compress(t, mtime=0) for t in self.tars]
        self.config = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": [digest(t) for t in self.tars]},
            }
        ).encode()
        self.manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": MANIFEST_TYPE,
                "config": {
                    "mediaType": "application/vnd.docker.container.image.v1+json",
                    "size": len(self.config),
                    "digest": digest(self.config),
                },
                "layers": [
                    {
                        "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                        "size": len(b),
                        "digest": digest(b),
                    }
                    for b in self.blobs
                ],
            }
        ).encode()
        self.contents = {digest(self.config): self.config, **{digest(b): b for b in self.blobs}}

    def register(self, rsps: Any) -> None:
        """Add the callbacks to ``rsps`` (a RequestsMock, or the responses module)."""
        pattern = re.compile(re.escape(f"{self.base}/v2/") + ".*")
        for method in ("GET", "HEAD"):
            rsps.add_callback(method, pattern, callback=self._v2)
        if self.token is not None:
            rsps.add_callback("GET", re.compile(re.escape(REALM) + ".*"), callback=self._token)

    def _v2(self, request: requests.PreparedRequest) -> tuple[int, dict[str, str], bytes]:
        if not self.authorized(request.headers.get("Authorization")):
            return 401, {"WWW-Authenticate": self.challenge}, b""
        path = request.path_url
        head = request.method == "HEAD"
        if "/manifests/" in path:
            if self.manifest_status != 200:
                return self.manifest_status, dict(self.extra_headers), b""
            headers = {
                "Content-Type": MANIFEST_TYPE,
                "Docker-Content-Digest": digest(self.manifest),
                **self.extra_headers,
            }
            return 200, headers, b"" if head else self.manifest
        blob = self.contents.get(path.rsplit("/", 1)[1])
        if blob is None:
            return 404, {}, b""
        return 200, {"Content-Length": str(len(blob))}, b"" if head else blob

    def _token(self, request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        if self.token_credentials is not None:
            user, password = self.token_credentials
            expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
            if request.headers.get("Authorization") != expected:
                return 401, {}, ""
        return 200, {"Content-Type": "application/json"}, json.dumps({"token": self.token})


def token_registry(token: str, user: str, password: str) -> FakeRegistry:
    challenge = f'Bearer realm="{REALM}",service="reg.test",scope="repository:team/api:pull"'
    return FakeRegistry(
        authorized=lambda header: header == f"Bearer {token}",
        challenge=challenge,
        token=token,
        token_credentials=(user, password),
    )


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def exporter(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """Tracing into memory for this test: no global provider, spans exported as they end."""
    monkeypatch.setenv("OTEL_SEMCONV_STABILITY_OPT_IN", "http")
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"):
        monkeypatch.delenv(name, raising=False)
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    memory = InMemorySpanExporter()
    telemetry.setup_tracing(
        exporter=memory, set_global=False, batch=False, environ={"ENV_FILE": "/nonexistent"}
    )
    try:
        yield memory
    finally:
        telemetry.shutdown_tracing()


def make_app(tmp_path: Path, **env: str) -> Any:
    config = {"REGISTRY_URL": REG, "ENV_FILE": "/nonexistent", "TEMP_DIR": str(tmp_path)}
    config.update(env)
    if not config.get("CACHE_DIR"):
        config["STORE"] = "off"  # no store unless the test names one
    return create_app(config)


class Tree:
    """The finished spans, by name, with their parents (typed loosely: attributes are
    read by key throughout)."""

    def __init__(self, spans: tuple[ReadableSpan, ...]) -> None:
        self.spans: tuple[Any, ...] = spans
        self.by_id = {s.context.span_id: s for s in spans}

    def named(self, name: str) -> list[Any]:
        return [s for s in self.spans if s.name == name]

    def one(self, name: str) -> Any:
        found = self.named(name)
        assert len(found) == 1, f"{name}: {len(found)} spans among {self.names()}"
        return found[0]

    def parent(self, span: ReadableSpan) -> ReadableSpan | None:
        return self.by_id.get(span.parent.span_id) if span.parent else None

    def parent_name(self, span: ReadableSpan) -> str | None:
        parent = self.parent(span)
        return parent.name if parent else None

    def names(self) -> list[str]:
        return sorted(s.name for s in self.spans)


def everything_in(spans: tuple[ReadableSpan, ...]) -> str:
    """Every name, attribute, event, status and resource value of the spans, as text."""
    parts: list[str] = []
    for span in spans:
        parts.append(span.name)
        parts.append(repr(dict(span.attributes or {})))
        parts.append(repr(dict(span.resource.attributes)))
        parts.append(repr(span.status.description))
        for event in span.events:
            parts.append(event.name)
            parts.append(repr(dict(event.attributes or {})))
        for link in span.links:
            parts.append(repr(dict(link.attributes or {})))
    return "\n".join(parts)


def log_lines(records: list[logging.LogRecord]) -> str:
    """Each captured record as both formatters would write it."""
    text, structured = TextFormatter(), JsonFormatter()
    return "\n".join(f(r) for r in records for f in (text.format, structured.format))


def secret_forms(user: str, secret: str) -> list[str]:
    return [secret, base64.b64encode(f"{user}:{secret}".encode()).decode()]


def leaks(secrets: list[str], **texts: str) -> list[str]:
    """Where each secret shows up (a short list: pytest's diff of long texts is slow)."""
    return [f"{secret!r} in {where}" for secret in secrets for where, text in texts.items()
            if secret in text]


# -- the span tree ---------------------------------------------------------------------------


@responses.activate
def test_download_span_tree_and_attributes(exporter, tmp_path):
    registry = token_registry("issued-token-T0K3N", "alice", "env-password-Pw9")
    registry.register(responses)
    app = make_app(tmp_path, REGISTRY_USERNAME="alice", REGISTRY_PASSWORD="env-password-Pw9")
    response = app.test_client().get(
        "/docker/team__api_v1.tar", headers={"User-Agent": "ios-xe/17.9"}
    )
    assert response.status_code == 200
    body = response.data  # the body is streamed (and traced) as it is read
    tree = Tree(exporter.get_finished_spans())

    route = tree.one("GET /docker/{filename}")
    assert route.kind is SpanKind.SERVER and route.parent is None
    assert route.resource.attributes["service.name"] == "passthrough"
    assert len({s.context.trace_id for s in tree.spans}) == 1, "one trace per request"

    expected_parents = {
        "parse_image_request": "GET /docker/{filename}",
        "extract_registry_client_credentials": "GET /docker/{filename}",
        "resolve_manifest": "GET /docker/{filename}",
        "GET {registry_token_endpoint}": "resolve_manifest",
        "fetch_config_blob": "resolve_manifest",
        "download_layer_1": "GET /docker/{filename}",
        "download_layer_2": "GET /docker/{filename}",
        "stream_archive": "GET /docker/{filename}",
        "write_layer_tar_1": "stream_archive",
        "write_layer_tar_2": "stream_archive",
    }
    for name, parent in expected_parents.items():
        assert tree.parent_name(tree.one(name)) == parent, name

    manifests = tree.named("GET /v2/{repository}/manifests/{reference}")
    assert [s.attributes["http.response.status_code"] for s in manifests] == [401, 200]
    assert all(tree.parent_name(s) == "resolve_manifest" for s in manifests)
    assert all(s.kind is SpanKind.CLIENT for s in manifests)
    heads = tree.named("HEAD /v2/{repository}/blobs/{digest}")
    assert len(heads) == 2 and all(tree.parent_name(s) == route.name for s in heads)
    blob_gets = tree.named("GET /v2/{repository}/blobs/{digest}")
    assert sorted(tree.parent_name(s) or "" for s in blob_gets) == [
        "download_layer_1",
        "download_layer_2",
        "fetch_config_blob",
    ], "layer fetches run in the pool, inside the request's trace"

    # The route span: templated route, semantic conventions, image and registry facts.
    attrs = route.attributes
    assert attrs["http.route"] == "/docker/{filename}"
    assert attrs["http.request.method"] == "GET"
    assert attrs["http.response.status_code"] == 200
    assert attrs["url.path"] == "/docker/team__api_v1.tar"
    assert attrs["user_agent.original"] == "ios-xe/17.9"
    assert attrs["container.image.name"] == "reg.test:5000/team/api"
    assert attrs["container.image.tag"] == "v1"
    assert attrs["oci.image.ref"] == "reg.test:5000/team/api:v1"
    assert attrs["oci.manifest.digest"] == digest(registry.manifest)
    assert attrs["oci.image.config.digest"] == digest(registry.config)
    assert attrs["container.image.id"] == digest(registry.config)
    assert attrs["registry.name"] == "reg.test:5000"
    assert attrs["registry.url"] == REG
    assert attrs["registry.target.source"] == "environment"
    assert attrs["registry.auth.configured"] is True
    assert attrs["registry.auth.type"] == "credentials"
    assert attrs["registry.client_auth.mode"] == "optional"
    assert attrs["registry.client_auth.credentials_present"] is False
    assert attrs["registry.client_auth.credentials_used"] is False
    assert attrs["registry.client_auth.challenge_sent"] is False

    token = tree.one("GET {registry_token_endpoint}")
    assert token.kind is SpanKind.CLIENT
    assert token.attributes["registry.operation"] == "token"
    assert token.attributes["registry.auth.service"] == "reg.test"
    assert token.attributes["registry.auth.scope_present"] is True
    url = str(token.attributes["url.full"])
    assert url.startswith(REALM + "?") and "service=reg.test" in url and "scope=" in url
    assert "account" not in url and "alice" not in url, "the account (a user name) is dropped"

    layer = tree.one("download_layer_2")
    assert layer.attributes["oci.layer.index"] == 2
    assert layer.attributes["oci.layer.digest"] == digest(registry.blobs[1])
    assert layer.attributes["oci.layer.compressed_size"] == len(registry.blobs[1])
    assert layer.attributes["oci.layer.decompressed_size"] == len(registry.tars[1])
    assert layer.attributes["passthrough.cache.hit"] is False
    blob = next(s for s in blob_gets if tree.parent_name(s) == "download_layer_2")
    assert blob.attributes["http.response.body.size"] == len(registry.blobs[1])
    assert blob.attributes["registry.operation"] == "blob"
    assert blob.attributes["url.full"] == f"{REG}/v2/team/api/blobs/{digest(registry.blobs[1])}"

    stream = tree.one("stream_archive")
    assert stream.attributes["http.response.body.size"] == len(body)
    assert stream.attributes["passthrough.download.outcome"] == "completed"
    assert stream.end_time >= tree.one("write_layer_tar_2").end_time
    assert stream.end_time > route.end_time, "the route span ends before the body is sent"
    write = tree.one("write_layer_tar_1")
    assert write.attributes["oci.layer.index"] == 1
    assert int(write.attributes["archive.entry.bytes_written"]) > len(registry.tars[0])


@responses.activate
def test_ref_and_registry_routes_are_named_by_their_template(exporter, tmp_path):
    FakeRegistry().register(responses)
    client = make_app(tmp_path).test_client()
    for path in ("/ref/team/api:v1.tar", "/registry/http/reg.test:5000/docker/team__api_v1.tar"):
        response = client.get(path)
        assert response.status_code == 200 and response.data
    tree = Tree(exporter.get_finished_spans())
    ref = tree.one("GET /ref/{reference}")
    assert ref.attributes["http.route"] == "/ref/{reference}"
    other = tree.one("GET /registry/{scheme}/{host}/docker/{filename}")
    assert other.attributes["http.route"] == "/registry/{scheme}/{host}/docker/{filename}"
    assert {s.attributes["http.route"] for s in tree.named("stream_archive")} == {
        "/ref/{reference}",
        "/registry/{scheme}/{host}/docker/{filename}",
    }
    assert {s.context.trace_id for s in tree.named("stream_archive")} == {
        ref.context.trace_id,
        other.context.trace_id,
    }, "one trace per request"


@responses.activate
def test_cache_hits_and_misses_show_on_layer_spans(exporter, tmp_path):
    FakeRegistry().register(responses)
    app = make_app(tmp_path, CACHE_DIR=str(tmp_path / "cache"))
    client = app.test_client()
    assert client.get("/docker/team__api_v1.tar").data
    first = [s.attributes["passthrough.cache.hit"] for s in exporter.get_finished_spans()
             if s.name.startswith("download_layer_")]
    exporter.clear()
    assert client.get("/docker/team__api_v1.tar").data
    tree = Tree(exporter.get_finished_spans())
    second = [s.attributes["passthrough.cache.hit"] for s in tree.spans
              if s.name.startswith("download_layer_")]
    assert first == [False, False]
    assert second == [True, True]
    assert not tree.named("GET /v2/{repository}/blobs/{digest}"), "a warm download fetches no blob"


# -- errors ----------------------------------------------------------------------------------


@responses.activate
def test_an_upstream_error_is_recorded_by_kind_without_exception_events(exporter, tmp_path):
    FakeRegistry(manifest_status=404).register(responses)
    response = make_app(tmp_path).test_client().get("/docker/team__api_v1.tar")
    assert response.status_code == 404
    tree = Tree(exporter.get_finished_spans())
    route = tree.one("GET /docker/{filename}")
    assert route.attributes["error.type"] == "upstream_not_found"
    resolve = tree.one("resolve_manifest")
    assert resolve.status.status_code is StatusCode.ERROR
    assert resolve.attributes["error.type"] == "upstream_not_found"
    assert "not found on the registry" in (resolve.status.description or "")
    assert not tree.named("stream_archive")
    assert all(not span.events for span in tree.spans), "no exception event anywhere"


@responses.activate
def test_a_foreign_exception_leaves_only_its_type(exporter, tmp_path):
    """A requests exception's message holds the URL (and could hold more): only the
    exception's type may reach the spans."""
    message = "boom at http://user:leaked-in-message@reg.test:5000/v2/"
    responses.add(
        responses.GET, f"{REG}/v2/team/api/manifests/v1", body=requests.ConnectionError(message)
    )
    app = make_app(tmp_path, UPSTREAM_RETRIES="0")
    assert app.test_client().get("/docker/team__api_v1.tar").status_code == 502
    spans = exporter.get_finished_spans()
    client_span = Tree(spans).one("GET /v2/{repository}/manifests/{reference}")
    assert client_span.attributes["error.type"] == "ConnectionError"
    assert leaks(["leaked-in-message", "boom"], spans=everything_in(spans)) == []


# -- secrets ---------------------------------------------------------------------------------


def _download_and_collect(app: Any, caplog: pytest.LogCaptureFixture, **kw: Any) -> Any:
    caplog.set_level(logging.DEBUG)
    response = app.test_client().get("/docker/team__api_v1.tar", **kw)
    assert response.status_code == 200, response.data[:200]
    assert response.data  # streamed to the end
    return response


@pytest.fixture
def exporter_capturing_headers(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """Tracing set up while the operator asks the instrumentors to capture Authorization."""
    for name in ("SERVER_REQUEST", "CLIENT_REQUEST"):
        monkeypatch.setenv(f"OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_{name}", "Authorization")
    yield from exporter.__wrapped__(monkeypatch)  # type: ignore[attr-defined]


@responses.activate
def test_environment_password_and_issued_token_reach_no_span_or_log(
    exporter_capturing_headers, tmp_path, caplog
):
    exporter = exporter_capturing_headers
    password, token = "env-Pa55word-Zq81", "issued-t0ken-Xy77"
    token_registry(token, "alice", password).register(responses)
    app = make_app(tmp_path, REGISTRY_USERNAME="alice", REGISTRY_PASSWORD=password)
    _download_and_collect(app, caplog)
    spans = exporter.get_finished_spans()
    assert len(spans) > 10
    dump, logged = everything_in(spans), log_lines(caplog.records)
    assert "download image=" in logged
    assert leaks([*secret_forms("alice", password), token], spans=dump, logs=logged) == []
    assert leaks(["http.request.header"], spans=dump) == [], "headers are never recorded"


@responses.activate
def test_client_basic_credentials_reach_no_span_or_log(exporter, tmp_path, caplog):
    password = "client-Secr3t-Hq42"
    registry = FakeRegistry(
        authorized=lambda header: header == basic("bob", password),
        challenge='Basic realm="registry"',
    )
    registry.register(responses)
    app = make_app(tmp_path)
    _download_and_collect(app, caplog, headers={"Authorization": basic("bob", password)})
    spans = exporter.get_finished_spans()
    route = Tree(spans).one("GET /docker/{filename}")
    assert route.attributes["registry.client_auth.credentials_present"] is True
    assert route.attributes["registry.client_auth.credentials_used"] is True
    dump, logged = everything_in(spans), log_lines(caplog.records)
    assert leaks(secret_forms("bob", password), spans=dump, logs=logged) == []


@responses.activate
def test_client_without_credentials_is_challenged(exporter, tmp_path):
    FakeRegistry(authorized=lambda header: header is not None).register(responses)
    response = make_app(tmp_path).test_client().get("/docker/team__api_v1.tar")
    assert response.status_code == 401
    route = Tree(exporter.get_finished_spans()).one("GET /docker/{filename}")
    assert route.attributes["registry.client_auth.challenge_sent"] is True
    assert route.attributes["error.type"] == "upstream_unauthorized"


@responses.activate
def test_static_bearer_token_reaches_no_span_or_log(exporter, tmp_path, caplog):
    bearer = "static-Bearer-Kk55-abcdef"
    FakeRegistry(authorized=lambda header: header == f"Bearer {bearer}").register(responses)
    app = make_app(tmp_path, REGISTRY_BEARER_TOKEN=bearer)
    _download_and_collect(app, caplog)
    spans = exporter.get_finished_spans()
    route = Tree(spans).one("GET /docker/{filename}")
    assert route.attributes["registry.auth.type"] == "static_bearer"
    assert leaks([bearer], spans=everything_in(spans), logs=log_lines(caplog.records)) == []


# -- off means off ---------------------------------------------------------------------------


def test_nothing_is_instrumented_when_the_endpoint_is_unset(tmp_path, monkeypatch):
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    assert not telemetry.is_active()
    app = make_app(tmp_path)
    assert not getattr(app, "_is_instrumented_by_opentelemetry", False)
    assert not telemetry.is_active()
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    assert not getattr(requests.Session.send, "opentelemetry_instrumentation_requests_applied", 0)
    # gunicorn's worker hook does nothing either.
    spec = importlib.util.spec_from_file_location("conf_under_test", REPO_ROOT / "gunicorn.conf.py")
    assert spec is not None and spec.loader is not None
    conf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conf)
    conf.post_fork(None, None)
    assert not telemetry.is_active()
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


@pytest.mark.rig  # starts a Python process: the full tier
def test_a_download_without_endpoint_loads_neither_sdk_nor_instrumentation(tmp_path):
    """In a fresh interpreter: a whole download with the endpoint unset never imports
    the SDK or an instrumentor, and leaves requests unpatched."""
    script = f"""
import sys, responses
sys.path.insert(0, {str(REPO_ROOT)!r})
from tests.unit.test_telemetry import FakeRegistry, make_app
from pathlib import Path
with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
    FakeRegistry().register(rsps)
    app = make_app(Path({str(tmp_path)!r}))
    assert app.test_client().get("/docker/team__api_v1.tar").status_code == 200
import requests
loaded = sorted(m for m in sys.modules
                if m.startswith(("opentelemetry.sdk", "opentelemetry.instrumentation",
                                 "opentelemetry.exporter")))
print(loaded, hasattr(requests.Session.send, "opentelemetry_instrumentation_requests_applied"))
"""
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[] False"


def test_setup_is_idempotent_and_shutdown_unpatches_requests(monkeypatch):
    monkeypatch.setenv("OTEL_SEMCONV_STABILITY_OPT_IN", "http")
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    memory = InMemorySpanExporter()
    first = telemetry.setup_tracing(exporter=memory, set_global=False, batch=False)
    try:
        assert telemetry.setup_tracing(exporter=InMemorySpanExporter(), set_global=False) is first
        assert getattr(requests.Session.send, "opentelemetry_instrumentation_requests_applied", 0)
    finally:
        telemetry.shutdown_tracing()
    assert not telemetry.is_active()
    assert not getattr(requests.Session.send, "opentelemetry_instrumentation_requests_applied", 0)


# -- helpers ---------------------------------------------------------------------------------


def test_sanitize_url_keeps_only_what_is_asked():
    url = "https://u:p@auth.test:8443/token?service=reg&scope=a&scope=b&account=alice#frag"
    assert telemetry.sanitize_url(url, frozenset({"service", "scope"})) == (
        "https://auth.test:8443/token?service=reg&scope=a&scope=b"
    )
    signed = "https://s3.test/blob?X-Amz-Credential=AKIA&X-Amz-Signature=abc"
    assert telemetry.sanitize_url(signed) == "https://s3.test/blob"


@pytest.mark.parametrize(
    ("rule", "template"),
    [
        ("/docker/<filename>", "/docker/{filename}"),
        ("/ref/<path:reference>", "/ref/{reference}"),
        ("/registry-auth/<scheme>/<host>/docker/<filename>",
         "/registry-auth/{scheme}/{host}/docker/{filename}"),
    ],
)
def test_route_templates(rule, template):
    assert telemetry.route_template(rule) == template


def test_download_route_matches_the_flask_templates():
    assert telemetry.download_route("docker", False) == "/docker/{filename}"
    assert telemetry.download_route("registry", True) == "/registry/{scheme}/{host}/ref/{reference}"
    assert (
        telemetry.download_route("registry-auth", False)
        == "/registry-auth/{scheme}/{host}/docker/{filename}"
    )


@pytest.mark.rig  # starts a Python process: the full tier
def test_create_app_sets_tracing_up_once_outside_gunicorn(tmp_path):
    """With the endpoint set and no gunicorn, the app factory makes the global provider
    (OTLP over http/protobuf here) once, however many apps it makes."""
    script = f"""
import sys
sys.path.insert(0, {str(REPO_ROOT)!r})
from opentelemetry import trace
from passthrough import create_app
from passthrough.observe import telemetry
config = {{"ENV_FILE": "/nonexistent", "STORE": "off",
          "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",
          "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_SERVICE_NAME": "svc-x"}}
first = create_app(config)
provider = trace.get_tracer_provider()
second = create_app(config)
assert trace.get_tracer_provider() is provider
assert isinstance(provider, telemetry.SafeTracerProvider)
sdk = provider.inner
(processor,) = sdk._active_span_processor._span_processors
exporter = type(processor._batch_processor._exporter)
print(first._is_instrumented_by_opentelemetry, second._is_instrumented_by_opentelemetry,
      exporter.__module__, sdk.resource.attributes["service.name"])
telemetry.shutdown_tracing()
"""
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [
        "True",
        "True",
        "opentelemetry.exporter.otlp.proto.http.trace_exporter",
        "svc-x",
    ]


def test_the_otlp_protocol_picks_the_exporter():
    grpc_exporter = telemetry._otlp_exporter("grpc")
    http_exporter = telemetry._otlp_exporter("http/protobuf")
    try:
        assert type(grpc_exporter).__module__.endswith("proto.grpc.trace_exporter")
        assert type(http_exporter).__module__.endswith("proto.http.trace_exporter")
    finally:
        grpc_exporter.shutdown()
        http_exporter.shutdown()
