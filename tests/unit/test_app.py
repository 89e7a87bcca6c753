"""The app through Flask's test client, against a registry simulated with responses:
archive layout, determinism, HEAD, and errors before and after the first byte."""

from __future__ import annotations

import base64
import gzip
import io
import json
import tarfile

import pytest
import responses

from passthrough import create_app
from passthrough.config import load_settings
from passthrough.errors import UpstreamInvalid
from passthrough.export.archive import layer_ids
from passthrough.export.tarstream import END_OF_ARCHIVE
from passthrough.services import services_of
from tests.support.helpers import digest

REG = "http://reg.test:5000"


def tar_of(name: str, payload: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        archive.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


class FakeImage:
    def __init__(self, repository: str, tag: str, layers: list[bytes]) -> None:
        self.repository, self.tag, self.tars = repository, tag, layers
        self.blobs = [gzip.compress(t, mtime=0) for t in layers]
        self.config = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": {"Cmd": ["/bin/true"]},
                "rootfs": {"type": "layers", "diff_ids": [digest(t) for t in layers]},
                "history": [{"created_by": "x"}],
            }
        ).encode()
        self.manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
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

    def register(self, rsps, *, corrupt_layer: int | None = None) -> None:
        base = f"{REG}/v2/{self.repository}"
        rsps.add(
            responses.GET,
            f"{base}/manifests/{self.tag}",
            body=self.manifest,
            content_type="application/vnd.docker.distribution.manifest.v2+json",
        )
        rsps.add(
            responses.HEAD,
            f"{base}/manifests/{self.tag}",
            headers={"Docker-Content-Digest": digest(self.manifest)},
            content_type="application/vnd.docker.distribution.manifest.v2+json",
        )
        rsps.add(responses.GET, f"{base}/blobs/{digest(self.config)}", body=self.config)
        for index, blob in enumerate(self.blobs):
            body = blob[:-8] + b"XXXXXXXX" if index == corrupt_layer else blob
            rsps.add(
                responses.HEAD,
                f"{base}/blobs/{digest(blob)}",
                status=200,
                headers={"Content-Length": str(len(blob))},
            )
            rsps.add(responses.GET, f"{base}/blobs/{digest(blob)}", body=body)


@pytest.fixture
def app(tmp_path):
    return create_app(
        {"REGISTRY_URL": REG, "ENV_FILE": "/nonexistent", "TEMP_DIR": str(tmp_path), "STORE": "off"}
    )


def read_archive(data: bytes) -> dict[str, bytes | None]:
    members: dict[str, bytes | None] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        for member in archive.getmembers():
            assert member.mtime == 0 and member.uid == 0 and member.gid == 0
            assert not member.issym() and not member.islnk()
            extracted = archive.extractfile(member) if member.isfile() else None
            members[member.name] = extracted.read() if extracted else None
    return members


@responses.activate
def test_archive_layout_and_determinism(app, tmp_path):
    shared = tar_of("shared.txt", b"same layer twice")
    image = FakeImage(
        "team/platform/api", "2026.06", [shared, tar_of("b.txt", b"B" * 5000), shared]
    )
    image.register(responses)
    client = app.test_client()
    first = client.get("/docker/team__platform__api_2026.06.tar")
    assert first.status_code == 200
    assert first.headers["Content-Type"] == "application/x-tar"
    assert first.headers["Docker-Content-Digest"] == digest(image.manifest)
    second = client.get("/docker/team__platform__api_2026.06.tar")
    assert first.data == second.data, "the same image must give the same bytes"

    members = read_archive(first.data)
    manifest = json.loads(members["manifest.json"] or b"")
    assert manifest[0]["RepoTags"] == ["reg.test:5000/team/platform/api:2026.06"]
    config_name = digest(image.config).split(":")[1] + ".json"
    assert manifest[0]["Config"] == config_name
    assert members[config_name] == image.config  # raw bytes, never re-serialised
    layers = manifest[0]["Layers"]
    assert len(layers) == 3 and layers[0] == layers[2], "a repeated layer is referenced twice"
    assert [members[name] for name in layers] == image.tars
    for name in set(layers):
        layer_dir = name.split("/")[0]
        assert members[f"{layer_dir}/VERSION"] == b"1.0"
        assert json.loads(members[f"{layer_dir}/json"] or b"")["id"] == layer_dir
    repositories = json.loads(members["repositories"] or b"")
    assert repositories == {
        "reg.test:5000/team/platform/api": {"2026.06": layers[-1].split("/")[0]}
    }
    assert list(tmp_path.iterdir()) == [], "temp files must be gone once the response ends"


