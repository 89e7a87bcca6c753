"""The decisions of stale serving and offline mode (passthrough/export/stale.py,
passthrough/upstream/offline.py): who may be answered from the store, which upstream
is offline, and the app's answers when the registry is gone (responses: a registry
that is down or was never there)."""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import responses
from flask import Flask

from passthrough import create_app
from passthrough.config import ConfigError, load_settings
from passthrough.export.stale import may_serve_stored, quick, stale_warning
from passthrough.oci.endpoint import RegistryEndpoint
from passthrough.upstream.auth import TokenCache
from passthrough.upstream.client import RegistryClient, RetryPolicy, Timeouts
from passthrough.upstream.offline import offline_reason
from passthrough.upstream.target import AuthKind, Target
from tests.support.helpers import digest
from tests.unit.test_app import REG, FakeImage, tar_of

DIGEST = "sha256:" + "a" * 64
LAB = RegistryEndpoint("http://10.1.2.3:5000", "10.1.2.3:5000")
HUB = RegistryEndpoint("https://registry-1.docker.io", "docker.io")


def settings(**env: str):
    return load_settings({"ENV_FILE": "/nonexistent", "REGISTRY_URL": REG, **env})


@pytest.mark.parametrize(
    ("access", "record", "allowed"),
    [
        ("anonymous", {"digest": DIGEST, "access": "anonymous"}, True),
        ("environment", {"digest": DIGEST, "access": "environment"}, True),
        ("environment", {"digest": DIGEST, "access": "anonymous"}, False),
        ("anonymous", {"digest": DIGEST, "access": "environment"}, False),
        ("client", {"digest": DIGEST, "access": "client"}, False),
        ("anonymous", {"digest": "sha256:short", "access": "anonymous"}, False),
        ("anonymous", None, False),
    ],
)
def test_only_the_class_that_read_it_upstream_is_served_from_the_store(
    access: str, record: dict[str, str] | None, allowed: bool
) -> None:
    assert may_serve_stored(access, record) is allowed


def test_the_warning_is_rfc_9111s_110_on_one_line() -> None:
    warning = stale_warning('manifest of a/b: the registry answered 503\n "x"')
    assert warning == (
        "110 passthrough \"Response is stale: manifest of a/b: the registry answered 503 'x'\""
    )


@pytest.mark.parametrize(
    ("env", "endpoint", "reason"),
    [
        ({}, LAB, None),
        ({"OFFLINE": "true"}, LAB, "OFFLINE=true"),
        ({"OFFLINE_UPSTREAMS": "lab"}, LAB, "OFFLINE_UPSTREAMS names lab"),
        ({"OFFLINE_UPSTREAMS": "10.1.2.3:5000"}, LAB, "OFFLINE_UPSTREAMS names 10.1.2.3:5000"),
        ({"OFFLINE_UPSTREAMS": "hub"}, LAB, None),
        ({"OFFLINE_UPSTREAMS": "docker.io"}, HUB, "OFFLINE_UPSTREAMS names docker.io"),
        ({"OFFLINE_UPSTREAMS": "default"}, LAB, None),
    ],
)
def test_which_upstream_is_offline(
    env: dict[str, str], endpoint: RegistryEndpoint, reason: str | None
) -> None:
    configured = settings(UPSTREAMS=f"lab={LAB.url},hub={HUB.url}", **env)
    assert offline_reason(configured, endpoint) == reason


def test_default_names_registry_url() -> None:
    configured = settings(OFFLINE_UPSTREAMS="default")
    assert offline_reason(configured, configured.registry) == "OFFLINE_UPSTREAMS names default"


def test_an_offline_upstreams_entry_that_names_nothing_is_refused() -> None:
    with pytest.raises(ConfigError, match="OFFLINE_UPSTREAMS"):
        settings(OFFLINE_UPSTREAMS="lab,http://x/")


def test_the_quick_try_gives_the_client_its_timeouts_and_retries_back() -> None:
    target = Target(LAB, "environment", AuthKind.ANONYMOUS)
    retry = RetryPolicy(attempts=4)
    client = RegistryClient(target, "team/app", TokenCache(), Timeouts(10, 60), retry=retry)
    with quick(client, 0.5):
        assert (client.timeouts.connect, client.timeouts.read, client.retry.attempts) == (
            0.5,
            0.5,
            0,
        )
    assert (client.timeouts.connect, client.timeouts.read, client.retry.attempts) == (10, 60, 4)
    client.close()


# -- the app, with a registry that goes away -----------------------------------------------


def image() -> FakeImage:
    return FakeImage("team/api", "v1", [tar_of("a.bin", b"a" * 5000), tar_of("b.bin", b"b" * 9)])


def app_with(tmp_path: Path, **env: str) -> Flask:
    cache = tmp_path / "cache"
    cache.mkdir(exist_ok=True)
    config = {
        "REGISTRY_URL": REG,
        "ENV_FILE": "/nonexistent",
        "TEMP_DIR": str(tmp_path),
        "CACHE_DIR": str(cache),
        **env,
    }
    return create_app(config)


