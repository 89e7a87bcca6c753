"""Issue 19's upstream faults without the rig: the words of each connection failure (a
real refused port and an unresolvable name; timeouts and 429/5xx simulated with
responses), a blob HEAD answered by a redirect to storage, a tag resolved by HEAD and
then served stale, UPSTREAM_MAX_RATE's parsing and its shared token buckets."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import responses

from passthrough import create_app
from passthrough.capacity import create_slot_file
from passthrough.config import ConfigError, load_settings
from passthrough.errors import (
    UpstreamInvalid,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
    UpstreamUnreachable,
)
from passthrough.upstream.auth import TokenCache
from passthrough.upstream.client import RegistryClient, RetryPolicy, Timeouts
from passthrough.upstream.failures import cannot_connect
from passthrough.upstream.rate import SharedBuckets, Throttle, UpstreamRates
from passthrough.upstream.target import AuthKind, Target, registry_from_url
from tests.support.fronts import UNRESOLVABLE_HOST, RefusingPort

REG = "http://reg.test:5000"
STORAGE = "http://storage.test:9000"
DIGEST = "sha256:" + "b" * 64


def client_for(url: str, **kw: Any) -> RegistryClient:
    parts = url.split("://", 1)
    target = Target(registry_from_url(parts[0], parts[1]), "environment", AuthKind.ANONYMOUS)
    return RegistryClient(
        target, "team/api", TokenCache(), Timeouts(2, 2), retry=RetryPolicy(attempts=0), **kw
    )


def failure(url: str) -> str:
    with pytest.raises(UpstreamUnreachable) as raised:
        client_for(url).request("GET", "/v2/", what="ping")
    return raised.value.message


# -- the words of each failure -----------------------------------------------------------


def test_a_refused_port_is_named_refused_with_its_host_and_port() -> None:
    with RefusingPort() as closed:
        message = failure(closed.url)
    assert message == (
        f"ping: cannot connect to 127.0.0.1:{closed.port}: connection refused "
        "(nothing listens on that port)"
    )


def test_a_name_that_does_not_resolve_is_named_dns() -> None:
    message = failure(f"http://{UNRESOLVABLE_HOST}:5000")
    assert message == (
        f"ping: cannot connect to {UNRESOLVABLE_HOST}:5000: DNS name not found "
        "(the host name does not resolve)"
    )


def test_an_unknown_cause_still_names_the_host() -> None:
    words = cannot_connect("https://reg.test/v2/", OSError("odd"))
    assert words == "cannot connect to reg.test:443"


@responses.activate
@pytest.mark.parametrize(
    ("exception", "words"),
    [
        (requests.ConnectTimeout(), "cannot connect to reg.test:5000: connect timeout (no answer "
                                    "in 2 s, UPSTREAM_CONNECT_TIMEOUT)"),
        (requests.ReadTimeout(), "reg.test:5000 did not answer in 2 s (read timeout, "
                                 "UPSTREAM_READ_TIMEOUT)"),
    ],
)  # fmt: skip
def test_timeouts_say_which_and_name_the_setting(exception: Exception, words: str) -> None:
    responses.get(f"{REG}/v2/", body=exception)
    with pytest.raises(UpstreamTimeout) as raised:
        client_for(REG).request("GET", "/v2/", what="ping")
    assert raised.value.message == f"ping: {words}"


@responses.activate
def test_429_and_5xx_name_the_host_that_answered() -> None:
    responses.get(f"{REG}/v2/a", status=429, headers={"Retry-After": "9"})
    responses.get(f"{REG}/v2/b", status=503)
    with pytest.raises(UpstreamRateLimited) as limited:
        client_for(REG).request("GET", "/v2/a", what="a")
    assert limited.value.message == (
        "a: the registry is rate-limiting us (reg.test:5000 answered 429, retry after 9 s)"
    )
    with pytest.raises(UpstreamUnavailable) as unavailable:
        client_for(REG).request("GET", "/v2/b", what="b")
    assert unavailable.value.message == "b: the registry answered 503 (reg.test:5000)"


# -- a blob HEAD redirected to storage ----------------------------------------------------


def blob_redirect() -> None:
    responses.head(
        f"{REG}/v2/team/api/blobs/{DIGEST}",
        status=307,
        headers={"Location": f"{STORAGE}/b?sig=1"},
    )


@responses.activate
def test_a_blob_head_follows_the_redirect_with_a_head_without_authorization() -> None:
    blob_redirect()
    responses.head(f"{STORAGE}/b?sig=1", headers={"Content-Length": "1234"})
    client = client_for(REG)
    client._authorization = "Bearer SECRET"
    assert client.blob_size(DIGEST, what="blob") == 1234
    assert "Authorization" not in responses.calls[-1].request.headers


@responses.activate
def test_storage_that_refuses_head_is_asked_for_one_byte() -> None:
    blob_redirect()
    responses.head(f"{STORAGE}/b?sig=1", status=403)
    responses.get(
        f"{STORAGE}/b?sig=1", status=206, body=b"x", headers={"Content-Range": "bytes 0-0/4321"}
    )
    assert client_for(REG).blob_size(DIGEST, what="blob") == 4321
    assert responses.calls[-1].request.headers["Range"] == "bytes=0-0"


@responses.activate
def test_no_size_anywhere_is_one_line_naming_it() -> None:
    blob_redirect()
    responses.head(f"{STORAGE}/b?sig=1", status=403)
    responses.get(f"{STORAGE}/b?sig=1", status=403)
    with pytest.raises(UpstreamInvalid, match="neither the registry nor the storage"):
        client_for(REG).blob_size(DIGEST, what="blob")


# -- /v2: a tag resolved by HEAD ------------------------------------------------------------

MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest"
                       ".v1+json", "config": {}, "layers": []}).encode()  # fmt: skip
MANIFEST_DIGEST = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()


@responses.activate
def test_a_tag_resolved_by_head_is_served_stale_after_its_digest_was_fetched(
    tmp_path: Path,
) -> None:
    """containerd's way: HEAD the tag, GET the manifest by digest; then an outage."""
    env = {"REGISTRY_URL": REG, "CACHE_DIR": str(tmp_path / "cache"), "UPSTREAM_RETRIES": "0"}
    app = create_app({"SETTINGS": load_settings(env, env_file=str(tmp_path / "none.env"))})
    headers = {
        "Docker-Content-Digest": MANIFEST_DIGEST,
        "Content-Type": "application/vnd.oci.image.manifest.v1+json",
        "Content-Length": str(len(MANIFEST)),
    }
    responses.head(f"{REG}/v2/acc/app/manifests/1", headers=headers)
    responses.get(f"{REG}/v2/acc/app/manifests/{MANIFEST_DIGEST}", body=MANIFEST, headers=headers)
    client = app.test_client()
    assert client.head("/v2/acc/app/manifests/1").status_code == 200
    assert client.get(f"/v2/acc/app/manifests/{MANIFEST_DIGEST}").data == MANIFEST
    asked = [(c.request.method, str(c.request.url)) for c in responses.calls]
    assert ("GET", f"{REG}/v2/acc/app/manifests/1") not in asked, asked

    responses.replace(responses.HEAD, f"{REG}/v2/acc/app/manifests/1", status=503)
    for method in ("HEAD", "GET"):
        stale = client.open("/v2/acc/app/manifests/1", method=method)
        assert stale.status_code == 200, stale.data
        assert stale.headers["Docker-Content-Digest"] == MANIFEST_DIGEST
        assert stale.headers["Warning"].startswith('110 passthrough "Response is stale')