@responses.activate
def test_head_answers_headers_without_fetching_layers(app):
    image = FakeImage("library/nginx", "latest", [tar_of("a", b"a")])
    image.register(responses)
    response = app.test_client().head("/docker/library_nginx_latest.tar")
    assert response.status_code == 200 and response.data == b""
    assert not any(
        c.request.method == "GET" and digest(image.blobs[0]) in str(c.request.url)
        for c in responses.calls
    )


@responses.activate
def test_corrupt_layer_after_the_first_byte_aborts_the_stream(app, tmp_path):
    image = FakeImage("team/api", "v1", [tar_of("a", b"a" * 1000), tar_of("b", b"b" * 1000)])
    image.register(responses, corrupt_layer=1)
    response = app.test_client().get("/docker/team__api_v1.tar", buffered=False)
    assert response.status_code == 200
    with pytest.raises(UpstreamInvalid):
        b"".join(response.response)
    response.close()
    assert list(tmp_path.iterdir()) == []


@responses.activate
def test_missing_layer_is_an_http_error_before_the_body(app):
    image = FakeImage("team/api", "v1", [tar_of("a", b"a")])
    base = f"{REG}/v2/team/api"
    responses.add(
        responses.GET,
        f"{base}/manifests/v1",
        body=image.manifest,
        content_type="application/vnd.docker.distribution.manifest.v2+json",
    )
    responses.add(responses.GET, f"{base}/blobs/{digest(image.config)}", body=image.config)
    responses.add(responses.HEAD, f"{base}/blobs/{digest(image.blobs[0])}", status=404)
    response = app.test_client().get("/docker/team__api_v1.tar")
    assert response.status_code == 404
    assert response.data.decode().count("\n") == 1


@responses.activate
def test_upstream_401_offers_the_basic_challenge_and_never_echoes_credentials(app):
    responses.add(
        responses.GET,
        f"{REG}/v2/team/api/manifests/v1",
        status=401,
        headers={"WWW-Authenticate": 'Basic realm="upstream"'},
    )
    secret = "hunter2-very-secret"
    auth = "Basic " + base64.b64encode(f"alice:{secret}".encode()).decode()
    response = app.test_client().get("/docker/team__api_v1.tar", headers={"Authorization": auth})
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Basic realm="registry credentials"'
    assert secret not in response.get_data(as_text=True)
    assert "alice" not in response.get_data(as_text=True)


def test_bad_input_is_a_one_line_4xx(app):
    client = app.test_client()
    for path in [
        "/docker/UPPER_x.tar",
        "/docker/x.zip",
        "/registry/gopher/h/docker/a_b.tar",
        "/registry/http/h%0d%0aX:1/docker/a_b.tar",
        "/docker/a_b%00.tar",
        "/nothing",
    ]:
        response = client.get(path)
        assert 400 <= response.status_code < 500, path
        body = response.get_data(as_text=True)
        assert body.endswith("\n") and body.count("\n") == 1, path
        assert "\r" not in body


def test_layer_ids_are_chained_and_deterministic():
    a, b = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    ids = layer_ids([a, b, a], "sha256:" + "c" * 64)
    assert len(set(ids)) == 3
    assert ids == layer_ids([a, b, a], "sha256:" + "c" * 64)
    assert layer_ids([a], "sha256:" + "c" * 64) != layer_ids([a], "sha256:" + "d" * 64)


