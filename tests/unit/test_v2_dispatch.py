"""The /v2 dispatch step: every /v2 request, hosted or proxied, answered or refused, is
counted exactly once in passthrough_v2_requests_total (operation, source, status); a
write to a proxied name is the one refusal; a 405 says what the route takes."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import responses
from flask.testing import FlaskClient

from passthrough import create_app
from passthrough.config import load_settings
from passthrough.errors import Denied
from passthrough.registry.proxy import Proxy
from passthrough.registry.repository import ProxiedRepository
from passthrough.registry.routing import route_name
from tests.support.helpers import digest as digest_of
from tests.unit.test_hosted_app import MANIFEST_TYPE, push_image

REG = "http://reg.test:5000"
SUBJECT = "sha256:" + "b" * 64
CONFIG = b'{"marker": "x"}'
LAYER = b"layer-x"

Key = tuple[str, str, str]


@dataclass
class Hosted:
    """What every case starts from: an image pushed to team/app and an open upload."""

    client: FlaskClient
    manifest: bytes
    upload: str


@pytest.fixture
def hosted(tmp_path: Path) -> Hosted:
    env = {"CACHE_DIR": str(tmp_path / "cache"), "REGISTRY_URL": REG, "UPSTREAM_RETRIES": "0"}
    settings = load_settings(env, env_file="/nonexistent")
    settings = replace(settings, hosted_repositories=("team/*",))
    client = create_app({"SETTINGS": settings}).test_client()
    manifest = push_image(client, "team/app", "1.0")
    upload = client.post("/v2/team/app/blobs/uploads/").headers["Location"]
    return Hosted(client, manifest, upload)


def v2_counts(client: FlaskClient) -> Counter[Key]:
    counts: Counter[Key] = Counter()
    for line in client.get("/metrics").data.decode().splitlines():
        if line.startswith("passthrough_v2_requests_total{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
            key = (labels["operation"], labels["source"], labels["status"])
            counts[key] += int(float(line.rpartition(" ")[2]))
    return counts


def _proxied(client: FlaskClient, path: str) -> Any:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mocked:
        mocked.get(f"{REG}/v2/acc/plain/tags/list", json={"name": "acc/plain", "tags": ["1"]})
        mocked.get(f"{REG}/v2/acc/plain/referrers/{SUBJECT}", json={"manifests": []})
        mocked.head(f"{REG}/v2/acc/plain/manifests/1", status=404)
        return client.get(path)


Request = Callable[[Hosted], Any]
BLOB = f"/v2/team/app/blobs/{digest_of(LAYER)}"
CASES: list[tuple[str, Request, Key]] = [
    ("base", lambda h: h.client.get("/v2/"), ("base", "local", "200")),
    ("catalog", lambda h: h.client.get("/v2/_catalog"), ("catalog", "hosted", "200")),
    ("token", lambda h: h.client.get("/v2/token"), ("token", "local", "200")),
    (
        "manifest GET",
        lambda h: h.client.get("/v2/team/app/manifests/1.0"),
        ("manifest", "hosted", "200"),
    ),
    (
        "manifest HEAD",
        lambda h: h.client.head(f"/v2/team/app/manifests/{digest_of(h.manifest)}"),
        ("manifest", "hosted", "200"),
    ),
    (
        "manifest PUT",
        lambda h: h.client.put(
            "/v2/team/app/manifests/2.0",
            data=h.manifest,
            headers={"Content-Type": MANIFEST_TYPE},
        ),
        ("manifest_push", "hosted", "201"),
    ),
    (
        "manifest DELETE",
        lambda h: h.client.delete("/v2/team/app/manifests/1.0"),
        ("manifest_delete", "hosted", "202"),
    ),
    ("blob GET", lambda h: h.client.get(BLOB), ("blob", "hosted", "200")),
    ("blob HEAD", lambda h: h.client.head(BLOB), ("blob", "hosted", "200")),
    (
        "blob Range",
        lambda h: h.client.get(BLOB, headers={"Range": "bytes=1-2"}),
        ("blob", "hosted", "206"),
    ),
    (
        "blob Range past the end",
        lambda h: h.client.get(BLOB, headers={"Range": "bytes=99-"}),
        ("blob", "hosted", "416"),
    ),
    ("blob DELETE", lambda h: h.client.delete(BLOB), ("blob_delete", "hosted", "202")),
    (
        "upload POST",
        lambda h: h.client.post("/v2/team/app/blobs/uploads/"),
        ("upload_start", "hosted", "202"),
    ),
    (
        "upload POST ?digest=",
        lambda h: h.client.post(f"/v2/team/app/blobs/uploads/?digest={digest_of(b'y')}", data=b"y"),
        ("blob_push", "hosted", "201"),
    ),
    (
        "upload POST ?mount=",
        lambda h: h.client.post(
            f"/v2/team/other/blobs/uploads/?mount={digest_of(LAYER)}&from=team/app"
        ),
        ("blob_mount", "hosted", "201"),
    ),
    ("upload GET", lambda h: h.client.get(h.upload), ("upload_status", "hosted", "204")),
    (
        "upload PATCH",
        lambda h: h.client.patch(h.upload, data=b"z"),
        ("blob_chunk", "hosted", "202"),
    ),
    (
        "upload PUT",
        lambda h: h.client.put(f"{h.upload}?digest={digest_of(b'z')}", data=b"z"),
        ("blob_push", "hosted", "201"),
    ),
    ("upload DELETE", lambda h: h.client.delete(h.upload), ("upload_cancel", "hosted", "204")),
    ("hosted tags", lambda h: h.client.get("/v2/team/app/tags/list"), ("tags", "hosted", "200")),
    (
        "hosted referrers",
        lambda h: h.client.get(f"/v2/team/app/referrers/{SUBJECT}"),
        ("referrers", "hosted", "200"),
    ),
    (
        "proxied tags",
        lambda h: _proxied(h.client, "/v2/acc/plain/tags/list"),
        ("tags", "upstream", "200"),
    ),
    (
        "proxied referrers",
        lambda h: _proxied(h.client, f"/v2/acc/plain/referrers/{SUBJECT}"),
        ("referrers", "upstream", "200"),
    ),
    (
        "proxied manifest, unknown upstream",
        lambda h: _proxied(h.client, "/v2/acc/plain/manifests/1"),
        ("manifest", "error", "404"),
    ),
    (
        "invalid name",
        lambda h: h.client.get("/v2/Bad/manifests/1"),
        ("manifest", "error", "400"),
    ),
    (
        "push to a proxied name",
        lambda h: h.client.put("/v2/acc/plain/manifests/1", data=h.manifest),
        ("manifest_push", "error", "403"),
    ),
    (
        "unknown blob",
        lambda h: h.client.get(f"/v2/team/app/blobs/{SUBJECT}"),
        ("blob", "error", "404"),
    ),
    (
        "failed monolithic push",
        lambda h: h.client.post(f"/v2/team/app/blobs/uploads/?digest={SUBJECT}", data=b"no"),
        ("blob_push", "error", "400"),
    ),
    (
        "no such endpoint",
        lambda h: h.client.get("/v2/team/app/nothing"),
        ("unknown", "error", "404"),
    ),
    (
        "method not allowed",
        lambda h: h.client.post("/v2/team/app/manifests/1.0"),
        ("unknown", "error", "405"),
    ),
]


@pytest.mark.parametrize(("request_", "key"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_every_v2_request_is_counted_once(hosted: Hosted, request_: Request, key: Key) -> None:
    before = v2_counts(hosted.client)
    response = request_(hosted)
    assert str(response.status_code) == key[2], response.data
    after = v2_counts(hosted.client)
    assert after[key] - before[key] == 1, after - before
    assert sum(after.values()) - sum(before.values()) == 1, after - before


def test_a_405_names_the_methods_the_route_takes(hosted: Hosted) -> None:
    response = hosted.client.post("/v2/team/app/manifests/1.0")
    assert response.status_code == 405
    error = json.loads(response.data)["errors"][0]
    assert error["code"] == "UNSUPPORTED"
    allowed = "GET, HEAD, PUT, DELETE, OPTIONS"
    assert error["message"] == f"method not allowed: this route takes {allowed}"
    assert response.headers["Allow"] == allowed


WHERE_PUSHES_GO = '"acc/plain" is not a hosted repository; pushes go to: team/*'


def test_a_write_to_a_proxied_name_is_the_one_refusal(hosted: Hosted) -> None:
    for response in (
        hosted.client.put("/v2/acc/plain/manifests/1", data=b"{}"),
        hosted.client.delete(f"/v2/acc/plain/blobs/{SUBJECT}"),
        hosted.client.post("/v2/acc/plain/blobs/uploads/"),
        hosted.client.delete("/v2/acc/plain/blobs/uploads/x"),
    ):
        assert response.status_code == 403
        error = json.loads(response.data)["errors"][0]
        assert error == {"code": "DENIED", "message": WHERE_PUSHES_GO, "detail": None}


def test_a_proxied_repository_refuses_writes_itself() -> None:
    settings = replace(
        load_settings({"REGISTRY_URL": REG}, env_file="/nonexistent"),
        hosted_repositories=("team/*",),
    )
    # No write reaches the proxy: only its settings are read.
    proxy = cast(Proxy, SimpleNamespace(settings=settings))
    repository = ProxiedRepository(proxy, route_name(settings, "acc/plain"), None)
    writes: list[Callable[[], object]] = [
        lambda: repository.put_manifest("1", b"{}", MANIFEST_TYPE),
        lambda: repository.delete_manifest("1"),
        lambda: repository.delete_blob(SUBJECT),
        repository.uploads,
    ]
    for write in writes:
        with pytest.raises(Denied) as refused:
            write()
        assert refused.value.message == WHERE_PUSHES_GO
