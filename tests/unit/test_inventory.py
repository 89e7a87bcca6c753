"""The inventory API (/api/v1) through Flask's test client on a real filesystem store:
hosted content pushed through /v2, cached content as the proxy leaves it (documents in
the store and the inventory's record of a tag served), listing, pagination, the name
filter, who sees what, the admin's actions, and the pull counter's writes."""

from __future__ import annotations

import base64
import dataclasses
import json
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from passthrough import create_app
from passthrough.cli import main
from passthrough.config import Settings
from passthrough.registry.pulls import CACHED, PullCounter, Served
from passthrough.services import services_of
from passthrough.store import layout
from passthrough.store.content import ContentStore
from tests.support.helpers import digest
from tests.support.htpasswd import bcrypt_line
from tests.unit.test_hosted_app import manifest_for

PASSWORDS = {"alice": "alice-pw-7Hq", "bob": "bob-pw-3Zx", "carol": "carol-pw-9Lm"}
ACCESS = textwrap.dedent(
    """\
    groups:
      admin: [alice]
    rules:
      - repositories: ["team/*"]
        pull: [alice, bob]
        push: [alice]
        delete: [alice]
      - repositories: ["apps/**"]
        pull: ["*"]
        push: [alice]
    """
)
HUB = "https://registry-1.docker.io"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"


