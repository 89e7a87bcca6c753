"""Observability end to end, under real gunicorn against the rig's registries:

- the spans of a real download travel over OTLP/gRPC to a real receiver this test runs
  (grpcio with opentelemetry-proto's TraceService), flushed by worker_exit on SIGTERM,
  as one trace with the documented tree — and no secret in any of them;
- the JSON logs (the service's and gunicorn's) hold the download line and no secret;
- /metrics adds up the downloads of two worker processes.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import requests
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families

from tests.support.helpers import wait_until
from tests.support.images import File as TarFile
from tests.support.images import Image, build_image, make_layer, push_image, tar_layer
from tests.support.procs import LOOPBACK
from tests.support.registry import ALICE, PUSHER, RegistryServer
from tests.support.server import PassthroughServer

ServerFactory = Callable[..., PassthroughServer]
ROUTE = "GET /docker/{filename}"


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver on 127.0.0.1: keeps every ExportTraceServiceRequest."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port(f"{LOOPBACK}:0")

    def Export(self, request: Any, context: Any) -> Any:  # the gRPC method's name
        with self.lock:
            self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def spans(self) -> list[tuple[dict[str, Any], trace_pb2.Span]]:
        """Every span received, with its resource's attributes."""
        found: list[tuple[dict[str, Any], trace_pb2.Span]] = []
        with self.lock:
            for request in self.requests:
                for resource_spans in request.resource_spans:
                    resource = attributes_of(resource_spans.resource.attributes)
                    for scope_spans in resource_spans.scope_spans:
                        found.extend((resource, span) for span in scope_spans.spans)
        return found

    def raw(self) -> bytes:
        with self.lock:
            return b"".join(r.SerializeToString() for r in self.requests)


def attributes_of(pairs: Any) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for pair in pairs:
        kind = pair.value.WhichOneof("value")
        values[pair.key] = getattr(pair.value, kind) if kind else None
    return values


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiving = Receiver()
    receiving.server.start()
    try:
        yield receiving
    finally:
        receiving.server.stop(grace=None)


def small_image(marker: str) -> Image:
    layers = [
        make_layer(tar_layer([TarFile(f"etc/{marker}-{n}.txt", f"{marker} {n}\n".encode() * 200)]))
        for n in range(2)
    ]
    return build_image(layers)


def push(registry: RegistryServer, prefix: str, image: Image) -> str:
    """Push under a fresh repository; returns its /docker/ filename."""
    name = f"{prefix}/obs{secrets.token_hex(4)}"
    push_image(registry.url, name, "v1", image, auth=(PUSHER.username, PUSHER.password))
    return f"{name.replace('/', '_')}_v1.tar"


# -- traces ----------------------------------------------------------------------------------


