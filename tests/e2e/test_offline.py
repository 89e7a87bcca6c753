"""End to end: a site whose upstream goes away keeps serving what its store holds.

The rig registry sits behind an OutageFront (tests/support/outage.py) that answers 503
or 429, drops or hangs connections, or closes its port. One image is warmed through
the tar routes (tag and pinned digest) and through /v2 (skopeo), then the server is
restarted, and then the upstream fails in each way: the tar is served whole, byte for
byte the warm one, with Warning 110, its first byte within a second, and docker loads
and runs it. A pinned digest needs nothing from upstream; client credentials are never
served without upstream's word; OFFLINE=true never contacts the upstream, on the tar
routes and /v2 alike. Everything runs on a filesystem store and on S3 (SeaweedFS).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.e2e.helpers import download, encoded, push, running_server, unique
from tests.support.images import Image, runnable_image
from tests.support.loaders import docker_load_and_run, skopeo_copy
from tests.support.outage import Mode, OutageFront, first_byte
from tests.support.registry import RegistryServer
from tests.support.server import PassthroughServer

pytestmark = pytest.mark.rig

#: The promise: a stored image's first byte within a second, whatever the upstream does.
FIRST_BYTE_SECONDS = 1.0


@pytest.fixture(scope="module", params=["filesystem", "s3"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def front(registry_anon: RegistryServer) -> Iterator[OutageFront]:
    with OutageFront(registry_anon.bind_host, registry_anon.port) as outage:
        yield outage


@dataclass
class Site:
    """The warmed site: its settings, image and what the warm downloads delivered."""

    env: dict[str, str]
    name: str
    image: Image
    digest: str
    warm_tag: bytes
    warm_pinned: bytes
    repo_tag: str

    @property
    def tag_path(self) -> str:
        return f"/ref/{self.name}:1.0.tar"

    @property
    def pinned_path(self) -> str:
        return f"/ref/{self.name}@{self.digest}.tar"


def _warm(server: PassthroughServer, site_name: str, digest: str, scratch: Path) -> list[bytes]:
    """The tar routes (tag and pinned digest) and /v2 (skopeo) read it once."""
    bodies: list[bytes] = []
    for path in (f"/ref/{site_name}:1.0.tar", f"/ref/{site_name}@{digest}.tar"):
        got = download(server.url + path, scratch / f"warm-{len(bodies)}.tar")
        assert "Warning" not in got.headers, got.describe()
        bodies.append(got.body)
    host = server.url.removeprefix("http://")
    skopeo_copy(f"docker://{host}/{site_name}:1.0", f"dir:{scratch / 'warm-v2'}")
    return bodies


@pytest.fixture(scope="module")
def site(
    tmp_path_factory: pytest.TempPathFactory,
    store_env,
    front: OutageFront,
    registry_anon: RegistryServer,
) -> Site:
    front.set_mode("pass")
    env = store_env({"REGISTRY_URL": front.url})
    image = runnable_image(f"marker-{uuid.uuid4().hex[:12]}")
    name = unique("site") + "/app"
    digest = push(registry_anon, name, "1.0", image)
    scratch = tmp_path_factory.mktemp("warm")
    # Warmed by one server; everything after runs on a new one: the records are the
    # store's, not a process's.
    with running_server(tmp_path_factory, env) as server:
        warm_tag, warm_pinned = _warm(server, name, digest, scratch)
    repo_tag = f"{front.address}/{name}:1.0"
    return Site(env, name, image, digest, warm_tag, warm_pinned, repo_tag)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, site: Site) -> Iterator[PassthroughServer]:
    """The restarted site: same store, a new process."""
    with running_server(tmp_path_factory, site.env) as restarted:
        yield restarted


@pytest.fixture(scope="module")
def offline_server(
    tmp_path_factory: pytest.TempPathFactory, site: Site
) -> Iterator[PassthroughServer]:
    """The same store in offline mode."""
    with running_server(tmp_path_factory, {**site.env, "OFFLINE": "true"}) as offline:
        yield offline


def _cause(mode: Mode, front: OutageFront) -> str:
    """What the Warning must name for each kind of outage."""
    return {"503": "answered 503", "429": "rate-limiting"}.get(mode, front.address)


@pytest.mark.parametrize("mode", ["503", "429", "drop", "hang", "refuse"])
def test_an_outage_serves_the_stored_archive_at_once(
    server: PassthroughServer, site: Site, front: OutageFront, mode: Mode
) -> None:
    with front.outage(mode):
        response, seconds, body = first_byte(server.url + site.tag_path)
    assert response.status_code == 200, (response.status_code, body[:300])
    assert body == site.warm_tag, "the archive differs from the warm download"
    warning = response.headers.get("Warning", "")
    assert warning.startswith('110 passthrough "Response is stale: '), warning
    assert _cause(mode, front) in warning, warning
    print(f"outage {mode}: first byte after {seconds:.3f} s")
    assert seconds < FIRST_BYTE_SECONDS, f"first byte after {seconds:.2f} s"


def test_the_archive_of_an_outage_loads_and_runs_in_docker(
    server: PassthroughServer, site: Site, front: OutageFront, docker_host: str, tmp_path: Path
) -> None:
    with front.outage("refuse"):
        response, _, body = first_byte(server.url + site.tag_path)
    assert response.status_code == 200 and "Warning" in response.headers
    archive = tmp_path / "outage.tar"
    archive.write_bytes(body)
    run = docker_load_and_run(docker_host, archive, site.repo_tag, marker=site.image.marker or "")
    assert run.image_id == site.image.config_digest


def test_a_pinned_digest_in_the_store_needs_nothing_from_upstream(
    server: PassthroughServer, site: Site, front: OutageFront
) -> None:
    with front.outage("drop"):
        front.reset()
        response, seconds, body = first_byte(server.url + site.pinned_path)
        contacted = front.connections
    assert response.status_code == 200, (response.status_code, body[:300])
    assert body == site.warm_pinned
    assert contacted == 0, f"the upstream was contacted {contacted} times"
    assert "Warning" not in response.headers  # content by digest is never stale
    assert seconds < FIRST_BYTE_SECONDS


def test_client_credentials_are_never_served_without_upstream(
    server: PassthroughServer, site: Site, front: OutageFront
) -> None:
    path = f"/registry-auth/http/{encoded(front.address)}{site.tag_path}"
    auth = ("someone", "their-password")
    response, _, body = first_byte(server.url + path, auth=auth)
    assert response.status_code == 200, body[:300]  # the route works while upstream does
    with front.outage("503"):
        response, _, body = first_byte(server.url + path, auth=auth)
    assert response.status_code == 503, (response.status_code, body[:300])
    assert b"503" in body and b"their-password" not in body


def test_a_tag_that_moved_is_followed_once_upstream_answers(
    server: PassthroughServer,
    registry_anon: RegistryServer,
    site: Site,
    front: OutageFront,
) -> None:
    path = f"/ref/{site.name}:2.0.tar"
    push(registry_anon, site.name, "2.0", site.image)
    first, _, _ = first_byte(server.url + path)
    assert first.status_code == 200
    moved = runnable_image(f"moved-{uuid.uuid4().hex[:12]}")
    moved_digest = push(registry_anon, site.name, "2.0", moved)
    response, _, body = first_byte(server.url + path)
    assert response.headers["Docker-Content-Digest"] == moved_digest
    assert "Warning" not in response.headers
    with front.outage("503"):
        stale, _, stale_body = first_byte(server.url + path)
    assert stale.headers["Docker-Content-Digest"] == moved_digest
    assert stale_body == body and "Warning" in stale.headers


def test_offline_mode_serves_the_store_and_never_contacts_upstream(
    offline_server: PassthroughServer, site: Site, front: OutageFront, tmp_path: Path
) -> None:
    with front.outage("drop"):
        front.reset()
        tag, seconds, tag_body = first_byte(offline_server.url + site.tag_path)
        pinned, _, pinned_body = first_byte(offline_server.url + site.pinned_path)
        host = offline_server.url.removeprefix("http://")
        skopeo_copy(f"docker://{host}/{site.name}:1.0", f"dir:{tmp_path / 'pulled'}")
        contacted = front.connections
    assert (tag.status_code, pinned.status_code) == (200, 200)
    assert tag_body == site.warm_tag and pinned_body == site.warm_pinned
    assert "offline mode (OFFLINE=true)" in tag.headers.get("Warning", "")
    assert seconds < FIRST_BYTE_SECONDS
    pulled = json.loads((tmp_path / "pulled" / "manifest.json").read_bytes())
    assert pulled["config"]["digest"] == site.image.config_digest
    assert contacted == 0, f"offline mode contacted the upstream {contacted} times"


def test_offline_mode_names_itself_for_what_is_not_stored(
    offline_server: PassthroughServer, site: Site, front: OutageFront
) -> None:
    with front.outage("drop"):
        front.reset()
        tar = requests.get(offline_server.url + f"/ref/{site.name}:nope.tar", timeout=30)
        v2 = requests.get(offline_server.url + f"/v2/{site.name}/manifests/nope", timeout=30)
        tags = requests.get(offline_server.url + f"/v2/{site.name}/tags/list", timeout=30)
        contacted = front.connections
    assert tar.status_code == 404 and "offline mode" in tar.text, tar.text
    assert v2.status_code == 404, v2.text
    error = v2.json()["errors"][0]
    assert error["code"] == "MANIFEST_UNKNOWN" and "offline mode" in error["message"]
    assert tags.status_code == 503 and "offline mode" in tags.json()["errors"][0]["message"]
    assert contacted == 0


def test_ready_reports_offline_mode_and_stays_ready(
    offline_server: PassthroughServer, front: OutageFront
) -> None:
    with front.outage("refuse"):
        ready = requests.get(offline_server.url + "/ready", timeout=30)
    assert ready.status_code == 200, ready.text
    report = ready.json()
    assert report["status"] == "ready" and report["offline"] == ["default"]
    upstream = report["upstreams"][0]
    assert upstream["offline"] is True and "offline mode" in upstream["detail"]
