"""Bundles and checksums end to end, on one module-scoped server over the rig's registry
and a store: ``passthrough export`` of three images loaded by ``docker load`` (every
tag runs its marker), the OCI bundle copied by skopeo into the registry with its digests
kept (a whole multi-platform index with all=1), checksums equal to ``sha256sum`` and
``md5sum`` of what the tar URLs send (docker and oci, tar and gzip layers) and free the
second time, and an unknown image refused by name with nothing partial left."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.e2e.helpers import download, fetch, running_server, unique
from tests.support.docker_engine import DockerEngine
from tests.support.helpers import wait_until
from tests.support.images import (
    Image,
    Index,
    multi_platform_index,
    push_image,
    push_index,
    runnable_image,
)
from tests.support.loaders import docker_load_and_run, skopeo
from tests.support.registry import RegistryServer
from tests.support.server import PassthroughServer, scrubbed_environment

pytestmark = pytest.mark.rig


@dataclass(frozen=True)
class Site:
    """Three images in the rig's registry (a docker one, an OCI one with uncompressed
    layers, one named with the registry's host) and an index of two platforms."""

    registry: RegistryServer
    server: PassthroughServer
    cache: Path
    prefix: str
    images: dict[str, Image]
    index: Index

    def spec(self, name: str) -> str:
        return f"{self.prefix}/{name}:1"


