"""Issue 19's upstream faults with real parts: the rig's registry behind fronts that
answer 503/429, refuse connections (a closed port), never answer (a hung port), resolve
to nothing (`nonexistent.invalid`), present a certificate nobody trusts, or redirect blob
HEADs and GETs to a second host; and UPSTREAM_MAX_RATE measured on real transfers.

- containerd (`ctr`, as every Kubernetes node) resolves a tag with HEAD and GETs the
  manifest by digest; a later pull during an outage (503, or the registry stopped) is
  served from the store;
- a HEAD of an uncached blob behind a redirect to storage is 200 with the blob's size;
- every failure is one line naming its cause and the host, on the tar routes (plain
  text) and on /v2 (the spec's JSON);
- UPSTREAM_MAX_RATE=4M: a cold 16 MiB blob takes about 4 s, two at once share the cap, a
  warm read is at full speed, and a tar download's layers obey it too.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.e2e.helpers import download, fetch, one_line_error, running_server, unique
from tests.e2e.test_v2_clients import ctr_hosts_dir
from tests.support.docker_engine import DockerEngine
from tests.support.fronts import (
    UNRESOLVABLE_HOST,
    FaultFront,
    RedirectFront,
    RefusingPort,
    SilentPort,
    TlsFront,
)
from tests.support.helpers import wait_until
from tests.support.images import Image, big_layer, build_image, push_image, runnable_image
from tests.support.registry import RegistryServer
from tests.support.server import PassthroughServer

pytestmark = pytest.mark.rig

RATE = 4 << 20
BIG = 16 << 20


@pytest.fixture(scope="module")
def front(registry_anon: RegistryServer) -> Iterator[FaultFront]:
    with FaultFront(registry_anon) as front:
        yield front


@pytest.fixture(scope="module")
def doomed(registry_anon: RegistryServer) -> Iterator[FaultFront]:
    """A front a test stops: afterwards its port refuses connections."""
    with FaultFront(registry_anon) as front:
        yield front


@pytest.fixture(scope="module")
def redirect(registry_anon: RegistryServer) -> Iterator[RedirectFront]:
    with RedirectFront(registry_anon) as front:
        yield front


@pytest.fixture(scope="module")
def dead_ends(
    registry_anon: RegistryServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """Alias → URL of upstreams that cannot serve: refused, hung, unresolvable, bad TLS."""
    tls = TlsFront(registry_anon, tmp_path_factory.mktemp("tls-front"))
    with RefusingPort() as closed, SilentPort() as silent, tls:
        yield {
            "gone": closed.url,
            "hung": silent.url,
            "nowhere": f"http://{UNRESOLVABLE_HOST}:5000",
            "selfsigned": tls.url,
        }


@pytest.fixture(scope="module")
def proxy(
    tmp_path_factory: pytest.TempPathFactory,
    front: FaultFront,
    doomed: FaultFront,
    redirect: RedirectFront,
    dead_ends: dict[str, str],
) -> Iterator[PassthroughServer]:
    aliases = {"lab": front.url, "doomed": doomed.url, "redir": redirect.url, **dead_ends}
    env = {
        "REGISTRY_URL": front.url,
        "UPSTREAMS": ",".join(f"{alias}={url}" for alias, url in aliases.items()),
        "CACHE_DIR": str(tmp_path_factory.mktemp("faults-cache")),
        "UPSTREAM_RETRIES": "0",
        "UPSTREAM_CONNECT_TIMEOUT": "2",
        "UPSTREAM_READ_TIMEOUT": "2",
    }
    with running_server(tmp_path_factory, env) as server:
        yield server


# --- containerd: a tag resolved by HEAD, served stale ---------------------------------------


@contextlib.contextmanager
def namespace(engine: DockerEngine) -> Iterator[str]:
    """A containerd namespace of its own (so a pull fetches everything), emptied after."""
    name = f"faults-{secrets.token_hex(4)}"
    try:
        yield name
    finally:
        images = engine.ctr(name, "images", "ls", "-q", check=False).stdout.split()
        if images:
            engine.ctr(name, "images", "rm", "--sync", *images, check=False)
        engine.ctr(name, "namespaces", "rm", name, check=False)


def ctr_pull(engine: DockerEngine, hosts: Path, ref: str) -> None:
    with namespace(engine) as ns:
        engine.ctr(ns, "images", "pull", "--hosts-dir", str(hosts), "--snapshotter", "native", ref)
        check = engine.ctr(ns, "images", "check", "--snapshotter", "native")
        assert re.search(r"\bcomplete\b", check.stdout), check.stdout


@pytest.mark.parametrize("outage", ["503", "stopped"])
def test_a_tag_ctr_resolved_by_head_is_pulled_from_the_store_during_an_outage(
    outage: str,
    docker_engine: DockerEngine,
    front: FaultFront,
    doomed: FaultFront,
    proxy: PassthroughServer,
    tmp_path: Path,
) -> None:
    upstream = front if outage == "503" else doomed
    name = unique("head")
    image = runnable_image(f"faults-{secrets.token_hex(6)}")
    push_image(upstream.registry.url, name, "1.0", image)
    hosts = ctr_hosts_dir(tmp_path, upstream.host, proxy.url)
    ref = f"{upstream.host}/{name}:1.0"

    ctr_pull(engine=docker_engine, hosts=hosts, ref=ref)
    assert upstream.count_manifest("HEAD", name, "1.0") >= 1
    assert upstream.count_manifest("GET", name, "1.0") == 0, "containerd resolved by HEAD"

    if outage == "503":
        front.inject_manifest(name, "503", times=1000)
        front.inject(kind="503", times=1000)
    else:
        doomed.stop()
    before = stale_answers(proxy)
    try:
        ctr_pull(engine=docker_engine, hosts=hosts, ref=ref)
    finally:
        front.reset()
    assert stale_answers(proxy) > before, "the tag came from the store, marked stale"


def stale_answers(server: PassthroughServer) -> float:
    """Manifests /v2 answered stale so far (passthrough_v2_requests_total)."""
    text = requests.get(f"{server.url}/metrics", timeout=30).text
    pattern = re.compile(
        r'^passthrough_v2_requests_total\{[^}]*operation="manifest"[^}]*source="stale"'
        r"[^}]*\} (\S+)$",
        re.M,
    )
    return sum(float(value) for value in pattern.findall(text))


# --- HEAD of a blob behind a redirect ----------------------------------------------------------


def test_head_of_an_uncached_blob_behind_a_redirect_is_its_size(
    redirect: RedirectFront, proxy: PassthroughServer, tmp_path: Path
) -> None:
    name = unique("redir")
    # A layer of its own: never in the store, whatever ran before.
    layer = big_layer(tmp_path / "l.gz", 64 << 10, seed=secrets.randbits(32))
    push_image(redirect.registry.url, name, "1.0", build_image([layer]))
    url = f"{proxy.url}/v2/redir/{name}/blobs/{layer.digest}"
    redirect.reset()

    head = requests.head(url, timeout=30)
    assert head.status_code == 200, head.text
    assert head.headers["Content-Length"] == str(layer.size)
    # The storage host notes its answer's status once it has sent it: wait for the note.
    wait_until(
        lambda: all(r.status for r in redirect.blob_host.log), 10, "the storage host's note"
    )
    asked = [(r.method, r.has_authorization, r.status) for r in redirect.blob_host.log]
    assert asked == [("HEAD", False, 200)], asked

    # Storage presigned for GET alone refuses HEAD: one byte's Content-Range tells.
    redirect.blob_host.head_allowed = False
    head = requests.head(url, timeout=30)
    assert head.status_code == 200, head.text
    assert head.headers["Content-Length"] == str(layer.size)
    assert [r.method for r in redirect.blob_host.log[1:]] == ["HEAD", "GET"]
    assert redirect.blob_host.log[-1].range == "bytes=0-0"
    redirect.reset()


# --- one line naming cause and host ---------------------------------------------------------


def tar_url(proxy: PassthroughServer, upstream: str, name: str) -> str:
    scheme, _, host = upstream.partition("://")
    return f"{proxy.url}/registry/{scheme}/{host}/docker/{name.replace('/', '__')}_1.tar"


def expected_words(alias: str, upstream: str) -> tuple[int, str]:
    host = upstream.partition("://")[2]
    return {
        "gone": (502, f"cannot connect to {host}: connection refused (nothing listens on"),
        "hung": (504, f"{host} did not answer in 2 s (read timeout, UPSTREAM_READ_TIMEOUT)"),
        "nowhere": (502, f"cannot connect to {host}: DNS name not found"),
        "selfsigned": (502, f"certificate verify failed for https://{host} ("),
    }[alias]


@pytest.mark.parametrize("alias", ["gone", "hung", "nowhere", "selfsigned"])
def test_an_unreachable_upstream_is_one_line_naming_cause_and_host(
    alias: str, dead_ends: dict[str, str], proxy: PassthroughServer, tmp_path: Path
) -> None:
    upstream = dead_ends[alias]
    status, words = expected_words(alias, upstream)
    tar = one_line_error(fetch(tar_url(proxy, upstream, "team/app"), tmp_path / "t"), status)
    assert words in tar, tar
    v2 = requests.get(f"{proxy.url}/v2/{alias}/team/app/manifests/1", timeout=30)
    assert v2.status_code == status, v2.text
    (error,) = v2.json()["errors"]
    assert error["code"] == "UNAVAILABLE" and words in error["message"], error
    assert "\n" not in error["message"]


@pytest.mark.parametrize(
    ("kind", "status", "words"),
    [
        ("503", 503, "the registry answered 503 ({host})"),
        ("429", 429, "the registry is rate-limiting us ({host} answered 429, retry after 2 s)"),
    ],
)
def test_an_overloaded_upstream_is_one_line_naming_its_answer_and_host(
    kind: str,
    status: int,
    words: str,
    front: FaultFront,
    proxy: PassthroughServer,
    tmp_path: Path,
) -> None:
    name = unique("busy")
    front.inject_manifest(name, kind, times=10)  # type: ignore[arg-type]
    words = words.format(host=front.host)
    try:
        tar = one_line_error(fetch(f"{proxy.url}/docker/{name}_1.tar", tmp_path / "t"), status)
        v2 = requests.get(f"{proxy.url}/v2/lab/{name}/manifests/1", timeout=30)
    finally:
        front.reset()
    assert words in tar, tar
    assert v2.status_code == status, v2.text
    assert words in v2.json()["errors"][0]["message"], v2.text


# --- UPSTREAM_MAX_RATE -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_image(tmp_path_factory: pytest.TempPathFactory, registry_anon: RegistryServer) -> Image:
    """Three incompressible 16 MiB layers, pushed under a name of their own."""
    root = tmp_path_factory.mktemp("rate-layers")
    layers = [big_layer(root / f"{i}.gz", BIG, seed=1900 + i, name=f"d/{i}") for i in range(3)]
    image = build_image(layers)
    push_image(registry_anon.url, "faults/rate", "1", image)
    return image


@pytest.fixture(scope="module")
def capped(
    tmp_path_factory: pytest.TempPathFactory, registry_anon: RegistryServer
) -> Iterator[PassthroughServer]:
    """Two workers sharing UPSTREAM_MAX_RATE=4M."""
    env = {
        "REGISTRY_URL": registry_anon.url,
        "CACHE_DIR": str(tmp_path_factory.mktemp("rate-cache")),
        "UPSTREAM_MAX_RATE": "4M",
    }
    with running_server(tmp_path_factory, env, workers=2) as server:
        yield server


def timed_blob(server: PassthroughServer, digest: str, size: int) -> float:
    started = time.monotonic()
    got = requests.get(f"{server.url}/v2/faults/rate/blobs/{digest}", timeout=120)
    assert got.status_code == 200 and len(got.content) == size
    return time.monotonic() - started


def test_the_rate_cap_holds_for_one_and_for_two_fetches_and_never_for_a_hit(
    capped: PassthroughServer, big_image: Image
) -> None:
    first, second, third = big_image.layers
    alone = timed_blob(capped, first.digest, first.size)
    both: list[float] = []
    started = time.monotonic()
    threads = [
        threading.Thread(target=lambda b=b: both.append(timed_blob(capped, b.digest, b.size)))
        for b in (second, third)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    together = time.monotonic() - started
    warm = timed_blob(capped, first.digest, first.size)
    figures = {
        "cold 16 MiB alone (s)": round(alone, 2),
        "two cold 16 MiB at once (s)": round(together, 2),
        "sum of both (MiB/s)": round(2 * second.size / together / (1 << 20), 2),
        "warm 16 MiB (s)": round(warm, 2),
    }
    print("UPSTREAM_MAX_RATE=4M:", json.dumps(figures))
    assert len(both) == 2
    expected = first.size / RATE
    assert 0.85 * expected < alone < expected + 2.0, figures
    assert 0.85 * 2 * expected < together < 2 * expected + 3.0, figures
    assert warm < 1.5, figures


def test_a_tar_download_obeys_the_rate_cap(
    capped: PassthroughServer, registry_anon: RegistryServer, tmp_path: Path
) -> None:
    layer = big_layer(tmp_path / "layer.gz", 8 << 20, seed=1999)
    push_image(registry_anon.url, "faults/tar", "1", build_image([layer]))
    started = time.monotonic()
    download(f"{capped.url}/docker/faults__tar_1.tar", tmp_path / "x.tar")
    took = time.monotonic() - started
    print(f"UPSTREAM_MAX_RATE=4M: cold tar with an 8 MiB layer took {took:.2f} s")
    assert took > 0.85 * layer.size / RATE