@responses.activate
def test_explicit_platform_refuses_a_single_platform_image_of_another(app):
    image = FakeImage("team/api", "v1", [tar_of("a", b"a")])
    image.register(responses)
    client = app.test_client()
    refused = client.get("/docker/team__api_v1.tar?platform=linux/arm64")
    assert refused.status_code == 404
    assert "available platforms: linux/amd64" in refused.get_data(as_text=True)
    assert client.get("/docker/team__api_v1.tar?platform=linux/amd64").status_code == 200


def test_default_namespace_belongs_to_the_environment_registry():
    from passthrough.export.request import DownloadRequest, select
    from passthrough.services import Services
    from passthrough.upstream.target import Route

    settings = load_settings(
        {
            "REGISTRY_URL": REG,
            "REGISTRY_DEFAULT_NAMESPACE": "team",
            "ENV_FILE": "/nonexistent",
            "STORE": "off",
        }
    )
    services = Services.create(settings)
    own = select(services, DownloadRequest(Route.ENVIRONMENT, "nginx_latest.tar"))
    assert own.reference.repository == "team/nginx"
    same_host = select(
        services, DownloadRequest(Route.REGISTRY, "nginx_latest.tar", "http", "reg.test:5000")
    )
    assert same_host.reference.repository == "team/nginx"
    hub = select(
        services, DownloadRequest(Route.REGISTRY, "nginx_latest.tar", "https", "docker.io")
    )
    assert hub.reference.repository == "library/nginx"
    other = select(
        services, DownloadRequest(Route.REGISTRY, "nginx_latest.tar", "https", "ghcr.example")
    )
    assert other.reference.repository == "nginx"


@responses.activate
def test_gzip_layers_are_still_checked_readable_before_the_200(app):
    # With ?layers=gzip every size is known from the manifest; readability is not.
    image = FakeImage("team/api", "v1", [tar_of("a", b"a")])
    base = f"{REG}/v2/team/api"
    responses.add(
        responses.GET,
        f"{base}/manifests/v1",
        body=image.manifest,
        content_type="application/vnd.docker.distribution.manifest.v2+json",
    )
    responses.add(responses.GET, f"{base}/blobs/{digest(image.config)}", body=image.config)
    responses.add(responses.HEAD, f"{base}/blobs/{digest(image.blobs[0])}", status=404)
    response = app.test_client().get("/docker/team__api_v1.tar?layers=gzip")
    assert response.status_code == 404


@responses.activate
def test_a_downloads_slot_is_free_before_its_last_bytes_are_written(tmp_path):
    """A client that has every byte may start its next transfer at once: the slot of a
    download whose size is known goes back as its last piece is handed to the server,
    before it is written (a device copying images one after another at MAX_TRANSFERS=1
    got 503 on the second)."""
    app = create_app({"REGISTRY_URL": REG, "ENV_FILE": "/nonexistent",
                      "TEMP_DIR": str(tmp_path), "CACHE_DIR": str(tmp_path / "cache")})  # fmt: skip
    image = FakeImage("team/app", "1.0", [tar_of("a.txt", b"A" * 5000)])
    image.register(responses)
    slots = services_of(app).slots
    assert app.test_client().get("/docker/team__app_1.0.tar").status_code == 200  # warm
    before = slots.in_use()  # other tests' apps of this process may share the slot file
    response = app.test_client().get("/docker/team__app_1.0.tar", buffered=False)
    assert response.status_code == 200
    chunks = iter(response.response)
    held, in_use = next(chunks), []
    for chunk in chunks:
        in_use.append(slots.in_use())
        held = chunk
    assert held == END_OF_ARCHIVE and in_use[-1] == before and in_use[0] == before + 1
    response.close()