def test_a_download_is_one_trace_at_the_otlp_receiver(
    passthrough_server: ServerFactory, registry_token: RegistryServer, receiver: Receiver
) -> None:
    image = small_image("traced")
    filename = push(registry_token, "private", image)
    server = passthrough_server(
        {
            "REGISTRY_URL": registry_token.url,
            "REGISTRY_USERNAME": ALICE.username,
            "REGISTRY_PASSWORD": ALICE.password,
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "200",
            "OTEL_SERVICE_NAME": "passthrough-e2e",
            "LOG_FORMAT": "json",
        }
    )
    response = requests.get(f"{server.url}/docker/{filename}", timeout=60)
    assert response.status_code == 200, response.text[:300]
    assert response.headers["Docker-Content-Digest"] == image.digest
    # SIGTERM: the worker finishes, worker_exit flushes the batch, the master exits.
    assert server.stop() == 0
    wait_until(lambda: any(s.name == "stream_archive" for _, s in receiver.spans()), 10, "spans")

    received = receiver.spans()
    resource = received[0][0]
    assert resource["service.name"] == "passthrough-e2e"
    routes = [s for _, s in received if s.name == ROUTE]
    assert len(routes) == 1, [s.name for _, s in received]
    route = routes[0]
    assert route.kind == trace_pb2.Span.SPAN_KIND_SERVER and not route.parent_span_id
    trace_spans = [s for _, s in received if s.trace_id == route.trace_id]
    by_id = {s.span_id: s for s in trace_spans}

    def parent_of(name: str) -> str:
        (span,) = [s for s in trace_spans if s.name == name]
        return by_id[span.parent_span_id].name

    assert parent_of("parse_image_request") == ROUTE
    assert parent_of("extract_registry_client_credentials") == ROUTE
    assert parent_of("resolve_manifest") == ROUTE
    assert parent_of("GET {registry_token_endpoint}") == "resolve_manifest"
    assert parent_of("fetch_config_blob") == "resolve_manifest"
    assert parent_of("download_layer_1") == ROUTE
    assert parent_of("download_layer_2") == ROUTE
    assert parent_of("stream_archive") == ROUTE
    assert parent_of("write_layer_tar_1") == "stream_archive"
    assert parent_of("write_layer_tar_2") == "stream_archive"
    layer_gets = [
        by_id[s.parent_span_id].name
        for s in trace_spans
        if s.name == "GET /v2/{repository}/blobs/{digest}"
    ]
    assert sorted(layer_gets) == ["download_layer_1", "download_layer_2", "fetch_config_blob"]
    manifests = [s for s in trace_spans if s.name == "GET /v2/{repository}/manifests/{reference}"]
    assert manifests and all(s.kind == trace_pb2.Span.SPAN_KIND_CLIENT for s in manifests)

    attrs = attributes_of(route.attributes)
    assert attrs["http.route"] == "/docker/{filename}"
    assert attrs["http.response.status_code"] == 200
    assert attrs["oci.manifest.digest"] == image.digest
    assert attrs["container.image.id"] == image.config_digest
    assert attrs["registry.auth.type"] == "credentials"
    stream = attributes_of(next(s for s in trace_spans if s.name == "stream_archive").attributes)
    assert stream["http.response.body.size"] == len(response.content)
    assert stream["passthrough.download.outcome"] == "completed"
    token = next(s for s in trace_spans if s.name == "GET {registry_token_endpoint}")
    assert "account=" not in attributes_of(token.attributes)["url.full"]

    # Nothing secret anywhere in what was exported, nor in the logs.
    raw = receiver.raw()
    assert ALICE.password.encode() not in raw
    assert b"Basic " not in raw and b"Bearer " not in raw
    log = server.log_text()
    assert ALICE.password not in log
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    (download,) = [line for line in lines if line["message"].startswith("download image=")]
    assert download["outcome"] == "completed" and download["bytes"] == len(response.content)
    assert download["digest"] == image.digest
    assert download["trace_id"] == route.trace_id.hex()
    access = [line for line in lines if line["logger"] == "gunicorn.access"]
    assert any(line["status"] == 200 and filename in line["request"] for line in access)


# -- metrics ---------------------------------------------------------------------------------


def samples_of(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def downloads_by_pid(directory: Path) -> dict[int, float]:
    """Each worker's own count of completed downloads, read from its counter file."""
    counts: dict[int, float] = {}
    for path in directory.glob("counter_*.db"):
        pid = int(path.stem.split("_")[1])
        for key, value, *_ in MmapedDict.read_all_values_from_file(str(path)):
            metric, _, labels, _ = json.loads(key)
            if metric == "passthrough_downloads" and labels.get("outcome") == "completed":
                counts[pid] = counts.get(pid, 0) + value
    return counts


def test_metrics_add_up_both_workers(
    passthrough_server: ServerFactory, registry_anon: RegistryServer, tmp_path: Path
) -> None:
    filename = push(registry_anon, "metrics", small_image("counted"))
    directory = tmp_path / "prometheus"
    directory.mkdir()
    (directory / "counter_99999.db").write_bytes(b"left by a previous run")
    server = passthrough_server(
        {"REGISTRY_URL": registry_anon.url, "PROMETHEUS_MULTIPROC_DIR": str(directory)},
        workers=2,
    )
    assert not (directory / "counter_99999.db").exists(), "wiped at master start"

    sizes: list[int] = []
    lock = threading.Lock()

    def fetch_one() -> None:
        body = requests.get(f"{server.url}/docker/{filename}", timeout=60).content
        with lock:
            sizes.append(len(body))

    for _ in range(20):  # concurrent rounds until both workers have served a download
        threads = [threading.Thread(target=fetch_one) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        if len(downloads_by_pid(directory)) >= 2:
            break
    per_worker = downloads_by_pid(directory)
    assert len(per_worker) == 2 and all(per_worker.values()), per_worker
    assert sum(per_worker.values()) == len(sizes)

    completed = frozenset({("route", "/docker/{filename}"), ("outcome", "completed")})
    for _ in range(4):  # whichever worker answers the scrape, it sums them all
        samples = samples_of(requests.get(f"{server.url}/metrics", timeout=10).text)
        assert samples[("passthrough_downloads_total", completed)] == len(sizes)
        route = frozenset({("route", "/docker/{filename}")})
        assert samples[("passthrough_download_sent_bytes_total", route)] == sum(sizes)
        assert samples[("passthrough_downloads_in_flight", frozenset())] == 0
        blob_gets = frozenset({("operation", "blob"), ("method", "GET"), ("status", "200")})
        assert samples[("passthrough_upstream_requests_total", blob_gets)] >= 3

    server.stop()
    assert not list(directory.glob("gauge_livesum_*.db")), "dead workers are marked"
