"""Real clients of the /v2 API over HTTPS with TLS_SELF_SIGNED: the rig's dockerd pulls
and runs an image through an alias, and containerd's ctr pulls with the CA named in a
hosts.toml (and refuses the server without it).

dockerd reads certificates from /etc/docker/certs.d/<host:port>/ (a fixed path, no
option moves it; ~/.config/docker/certs.d only when rootless), so the CA goes there,
in a directory of this test's own port, removed afterwards. dockerd also counts
127.0.0.0/8 as an insecure registry whatever it is told (it then accepts any
certificate, and would fall back to plain HTTP): on loopback the docker pull proves
that docker speaks HTTPS to the service (the port speaks nothing else), while the ctr
pull proves the certificate verifies against the CA the service hands out.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from tests.support.docker_engine import DockerEngine
from tests.support.images import Image, push_image
from tests.support.registry import RegistryServer
from tests.support.server import PassthroughServer

ServerFactory = Callable[..., PassthroughServer]
DOCKER_CERTS_D = Path("/etc/docker/certs.d")
CTR = "/usr/bin/ctr"


@pytest.fixture
def tls_proxy(
    passthrough_server: ServerFactory, registry_anon: RegistryServer, tmp_path: Path
) -> PassthroughServer:
    """passthrough over HTTPS (TLS_SELF_SIGNED) with the rig's registry as alias "lab"."""
    return passthrough_server(
        {
            "TLS_SELF_SIGNED": "true",
            "UPSTREAMS": f"lab={registry_anon.url}",
            "CACHE_DIR": str(tmp_path / "cache"),
        }
    )


@pytest.fixture
def docker_trusts(tls_proxy: PassthroughServer) -> Iterator[Path]:
    """The service's CA, fetched from /ca.crt, in dockerd's certs.d for host:port."""
    host_dir = DOCKER_CERTS_D / f"127.0.0.1:{tls_proxy.port}"
    assert not host_dir.exists(), f"{host_dir} exists already"
    ca = fetch_ca(tls_proxy)
    host_dir.mkdir(parents=True)
    try:
        (host_dir / "ca.crt").write_text(ca)
        yield host_dir
    finally:
        shutil.rmtree(host_dir, ignore_errors=True)


def fetch_ca(server: PassthroughServer) -> str:
    """GET /ca.crt, verified with the CA file the master wrote (as an operator who took
    it from the log would)."""
    response = requests.get(f"{server.url}/ca.crt", timeout=10, verify=str(server.ca_file))
    assert response.status_code == 200, response.text
    return response.text


def test_docker_pulls_and_runs_through_an_alias_over_https(
    tls_proxy: PassthroughServer,
    docker_trusts: Path,
    docker_engine: DockerEngine,
    registry_anon: RegistryServer,
    busybox_marker_image: Callable[..., Image],
) -> None:
    image = busybox_marker_image()
    repository = f"acc/plain-{uuid.uuid4().hex[:8]}"
    push_image(registry_anon.url, repository, "1.0", image)
    name = f"127.0.0.1:{tls_proxy.port}/lab/{repository}:1.0"
    try:
        pulled = docker_engine.docker("pull", name, timeout=300)
        assert "Downloaded newer image" in pulled.stdout, pulled.stdout
        run = docker_engine.docker("run", "--rm", "--network", "none", name, timeout=300)
        assert image.marker in run.stdout.splitlines(), run.stdout
    finally:
        docker_engine.docker("rmi", "-f", name, check=False)
    # Over the TLS port: every /v2 request docker made reached the app, none as plain
    # HTTP (which the port cannot answer).
    log = tls_proxy.log_text()
    assert f"/v2/lab/{repository}/manifests/1.0" in log
    assert "docker/" in log, "the requests are docker's (its User-Agent)"


def write_hosts_toml(root: Path, server: PassthroughServer, ca: Path | None) -> Path:
    """containerd's hosts directory for 127.0.0.1:<port>: the service over https, with
    the CA named (or not)."""
    host_dir = root / f"127.0.0.1:{server.port}"
    host_dir.mkdir(parents=True)
    lines = [
        f'server = "{server.url}"',
        "",
        f'[host."{server.url}"]',
        '  capabilities = ["pull", "resolve"]',
    ]
    if ca is not None:
        lines.append(f'  ca = "{ca}"')
    (host_dir / "hosts.toml").write_text("\n".join(lines) + "\n")
    return root


def ctr(engine: DockerEngine, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CTR, "--address", str(engine.containerd_sock), "--namespace", "pt-tls", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_ctr_verifies_the_certificate_against_the_served_ca(
    tls_proxy: PassthroughServer,
    docker_engine: DockerEngine,
    registry_anon: RegistryServer,
    busybox_marker_image: Callable[..., Image],
    tmp_path: Path,
) -> None:
    image = busybox_marker_image()
    repository = f"acc/plain-{uuid.uuid4().hex[:8]}"
    push_image(registry_anon.url, repository, "1.0", image)
    name = f"127.0.0.1:{tls_proxy.port}/lab/{repository}:1.0"
    # Without the CA: the self-signed chain is refused.
    untrusted = write_hosts_toml(tmp_path / "untrusted", tls_proxy, None)
    refused = ctr(docker_engine, "images", "pull", "--hosts-dir", str(untrusted), name)
    assert refused.returncode != 0
    assert "certificate" in refused.stderr, refused.stderr
    # With the CA from /ca.crt named in hosts.toml: verified, pulled.
    ca = tmp_path / "ca.crt"
    ca.write_text(fetch_ca(tls_proxy))
    trusted = write_hosts_toml(tmp_path / "trusted", tls_proxy, ca)
    try:
        pulled = ctr(docker_engine, "images", "pull", "--hosts-dir", str(trusted), name)
        assert pulled.returncode == 0, pulled.stderr
        listed = ctr(docker_engine, "images", "ls", "-q")
        assert name in listed.stdout.split()
    finally:
        ctr(docker_engine, "images", "rm", name)