def basic(user: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{PASSWORDS[user]}".encode()).decode()
    return {"Authorization": "Basic " + token}


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    users = tmp_path / "htpasswd"
    users.write_text("".join(bcrypt_line(u, p) + "\n" for u, p in PASSWORDS.items()))
    access = tmp_path / "access.yaml"
    access.write_text(ACCESS)
    return Settings(
        cache_dir=str(tmp_path / "cache"),
        public_url="https://door.example",
        token_secret="a shared secret for every replica",
        htpasswd_file=str(users),
        access_file=str(access),
        hosted_repositories=("team/*", "apps/**"),
        pull_count_interval=0.0,
    )


@pytest.fixture
def client(settings: Settings) -> FlaskClient:
    return create_app({"SETTINGS": settings}).test_client()


def store_of(client: FlaskClient) -> ContentStore:
    store = services_of(client.application).store
    assert store is not None
    return store


def push(client: FlaskClient, name: str, tag: str, marker: str) -> str:
    config = json.dumps(
        {
            "architecture": "arm64",
            "os": "linux",
            "created": "2026-01-02T03:04:05Z",
            "rootfs": {"type": "layers", "diff_ids": [digest(b"tar-" + marker.encode())]},
            "marker": marker,
        }
    ).encode()
    layer = b"layer-" + marker.encode()
    for blob in (config, layer):
        url = f"/v2/{name}/blobs/uploads/?digest={digest(blob)}"
        assert client.post(url, data=blob, headers=basic("alice")).status_code == 201
    body = manifest_for(config, [layer])
    headers = {"Content-Type": MANIFEST_TYPE, **basic("alice")}
    assert client.put(f"/v2/{name}/manifests/{tag}", data=body, headers=headers).status_code == 201
    return digest(body)


def cache(client: FlaskClient, repository: str, tag: str, marker: str) -> str:
    """What a pull through the proxy leaves: the manifest and config in the store, and
    the inventory's record of the tag served."""
    store = store_of(client)
    config = json.dumps({"architecture": "amd64", "os": "linux", "marker": marker}).encode()
    store.put_document("blobs", digest(config), config)
    body = manifest_for(config, [b"cached-layer-" + marker.encode()])
    store.put_document("manifests", digest(body), body)
    served = Served(CACHED, HUB, "docker.io", repository, tag, digest(body))
    pulls = services_of(client.application).pulls
    assert pulls is not None
    pulls.record(served)
    return digest(body)


@pytest.fixture
def filled(client: FlaskClient) -> dict[str, str]:
    return {
        "team/app:1.0": push(client, "team/app", "1.0", "a"),
        "team/app:2.0": push(client, "team/app", "2.0", "b"),
        "apps/web:latest": push(client, "apps/web", "latest", "c"),
        "library/nginx:1.27": cache(client, "library/nginx", "1.27", "n"),
        "library/redis:7": cache(client, "library/redis", "7", "r"),
    }


def listing(client: FlaskClient, user: str | None, query: str = "") -> Any:
    headers = basic(user) if user else {}
    return client.get(f"/api/v1/repositories{query}", headers=headers)


def names(response: Any) -> list[str]:
    assert response.status_code == 200, response.data
    return [r["name"] for r in response.json["repositories"]]


def test_each_user_sees_what_they_may_pull_and_only_admins_the_cache(client, filled) -> None:
    assert names(listing(client, "alice")) == [
        "apps/web",
        "library/nginx",
        "library/redis",
        "team/app",
    ]
    assert names(listing(client, "bob")) == ["apps/web", "team/app"]
    assert names(listing(client, "carol")) == ["apps/web"]
    assert names(listing(client, None)) == []
    denied = listing(client, "bob", "?source=cached")
    assert denied.status_code == 403 and denied.json["errors"][0]["code"] == "DENIED"
    anonymous = listing(client, None, "?source=cached")
    assert anonymous.status_code == 401
    assert anonymous.json["errors"][0]["code"] == "UNAUTHORIZED"
    wrong = client.get("/api/v1/repositories", headers={"Authorization": "Basic Ym9iOng="})
    assert wrong.status_code == 401 and wrong.json["errors"][0]["code"] == "UNAUTHORIZED"


def test_a_repository_summary_has_the_contract_shape(client, filled) -> None:
    found = {r["name"]: r for r in listing(client, "alice").json["repositories"]}
    app, nginx = found["team/app"], found["library/nginx"]
    assert app["source"] == "hosted" and app["upstream"] is None and app["tags"] == 2
    assert app["size"] > 0 and app["pulls"] == 0 and app["last_pulled"] is None
    assert nginx["source"] == "cached" and nginx["upstream"] == "docker.io"
    assert nginx["pulls"] == 1 and nginx["last_pulled"].endswith("Z")
    assert set(app) == {"name", "source", "upstream", "tags", "size", "last_pulled", "pulls"}


def test_pages_follow_the_link_and_the_filter_narrows(client, filled) -> None:
    first = listing(client, "alice", "?n=2")
    assert names(first) == ["apps/web", "library/nginx"]
    assert first.json["next"] == "library/nginx"
    link = first.headers["Link"]
    assert link == '</api/v1/repositories?n=2&last=library%2Fnginx>; rel="next"'
    second = client.get(link[1 : link.index(">")], headers=basic("alice"))
    assert names(second) == ["library/redis", "team/app"] and second.json["next"] is None
    assert "Link" not in second.headers
    assert names(listing(client, "alice", "?q=NGI")) == ["library/nginx"]
    assert names(listing(client, "alice", "?source=hosted&q=a")) == ["apps/web", "team/app"]
    filtered = listing(client, "alice", "?source=cached&n=1&q=library/")
    assert filtered.headers["Link"].endswith('&source=cached&q=library%2F>; rel="next"')
    for bad in ("0", "1001", "x"):
        refused = listing(client, "alice", f"?n={bad}")
        assert refused.status_code == 400
        assert refused.json["errors"][0]["code"] == "PAGINATION_INVALID"
    assert listing(client, "alice", "?source=elsewhere").status_code == 400


def test_tags_carry_digest_sizes_platforms_and_pulls(client, filled) -> None:
    assert client.get("/v2/team/app/manifests/1.0", headers=basic("bob")).status_code == 200
    assert client.head("/v2/team/app/manifests/1.0", headers=basic("bob")).status_code == 200
    response = client.get("/api/v1/repositories/team/app/tags", headers=basic("bob"))
    assert response.status_code == 200, response.data
    document = response.json
    assert (document["name"], document["source"], document["upstream"]) == (
        "team/app",
        "hosted",
        None,
    )
    tags = {t["tag"]: t for t in document["tags"]}
    one = tags["1.0"]
    assert one["digest"] == filled["team/app:1.0"] and one["media_type"] == MANIFEST_TYPE
    assert one["platforms"] == ["linux/arm64"] and one["created"] == "2026-01-02T03:04:05Z"
    assert one["compressed_size"] > 0 and one["tar_size"] is None  # no layer tar stored
    assert one["pushed"].endswith("Z") and one["pulls"] == 2
    assert tags["2.0"]["pulls"] == 0 and tags["2.0"]["last_pulled"] is None
    paged = client.get("/api/v1/repositories/team/app/tags?n=1", headers=basic("bob"))
    assert [t["tag"] for t in paged.json["tags"]] == ["1.0"] and paged.json["next"] == "1.0"


def test_tags_of_what_one_may_not_see_are_unknown(client, filled) -> None:
    hidden = client.get("/api/v1/repositories/team/app/tags", headers=basic("carol"))
    assert hidden.status_code == 404 and hidden.json["errors"][0]["code"] == "NAME_UNKNOWN"
    cached = client.get("/api/v1/repositories/library/nginx/tags", headers=basic("bob"))
    assert cached.status_code == 404
    anonymous = client.get("/api/v1/repositories/team/app/tags")
    assert anonymous.status_code == 401
    nginx = client.get("/api/v1/repositories/library/nginx/tags", headers=basic("alice"))
    assert nginx.json["upstream"] == "docker.io" and nginx.json["tags"][0]["pulls"] == 1
    assert nginx.json["tags"][0]["platforms"] == ["linux/amd64"]
    missing = client.get("/api/v1/nothing", headers=basic("alice"))
    assert missing.status_code == 404 and "errors" in missing.json


def test_store_usage_by_source(client, filled) -> None:
    assert client.get("/api/v1/store", headers=basic("bob")).status_code == 403
    usage = client.get("/api/v1/store", headers=basic("alice")).json
    assert usage["backend"] == "filesystem" and usage["cap"] == 20 << 30
    hosted, cached = usage["sources"]["hosted"], usage["sources"]["cached"]
    assert hosted["objects"] == 9  # 3 manifests, 3 configs, 3 layers
    assert cached["objects"] == 4  # 2 manifests, 2 configs
    assert usage["bytes"] == hosted["bytes"] + cached["bytes"]
    assert usage["objects"] == 13 and usage["pinned"]["objects"] == 9
    assert usage["evictions"] == 0


def test_admins_delete_hosted_tags(client, filled) -> None:
    url = "/api/v1/repositories/team/app/tags/1.0"
    assert client.delete(url, headers=basic("bob")).status_code == 403
    assert client.delete(url).status_code == 401
    assert client.delete(url, headers=basic("alice")).status_code == 200
    again = client.delete(url, headers=basic("alice"))
    assert again.status_code == 404 and again.json["errors"][0]["code"] == "TAG_UNKNOWN"
    left = client.get("/api/v1/repositories/team/app/tags", headers=basic("alice")).json
    assert [t["tag"] for t in left["tags"]] == ["2.0"]


def test_evicting_a_cached_image_removes_its_records_and_content(client, filled) -> None:
    store = store_of(client)
    nginx = filled["library/nginx:1.27"]
    assert (
        client.delete("/api/v1/cache/library/nginx:1.27", headers=basic("bob")).status_code == 403
    )
    response = client.delete("/api/v1/cache/library/nginx:1.27", headers=basic("alice"))
    assert response.status_code == 200, response.data
    assert response.json["evicted"] == ["library/nginx:1.27"] and response.json["objects"] == 2
    assert store.get_document("manifests", nginx) is None
    assert names(listing(client, "alice", "?source=cached")) == ["library/redis"]
    assert store.get_document("manifests", filled["library/redis:7"]) is not None
    unknown = client.delete("/api/v1/cache/library/nginx:1.27", headers=basic("alice"))
    assert unknown.status_code == 404
    by_digest = f"/api/v1/cache/library/redis?digest={filled['library/redis:7']}"
    assert client.delete(by_digest, headers=basic("alice")).json["evicted"] == ["library/redis:7"]
    bad = client.delete("/api/v1/cache/library/redis", headers=basic("alice"))
    assert bad.status_code == 400


def test_gc_dry_run_as_json(client, filled) -> None:
    assert client.post("/api/v1/gc", json={"dry_run": True}).status_code == 401
    response = client.post("/api/v1/gc", json={"dry_run": True}, headers=basic("alice"))
    assert response.status_code == 200, response.data
    report = response.json
    assert report["dry_run"] is True and report["summary"].startswith("dry run:")
    assert report["manifests"] == 0 and isinstance(report["lines"], list)
    refused = client.post("/api/v1/gc", json={"dry_run": False}, headers=basic("alice"))
    assert refused.status_code == 400 and "--delete" in refused.json["errors"][0]["message"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_pulls_are_written_at_most_once_per_interval(client) -> None:
    store = store_of(client)
    clock = Clock()
    counter = PullCounter(store, 30.0, clock=clock, background=False)
    served = Served(CACHED, HUB, "docker.io", "library/busybox", "1", "sha256:" + "1" * 64)
    for _ in range(50):
        counter.record(served)
        clock.now += 0.1
    assert counter.writes == 1  # the first pull at once, the rest gathered
    key = layout.pull_record_key(served.identity)
    assert json.loads(store.backend.get_bytes(key) or b"{}")["pulls"] == 1
    clock.now += 30
    counter.record(served)
    assert counter.writes == 2
    assert json.loads(store.backend.get_bytes(key) or b"{}")["pulls"] == 51
    counter.record(served)
    counter.flush()
    record = json.loads(store.backend.get_bytes(key) or b"{}")
    assert record["pulls"] == 52 and record["repository"] == "library/busybox"
    assert record["last_pulled"] == clock.now


def test_an_alias_and_a_host_name_cached_repositories_as_v2_does(client, settings) -> None:
    from passthrough.config import normalize_registry
    from passthrough.registry.inventory import v2_name

    lab = normalize_registry("http://10.1.2.3:5000")
    aliased = dataclasses.replace(settings, upstreams=(("lab", lab),))
    assert v2_name(aliased, lab.url, lab.name, "team/app") == "lab/team/app"
    assert v2_name(aliased, "https://ghcr.io", "ghcr.io", "org/app") == "ghcr.io/org/app"
    assert v2_name(aliased, HUB, "docker.io", "library/nginx") == "library/nginx"


def test_ls_prints_the_inventory(client, filled, settings, monkeypatch, capsys, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)  # no .env of the developer's
    for name in ("STORE", "S3_BUCKET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CACHE_DIR", str(settings.cache_dir))
    assert main(["ls", "--json", "--cached"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in printed["repositories"]] == ["library/nginx", "library/redis"]
    assert main(["ls", "team/*", "--tags"]) == 0
    out = capsys.readouterr().out
    assert "team/app" in out and ":1.0" in out and "library/nginx" not in out
    monkeypatch.delenv("CACHE_DIR")
    monkeypatch.setenv("STORE", "off")  # no store: nothing to list, a configuration error
    assert main(["ls"]) == 2


def test_gathered_pulls_are_written_in_the_background(client) -> None:
    store = store_of(client)
    counter = PullCounter(store, 0.2)
    served = Served(CACHED, HUB, "docker.io", "library/alpine", "3", "sha256:" + "2" * 64)
    for _ in range(3):
        counter.record(served)
    key = layout.pull_record_key(served.identity)
    assert json.loads(store.backend.get_bytes(key) or b"{}")["pulls"] == 1
    deadline = time.monotonic() + 10
    while json.loads(store.backend.get_bytes(key) or b"{}")["pulls"] != 3:
        assert time.monotonic() < deadline, "the background flush never came"
        time.sleep(0.05)


def test_a_bearer_token_of_the_door_logs_in_as_its_user(client, filled) -> None:
    issued = client.get("/v2/token?service=passthrough", headers=basic("alice"))
    assert issued.status_code == 200, issued.data
    bearer = {"Authorization": "Bearer " + issued.json["token"]}
    assert client.get("/api/v1/store", headers=bearer).status_code == 200
    forged = client.get("/api/v1/store", headers={"Authorization": "Bearer not-a-token"})
    assert forged.status_code == 401 and forged.json["errors"][0]["code"] == "UNAUTHORIZED"
