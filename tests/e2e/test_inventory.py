"""The inventory API and UPSTREAM_RULES against a real server, once on a directory and
once on S3 (SeaweedFS): hosted content copied in with skopeo, cached content pulled
through /v2 and downloaded as a tar from the rig's registry; pull counts rising, what
an admin and a user see, a cached image evicted and pulled again, and a rule refusing
a proxied repository on /v2 (JSON) and on the tar route (plain text)."""

from __future__ import annotations

import json
import secrets
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.e2e.helpers import check_archive
from tests.e2e.hosted import Hosted, hosted_server
from tests.support.fixtures_matrix import s3_env
from tests.support.images import Image, decompress, push_image, runnable_image
from tests.support.loaders import skopeo
from tests.support.registry import RegistryServer
from tests.support.seaweed import SeaweedS3

pytestmark = pytest.mark.rig

ACCESS = textwrap.dedent(
    """\
    groups:
      admin: [alice]
    rules:
      - repositories: ["team/**"]
        pull: [alice, bob]
        push: [alice]
        delete: [alice]
    """
)


class Door:
    """The module's server and what it holds."""

    def __init__(self, hosted: Hosted, registry: RegistryServer, image: Image, kind: str):
        self.hosted = hosted
        self.registry = registry
        self.image = image
        self.kind = kind
        self.cached = f"inv/c{secrets.token_hex(4)}"
        self.team = f"team/h{secrets.token_hex(4)}"
        #: Where the hosted copy comes from (another image: nothing shared with the cache).
        self.source = f"src/h{secrets.token_hex(4)}"

    def api(
        self, path: str, user: str | None = "alice", method: str = "GET", **kw: Any
    ) -> requests.Response:
        session = self.hosted.session(user)
        return session.request(method, self.hosted.url("/api/v1" + path), timeout=60, **kw)

    def repositories(self, user: str | None = "alice", query: str = "") -> dict[str, Any]:
        response = self.api(f"/repositories{query}", user)
        assert response.status_code == 200, response.text
        listed: list[dict[str, Any]] = response.json()["repositories"]
        return {r["name"]: r for r in listed}

    def tag(self, name: str, tag: str) -> dict[str, Any]:
        response = self.api(f"/repositories/{name}/tags")
        assert response.status_code == 200, response.text
        tags: list[dict[str, Any]] = response.json()["tags"]
        return {t["tag"]: t for t in tags}[tag]

    def tar(self, tmp_path: Path, name: str) -> requests.Response:
        url = self.hosted.url(f"/docker/{name.replace('/', '_')}_v1.tar")
        response = requests.get(url, timeout=300)
        if response.status_code == 200:
            path = tmp_path / f"{secrets.token_hex(4)}.tar"
            path.write_bytes(response.content)
            check_archive(path, self.image)
        return response


@pytest.fixture(scope="module", params=["filesystem", "s3"])
def door(
    request: pytest.FixtureRequest,
    registry_anon: RegistryServer,
    seaweed: SeaweedS3,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Door]:
    root = tmp_path_factory.mktemp(f"inventory-{request.param}")
    access = root / "access.yaml"
    access.write_text(ACCESS)
    upstream = registry_anon.host
    rules = {upstream: {"allow": ["inv/*"], "deny": ["inv/blocked"]}}
    extra = {
        "REGISTRY_URL": registry_anon.url,
        "ACCESS_FILE": str(access),
        "UPSTREAM_RULES": json.dumps(rules),
        "PULL_COUNT_INTERVAL": "0",
    }
    bucket = None
    if request.param == "s3":
        bucket = seaweed.create_bucket()
        extra.update(s3_env(seaweed, bucket))
    image = runnable_image("inventory " + request.param)
    try:
        with hosted_server(root, patterns="team/**", extra=extra) as hosted:
            made = Door(hosted, registry_anon, image, request.param)
            push_image(registry_anon.url, made.cached, "v1", image)
            push_image(registry_anon.url, "inv/blocked", "v1", image)
            push_image(registry_anon.url, made.source, "v1", runnable_image("hosted copy"))
            yield made
    finally:
        if bucket is not None:
            seaweed.ensure_running()
            seaweed.delete_bucket(bucket)