@pytest.fixture(scope="module")
def site(registry_anon: RegistryServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    prefix = unique("bundle")
    images = {
        "one": runnable_image("MARKER-bundle-one"),
        "two": runnable_image("MARKER-bundle-two", kind="oci", compression="none"),
        "three": runnable_image("MARKER-bundle-three", extras=("duplicate",)),
    }
    for name, image in images.items():
        push_image(registry_anon.url, f"{prefix}/{name}", "1", image)
    index = multi_platform_index("MARKER-bundle-multi")
    push_index(registry_anon.url, f"{prefix}/multi", "1", index)
    cache = tmp_path_factory.mktemp("bundle-cache")
    env = {"REGISTRY_URL": registry_anon.url, "CACHE_DIR": str(cache)}
    with running_server(tmp_path_factory, env) as server:
        yield Site(registry_anon, server, cache, prefix, images, index)


def export(site: Site, *args: str) -> subprocess.CompletedProcess[str]:
    """``passthrough export`` in a process of its own, configured as the server is."""
    env = scrubbed_environment()
    env.update(
        REGISTRY_URL=site.registry.url,
        CACHE_DIR=str(site.cache),
        ENV_FILE=str(site.cache / "no-such.env"),
    )
    return subprocess.run(
        [sys.executable, "-m", "passthrough.cli", "export", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def upstream_gets(server: PassthroughServer) -> float:
    """passthrough_upstream_requests_total of every GET the server sent a registry."""
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("passthrough_upstream_requests_total{") and 'method="GET"' in line
    )


def test_export_of_three_images_loads_in_docker_and_runs_every_tag(
    site: Site, docker_host: str, tmp_path: Path
):
    archive = tmp_path / "site.tar"
    specs = [site.spec("one"), site.spec("two"), f"{site.registry.host}/{site.spec('three')}"]
    done = export(site, "-o", str(archive), "--json", *specs)
    assert done.returncode == 0, done.stderr
    assert '"sha256"' in done.stdout and len(done.stdout.strip().splitlines()) == 1
    host = site.registry.host
    for name in ("one", "two", "three"):
        docker_load_and_run(
            docker_host,
            archive,
            f"{host}/{site.spec(name)}",
            marker=f"MARKER-bundle-{name}",
        )


def test_an_unknown_image_is_refused_by_name_and_nothing_is_left(site: Site, tmp_path: Path):
    missing = f"{site.prefix}/missing:9"
    done = export(site, "-o", str(tmp_path / "site.tar"), site.spec("one"), missing)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and missing in lines[0], done.stderr
    assert list(tmp_path.iterdir()) == []

    url = f"{site.server.url}/bundle.tar?image={site.spec('one')}&image={missing}"
    got = fetch(url, tmp_path / "answer")
    assert 400 <= got.status < 500 and missing in got.text, got.describe()
    assert got.text.count("\n") == 1


def test_oci_bundle_copies_into_a_registry_with_its_digests(site: Site, tmp_path: Path):
    """skopeo 1.9 (containers/image 5.23) picks only OCI-typed manifests by name from a
    layout, so the Docker-typed image is in the bundle but not copied (README)."""
    archive = tmp_path / "site-oci.tar"
    specs = [site.spec("one"), site.spec("two"), site.spec("multi")]
    query = "&".join(f"image={spec}" for spec in specs)
    download(f"{site.server.url}/bundle.tar?{query}&format=oci&all=1", archive)
    registry = site.registry
    for spec in specs[1:]:
        name = f"{registry.host}/{spec}"
        target = f"{site.prefix}/copied-{spec.split('/')[-1].split(':')[0]}"
        skopeo(
            "copy",
            "--quiet",
            "--all",
            "--preserve-digests",
            "--dest-tls-verify=false",
            f"oci-archive:{archive}:{name}",
            f"docker://{registry.host}/{target}",
        )
        assert manifest_digest(registry, target, "latest") == manifest_digest(
            registry, spec.rsplit(":", 1)[0], "1"
        )


def test_oci_bundle_imports_into_containerd_under_every_name(
    site: Site, docker_engine: DockerEngine, tmp_path: Path
):
    archive = tmp_path / "site-oci.tar"
    specs = [site.spec("one"), site.spec("two"), site.spec("multi")]
    query = "&".join(f"image={spec}" for spec in specs)
    download(f"{site.server.url}/bundle.tar?{query}&format=oci&all=1", archive)
    ctr = ["ctr", "--address", str(docker_engine.containerd_sock), "--namespace", "pt-bundle"]
    names = [f"{site.registry.host}/{spec}" for spec in specs]
    try:
        imported = subprocess.run(
            [*ctr, "images", "import", "--all-platforms", "--no-unpack", str(archive)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert imported.returncode == 0, imported.stderr
        listed = subprocess.run(
            [*ctr, "images", "ls"], capture_output=True, text=True, timeout=60, check=True
        )
        rows = {line.split()[0]: line.split()[2] for line in listed.stdout.splitlines()[1:]}
        for spec, name in zip(specs, names, strict=True):
            original = manifest_digest(site.registry, spec.rsplit(":", 1)[0], "1")
            assert rows.get(name) == original, (name, listed.stdout)
    finally:
        subprocess.run([*ctr, "images", "rm", *names], capture_output=True, timeout=60, check=False)


def manifest_digest(registry: RegistryServer, repository: str, tag: str) -> str:
    accept = ", ".join(
        (
            "application/vnd.oci.image.index.v1+json",
            "application/vnd.docker.distribution.manifest.list.v2+json",
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.docker.distribution.manifest.v2+json",
        )
    )
    response = requests.head(
        f"{registry.url}/v2/{repository}/manifests/{tag}", headers={"Accept": accept}, timeout=30
    )
    assert response.status_code == 200, (repository, response.status_code)
    return response.headers["Docker-Content-Digest"]


@pytest.mark.parametrize(
    "path",
    [
        "docker/{prefix}__one_1.tar",
        "docker/{prefix}__one_1.tar?layers=gzip",
        "ref/{prefix}/two:1.tar?format=oci",
        "bundle.tar?image={prefix}/one:1&image={prefix}/three:1&layers=gzip",
        "bundle.tar?image={prefix}/two:1&image={prefix}/multi:1&format=oci&all=1",
    ],
)
def test_checksums_are_those_of_the_bytes_sent_and_free_the_second_time(
    site: Site, tmp_path: Path, path: str
):
    url = f"{site.server.url}/{path.format(prefix=site.prefix)}"
    tar_url, _, query = url.partition("?")
    query = f"?{query}" if query else ""
    answers = {}
    for algorithm in ("sha256", "md5"):
        response = requests.get(f"{tar_url}.{algorithm}{query}", timeout=300)
        assert response.status_code == 200, response.text
        answers[algorithm] = response.text
    before = upstream_gets(site.server)
    assert requests.get(f"{tar_url}.md5{query}", timeout=60).text == answers["md5"]
    assert upstream_gets(site.server) == before, "the second checksum asked the registry"

    archive = tmp_path / "archive.tar"
    got = download(url, archive)
    # The name the archive is saved under (Content-Disposition), as sha256sum prints it.
    filename = got.headers["Content-Disposition"].split('filename="')[1].rstrip('"')
    for algorithm in ("sha256", "md5"):
        tool = subprocess.run(
            [f"{algorithm}sum", str(archive)], capture_output=True, text=True, check=True
        )
        expected = tool.stdout.split()[0]
        assert answers[algorithm] == f"{expected}  {filename}\n", (algorithm, path)


def test_a_streamed_archive_records_its_checksum(site: Site, tmp_path: Path):
    """A whole download records its digests on the way: the checksum needs no build."""
    records = site.cache / "checksums"
    before = set(records.iterdir()) if records.is_dir() else set()
    url = f"{site.server.url}/docker/{site.prefix}__three_1.tar?format=oci&layers=gzip"
    download(url, tmp_path / "three.tar")
    # Recorded once the last byte went out, a moment after the client has it.
    wait_until(lambda: len(set(records.iterdir()) - before) == 1, 10, "the checksum record")
    answer = requests.get(url.replace(".tar?", ".tar.md5?"), timeout=60)
    assert answer.status_code == 200
    assert answer.text.split()[0] == hashlib.md5((tmp_path / "three.tar").read_bytes()).hexdigest()