# -- UPSTREAM_MAX_RATE: settings --------------------------------------------------------------


def settings_of(tmp_path: Path, **env: str) -> Any:
    return load_settings(env, env_file=str(tmp_path / "none.env"))


def test_rates_parse_the_pod_cap_and_alias_caps(tmp_path: Path) -> None:
    settings = settings_of(
        tmp_path, UPSTREAM_MAX_RATE="10M, lab=2M ,default=512K", UPSTREAMS="lab=http://lab:5000"
    )
    caps = settings.upstream_max_rate
    assert caps.pod == 10 << 20
    assert caps.per_alias == (("lab", 2 << 20), ("default", 512 << 10))
    assert not settings_of(tmp_path).upstream_max_rate


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("fast", "must be a size"),
        ("lab=2M", "'lab' is not an UPSTREAMS alias"),
        ("10M,Bad Alias=1M", "is not an alias given once"),
    ],
)
def test_a_bad_rate_stops_start_up_naming_it(tmp_path: Path, value: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        settings_of(tmp_path, UPSTREAM_MAX_RATE=value)


def test_an_alias_cap_applies_to_its_registry_only(tmp_path: Path) -> None:
    rates = UpstreamRates(str(tmp_path / "pod"), 0, [("http://lab:5000", 1000)])
    assert rates.for_upstream("http://other:5000") is None
    throttle = rates.for_upstream("http://lab:5000/")
    assert throttle is not None and throttle.caps == ((1, 1000),)


# -- UPSTREAM_MAX_RATE: the shared buckets --------------------------------------------------


@pytest.fixture
def pod_file() -> Any:
    path = create_slot_file()
    yield path
    Path(path).unlink()


def test_reservations_queue_on_one_clock_across_descriptors(pod_file: str) -> None:
    """Two SharedBuckets on one file stand for two workers: their reservations add up."""
    first, second = SharedBuckets(pod_file), SharedBuckets(pod_file)
    waits = [first.reserve(0, 1.0), second.reserve(0, 1.0), first.reserve(0, 1.0)]
    assert [round(w, 1) for w in waits] == [0.9, 1.9, 2.9]
    assert first.reserve(1, 1.0) == pytest.approx(0.9, abs=0.05), "bucket 1 is its own"


def test_an_idle_bucket_does_not_save_up_more_than_the_burst(pod_file: str) -> None:
    buckets = SharedBuckets(pod_file)
    buckets.reserve(0, 0.01)
    time.sleep(0.3)
    assert buckets.reserve(0, 0.5) == pytest.approx(0.4, abs=0.05)


def test_the_slowest_cap_decides_the_pause(pod_file: str) -> None:
    sleeps: list[float] = []
    throttle = Throttle(SharedBuckets(pod_file), ((0, 1000), (1, 100)), sleep=sleeps.append)
    throttle.take(100)
    assert sleeps == [pytest.approx(0.9, abs=0.05)]
    assert throttle.piece == 16 << 10


class FakeRaw:
    """What Throttle.wrap needs of a urllib3 response: read and read_chunked."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.asked: list[int | None] = []

    def read(self, amt: int | None = None, **_: Any) -> bytes:
        self.asked.append(amt)
        data, self.body = self.body[: amt or None], self.body[amt or len(self.body) :]
        return data

    def read_chunked(self, amt: int | None = None, **_: Any) -> Any:
        while self.body:
            yield self.read(amt)


def test_a_wrapped_body_is_read_in_pieces_each_accounted(pod_file: str) -> None:
    taken: list[int] = []
    throttle = Throttle(SharedBuckets(pod_file), ((0, 400 << 10),))
    object.__setattr__(throttle, "take", taken.append)
    raw = FakeRaw(b"x" * 100_000)
    throttle.wrap(raw)
    assert raw.read(1 << 20) == b"x" * 40960 and raw.read() == b"x" * 59040
    assert taken == [40960, 40960, 18080, 0]
    chunked = FakeRaw(b"y" * 50_000)
    throttle.wrap(chunked)
    assert b"".join(chunked.read_chunked(1 << 20)) == b"y" * 50_000


def test_concurrent_readers_share_the_rate(pod_file: str) -> None:
    """Two threads taking 100 KiB each at 400 KiB/s: about half a second together."""
    throttle = Throttle(SharedBuckets(pod_file), ((0, 400 << 10),))

    def reader() -> None:
        for _ in range(10):
            throttle.take(10 << 10)

    started = time.monotonic()
    threads = [threading.Thread(target=reader) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert 0.35 < time.monotonic() - started < 0.8