def warm(app: Flask, fake: FakeImage) -> tuple[bytes, bytes]:
    """The tag and the pinned digest downloaded once, with the registry up."""
    client = app.test_client()
    with responses.RequestsMock(assert_all_requests_are_fired=False) as up:
        fake.register(up)
        pinned = f"{REG}/v2/{fake.repository}/manifests/{digest(fake.manifest)}"
        up.add(responses.HEAD, pinned, headers={"Docker-Content-Digest": digest(fake.manifest)})
        tag = client.get("/docker/team__api_v1.tar")
        tag_body = tag.data  # read while the registry is up: layers are fetched as sent
        by_digest = client.get(f"/ref/team/api@{digest(fake.manifest)}.tar")
        pinned_body = by_digest.data
    assert tag.status_code == by_digest.status_code == 200
    assert "Warning" not in tag.headers
    return tag_body, pinned_body


def test_a_failing_registry_gets_one_quick_try_then_the_stored_tag(tmp_path: Path) -> None:
    fake = image()
    app = app_with(tmp_path)
    full, _ = warm(app, fake)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as down:
        head = down.add(responses.HEAD, f"{REG}/v2/team/api/manifests/v1", status=503)
        started = time.monotonic()
        stale = app.test_client().get("/docker/team__api_v1.tar")
        seconds = time.monotonic() - started
        assert head.call_count == 1, "one try, no retries"
    assert stale.status_code == 200 and stale.data == full
    assert "the registry answered 503" in stale.headers["Warning"]
    assert seconds < 1.0


def test_a_pinned_digest_is_served_without_asking_the_registry(tmp_path: Path) -> None:
    fake = image()
    app = app_with(tmp_path)
    _, pinned = warm(app, fake)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as nothing:
        again = app.test_client().get(f"/ref/team/api@{digest(fake.manifest)}.tar")
        assert len(nothing.calls) == 0
    assert again.status_code == 200 and again.data == pinned
    assert "Warning" not in again.headers


def test_serve_stale_false_confirms_everything_upstream(tmp_path: Path) -> None:
    fake = image()
    app = app_with(tmp_path, SERVE_STALE="false", UPSTREAM_RETRIES="0")
    warm(app, fake)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as down:
        down.add(responses.HEAD, f"{REG}/v2/team/api/manifests/v1", status=503)
        refused = app.test_client().get("/docker/team__api_v1.tar")
    assert refused.status_code == 503


def test_client_credentials_are_not_served_stale(tmp_path: Path) -> None:
    fake = image()
    app = app_with(tmp_path, UPSTREAM_RETRIES="0")
    warm(app, fake)
    auth = "Basic " + base64.b64encode(b"alice:secret").decode()
    with responses.RequestsMock(assert_all_requests_are_fired=False) as down:
        url = f"{REG}/v2/team/api/manifests/v1"
        down.add(responses.HEAD, url, body=requests.ConnectionError())
        refused = app.test_client().get("/docker/team__api_v1.tar", headers={"Authorization": auth})
    assert refused.status_code == 502 and b"secret" not in refused.data


def error_of(response: Any) -> dict[str, str]:
    """The first error of a /v2 JSON answer."""
    return dict(response.get_json()["errors"][0])


def test_offline_mode_answers_from_the_store_and_names_itself(tmp_path: Path) -> None:
    fake = image()
    full, _ = warm(app_with(tmp_path), fake)
    offline = app_with(tmp_path, OFFLINE="true").test_client()
    with responses.RequestsMock(assert_all_requests_are_fired=False) as nothing:
        served = offline.get("/docker/team__api_v1.tar")
        missing = offline.get("/docker/team__api_v2.tar")
        v2_missing = offline.get("/v2/team/api/manifests/v2")
        v2_blob = offline.get(f"/v2/team/api/blobs/{DIGEST}")
        tags = offline.get("/v2/team/api/tags/list")
        described = offline.get("/describe/docker/team__api_v1.tar")
        assert len(nothing.calls) == 0
    assert served.status_code == 200 and served.data == full
    assert "offline mode (OFFLINE=true)" in served.headers["Warning"]
    assert missing.status_code == 404 and b"offline mode" in missing.data
    assert v2_missing.status_code == 404
    assert error_of(v2_missing)["code"] == "MANIFEST_UNKNOWN"
    assert v2_blob.status_code == 404 and error_of(v2_blob)["code"] == "BLOB_UNKNOWN"
    assert tags.status_code == 503 and "offline mode" in error_of(tags)["message"]
    assert described.status_code == 503 and b"offline mode" in described.data


def test_offline_mode_refuses_client_credentials(tmp_path: Path) -> None:
    fake = image()
    warm(app_with(tmp_path), fake)
    offline = app_with(tmp_path, OFFLINE="true").test_client()
    auth = "Basic " + base64.b64encode(b"alice:secret").decode()
    refused = offline.get("/docker/team__api_v1.tar", headers={"Authorization": auth})
    assert refused.status_code == 503 and b"client credentials" in refused.data


def test_ready_does_not_probe_an_offline_upstream(tmp_path: Path) -> None:
    app = app_with(tmp_path, UPSTREAMS="lab=http://10.1.2.3:5000", OFFLINE_UPSTREAMS="lab")
    with responses.RequestsMock(assert_all_requests_are_fired=False) as registry:
        registry.add(responses.GET, f"{REG}/v2/", json={})
        ready = app.test_client().get("/ready")
        assert [c.request.url for c in registry.calls] == [f"{REG}/v2/"]
    assert ready.status_code == 200
    report = ready.get_json()
    assert report["offline"] == ["lab"]
    by_name = {u["name"]: u for u in report["upstreams"]}
    assert by_name["lab"]["offline"] is True and "never contacted" in by_name["lab"]["detail"]
    assert "offline" not in by_name["default"]