def copy_into_hosted(door: Door) -> None:
    """skopeo copy from the rig's registry into the door's hosted area, as alice."""
    skopeo(
        "copy", "--quiet", "--src-tls-verify=false", "--src-no-creds",
        "--dest-tls-verify=false", "--dest-creds", f"alice:{door.hosted.users['alice']}",
        f"docker://{door.registry.host}/{door.source}:v1",
        f"docker://{door.hosted.host}/{door.team}:1.0",
    )  # fmt: skip


def pull_v2(door: Door, name: str, user: str | None = None) -> requests.Response:
    accept = "application/vnd.docker.distribution.manifest.v2+json"
    session = door.hosted.session(user)
    return session.get(
        door.hosted.url(f"/v2/{name}/manifests/v1"),
        headers={"Accept": accept},
        timeout=60,
    )


def test_inventory_lists_counts_and_evicts(door: Door, tmp_path: Path) -> None:
    copy_into_hosted(door)
    first = pull_v2(door, door.cached)
    assert first.status_code == 200, first.text
    assert door.tar(tmp_path, door.cached).status_code == 200

    listed = door.repositories()
    hosted, cached = listed[door.team], listed[door.cached]
    assert (hosted["source"], hosted["upstream"], hosted["tags"]) == ("hosted", None, 1)
    assert cached["source"] == "cached" and cached["upstream"] == door.registry.host
    assert cached["pulls"] == 2 and cached["last_pulled"].endswith("Z")
    tag = door.tag(door.cached, "v1")
    assert tag["digest"] == door.image.digest and tag["platforms"] == ["linux/amd64"]
    layers = door.image.layers
    assert tag["compressed_size"] == len(door.image.config) + sum(x.size for x in layers)
    assert tag["tar_size"] == sum(len(decompress(x.read(), x.compression)) for x in layers)

    assert pull_v2(door, door.cached).status_code == 200
    assert door.repositories()[door.cached]["pulls"] == 3
    hosted_pull = door.hosted.session("bob").get(
        door.hosted.url(f"/v2/{door.team}/manifests/1.0"),
        headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"},
        timeout=60,
    )
    assert hosted_pull.status_code == 200, hosted_pull.text
    assert door.tag(door.team, "1.0")["pulls"] == 1

    usage = door.api("/store").json()
    assert usage["backend"] == door.kind
    assert usage["sources"]["hosted"]["objects"] > 0
    assert usage["sources"]["cached"]["objects"] > 0
    assert usage["pinned"]["objects"] > 0

    evicted = door.api(f"/cache/{door.cached}:v1", method="DELETE")
    assert evicted.status_code == 200, evicted.text
    assert evicted.json()["objects"] > 0
    assert door.cached not in door.repositories()
    assert door.tar(tmp_path, door.cached).status_code == 200  # fetched again, whole
    assert door.repositories()[door.cached]["pulls"] == 1

    report = door.api("/gc", method="POST", json={"dry_run": True})
    assert report.status_code == 200 and report.json()["dry_run"] is True


def test_a_user_sees_hosted_only_and_no_admin_action(door: Door) -> None:
    if door.team not in door.repositories():
        copy_into_hosted(door)
    assert list(door.repositories("bob")) == [door.team]
    assert door.repositories(None) == {}
    for path, method in (
        ("/repositories?source=cached", "GET"),
        ("/store", "GET"),
        (f"/cache/{door.cached}:v1", "DELETE"),
        ("/gc", "POST"),
    ):
        refused = door.api(path, "bob", method)
        assert refused.status_code == 403, (path, refused.text)
        assert refused.json()["errors"][0]["code"] == "DENIED"
    assert door.api("/store", None).status_code == 401


def test_rules_refuse_a_proxied_repository_on_v2_and_the_tar_route(
    door: Door, tmp_path: Path
) -> None:
    for name in ("inv/blocked", "other/app"):
        refused = pull_v2(door, name)
        assert refused.status_code == 403, refused.text
        error = refused.json()["errors"][0]
        assert error["code"] == "DENIED" and "UPSTREAM_RULES" in error["message"]
        tar = door.tar(tmp_path, name)
        assert tar.status_code == 403 and tar.headers["Content-Type"].startswith("text/plain")
        assert f"UPSTREAM_RULES {door.registry.host}" in tar.text
