"""UPSTREAM_CA_FILE under real gunicorn, against a real registry behind a private CA
(the rig's docker-registry serving HTTPS with a certificate for 127.0.0.1 and
localhost, signed by a CA made for this module).

Without the CA the service refuses the registry with an error naming the certificate
problem and the host:port — on /v2 (the spec's UNAVAILABLE), on the tar route and on
/ready — never a 500, never a byte of the image. With it, the /v2 proxy serves the
manifest and blobs by a host-like name and by containerd's ``?ns=`` (which falls back
to ``https://``), the tar route's archive is whole and docker loads and runs it, and
/ready reports the upstream reachable."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.e2e.helpers import PUSH_AUTH, download, fetch, load_and_run, one_line_error, unique
from tests.support.helpers import digest as digest_of
from tests.support.images import Image, push_image, runnable_image
from tests.support.procs import StartupError
from tests.support.registry import RegistryServer
from tests.support.server import PassthroughServer

pytestmark = pytest.mark.rig

MANIFEST_ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)


@dataclass(frozen=True)
class Pushed:
    repository: str
    tag: str
    image: Image

    @property
    def filename(self) -> str:
        return self.repository.replace("/", "_") + f"_{self.tag}.tar"


@pytest.fixture(scope="module")
def private_registry() -> Iterator[RegistryServer]:
    """HTTPS with a private CA; `localhost` is in the certificate too, so REGISTRY_URL can
    name the registry under a host the /v2 routing does not match to 127.0.0.1:<port>."""
    with RegistryServer("anonymous", tls=True, tls_names=("localhost",)) as registry:
        yield registry


@pytest.fixture(scope="module")
def pushed(private_registry: RegistryServer) -> Pushed:
    image = runnable_image(unique("private-ca-"))
    result = Pushed(f"{unique('corp')}/app", "v1", image)
    push_image(
        private_registry.url,
        result.repository,
        result.tag,
        image,
        auth=PUSH_AUTH,
        verify=private_registry.verify,
    )
    return result


def start(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> PassthroughServer:
    """A server with a filesystem store (the /v2 API needs one)."""
    root = tmp_path_factory.mktemp("passthrough")
    server = PassthroughServer({"CACHE_DIR": str(root / "cache"), **env}, tmp_root=root)
    return server.start()


@pytest.fixture(scope="module")
def without_ca(
    tmp_path_factory: pytest.TempPathFactory, private_registry: RegistryServer
) -> Iterator[PassthroughServer]:
    server = start(tmp_path_factory, {"REGISTRY_URL": private_registry.url})
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="module")
def with_ca(
    tmp_path_factory: pytest.TempPathFactory, private_registry: RegistryServer
) -> Iterator[PassthroughServer]:
    assert private_registry.ca_file is not None
    env = {
        "REGISTRY_URL": f"https://localhost:{private_registry.port}",
        "UPSTREAM_CA_FILE": str(private_registry.ca_file),
    }
    server = start(tmp_path_factory, env)
    try:
        yield server
    finally:
        server.cleanup()


def get(url: str, **headers: str) -> requests.Response:
    with requests.Session() as session:
        session.trust_env = False
        return session.get(url, headers=headers, timeout=60)


def upstream_report(server: PassthroughServer) -> dict[str, object]:
    ready = get(f"{server.url}/ready")
    assert ready.status_code == 200, ready.text
    (upstream,) = ready.json()["upstreams"]
    assert isinstance(upstream, dict)
    return upstream


# --- (1) without UPSTREAM_CA_FILE: refused, and said why ----------------------------------


def test_without_the_ca_every_route_names_the_certificate_problem(
    without_ca: PassthroughServer,
    private_registry: RegistryServer,
    pushed: Pushed,
    tmp_path: Path,
) -> None:
    host = private_registry.host
    named = f"certificate verify failed for https://{host}"

    manifest = get(
        f"{without_ca.url}/v2/{host}/{pushed.repository}/manifests/{pushed.tag}",
        Accept=MANIFEST_ACCEPT,
    )
    assert manifest.status_code == 502, manifest.text
    assert manifest.headers["Content-Type"] == "application/json"
    (error,) = manifest.json()["errors"]
    assert error["code"] == "UNAVAILABLE"
    assert named in error["message"] and "UPSTREAM_CA_FILE" in error["message"]
    assert pushed.image.manifest not in manifest.content

    tar = fetch(
        f"{without_ca.url}/registry/https/{host}/docker/{pushed.filename}", tmp_path / "x.tar"
    )
    line = one_line_error(tar, 502)
    assert named in line, line

    upstream = upstream_report(without_ca)
    assert upstream["ok"] is False
    assert isinstance(upstream["detail"], str) and named in upstream["detail"]

    log = without_ca.log_text()
    assert "Traceback" not in log
    assert named in log  # the access log's one line per failure, for the operator


# --- (2) and (3) with UPSTREAM_CA_FILE: everything works -----------------------------------


def test_with_the_ca_the_v2_proxy_serves_manifest_and_blobs(
    with_ca: PassthroughServer, private_registry: RegistryServer, pushed: Pushed
) -> None:
    host = private_registry.host
    image = pushed.image
    # By a host-like first component, and by containerd's ?ns= (nothing configured names
    # 127.0.0.1:<port>: REGISTRY_URL says localhost, so this is the https fallback).
    forms = [
        (f"/v2/{host}/{pushed.repository}", ""),
        (f"/v2/{pushed.repository}", f"?ns={host}"),
    ]
    for prefix, query in forms:
        manifest = get(
            f"{with_ca.url}{prefix}/manifests/{pushed.tag}{query}", Accept=MANIFEST_ACCEPT
        )
        assert manifest.status_code == 200, (prefix, query, manifest.text)
        assert manifest.content == image.manifest
        assert manifest.headers["Docker-Content-Digest"] == image.digest
        for digest in [image.config_digest, *(layer.digest for layer in image.layers)]:
            blob = get(f"{with_ca.url}{prefix}/blobs/{digest}{query}")
            assert blob.status_code == 200, (prefix, query, digest, blob.text[:200])
            assert digest_of(blob.content) == digest


def test_with_the_ca_the_tar_route_gives_a_whole_archive_that_runs(
    with_ca: PassthroughServer,
    private_registry: RegistryServer,
    pushed: Pushed,
    docker_host: str,
    tmp_path: Path,
) -> None:
    host = private_registry.host
    got = download(
        f"{with_ca.url}/registry/https/{host}/docker/{pushed.filename}", tmp_path / "image.tar"
    )
    expected = f"{host}/{pushed.repository}:{pushed.tag}"
    assert got.headers["X-Image-Reference"] == expected
    assert got.headers["Docker-Content-Digest"] == pushed.image.digest
    load_and_run(docker_host, got.path, expected, pushed.image)


def test_with_the_ca_ready_reports_the_upstream_reachable(
    with_ca: PassthroughServer, private_registry: RegistryServer
) -> None:
    upstream = upstream_report(with_ca)
    assert upstream["url"] == f"https://localhost:{private_registry.port}"
    assert (upstream["ok"], upstream["status"], upstream["detail"]) == (True, 200, "reachable")
    log = with_ca.log_text()
    assert "Traceback" not in log and "certificate verify failed" not in log
    # The bundle the workers verify with: private, and the public CAs are still in it.
    (bundle,) = (with_ca.tmpdir).glob("passthrough-upstream-ca-*/ca-bundle-*.pem")
    assert bundle.stat().st_mode & 0o777 == 0o600
    assert bundle.parent.stat().st_mode & 0o777 == 0o700
    text = bundle.read_text()
    assert private_registry.ca_file is not None
    assert private_registry.ca_file.read_text().strip() in text
    assert text.count("BEGIN CERTIFICATE") > 10
    json.dumps(upstream)  # the report is plain JSON


def test_a_file_without_a_certificate_stops_start_up_with_one_line(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    not_pem = tmp_path_factory.mktemp("ca") / "ca.crt"
    not_pem.write_text("this is not a certificate\n")
    with pytest.raises(StartupError) as raised:
        start(tmp_path_factory, {"UPSTREAM_CA_FILE": str(not_pem)})
    (line,) = [line for line in str(raised.value).splitlines() if "UPSTREAM_CA_FILE" in line]
    assert line.endswith(
        f"passthrough: configuration error: UPSTREAM_CA_FILE {str(not_pem)!r} holds no PEM "
        "certificate"
    ), line
    assert "Traceback" not in str(raised.value)
