"""The /v2 pull-through proxy with real clients: the rig's dockerd (its registry mirror,
and an alias reached as a registry of its own), containerd's `ctr` with a hosts.toml
mirror (which adds `?ns=`), podman and skopeo; a multi-platform index and zstd layers; and
the tar route and /v2 warming each other on one store.

Every image here is this test's own down to the last blob (a busybox layer carrying the
test's id, a random layer), so the counting FaultFront in front of the rig registry says
exactly how many upstream GETs each blob cost, whatever other tests pulled before. A pull
is proven by running the image and seeing its marker line; where a client could have
reached the registry without passthrough, the route is closed (dockerd's fallback is
registry-1.docker.io, unreachable here; ctr's server= is a dead port).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.e2e.helpers import check_archive, running_server
from tests.support.docker_engine import RUNC, DockerEngine
from tests.support.fronts import BLOB_PATH, FaultFront
from tests.support.images import (
    OCI_LAYER_ZSTD,
    Compression,
    Dir,
    Entry,
    File,
    Image,
    Index,
    Layer,
    ManifestKind,
    Symlink,
    build_image,
    build_index,
    busybox_bytes,
    make_layer,
    push_image,
    push_index,
    tar_layer,
)
from tests.support.loaders import podman_pull, skopeo, skopeo_copy
from tests.support.procs import LOOPBACK, free_port
from tests.support.registry import RegistryServer
from tests.support.relay import TcpRelay
from tests.support.server import PassthroughServer

pytestmark = pytest.mark.rig

# UPSTREAMS alias of the rig registry (through the counting front).
ALIAS = "lab"
CHUNK = 1 << 20


# --- images -----------------------------------------------------------------------------


def own_image(
    marker: str,
    *,
    kind: ManifestKind = "docker",
    compression: Compression = "gzip",
    architecture: str = "amd64",
    variant: str | None = None,
) -> Image:
    """A runnable busybox image none of whose blobs any other test has: its first layer
    carries /id = marker (so even the busybox layer's digest is this image's own), its
    second 128 KiB of random bytes. It prints `marker` only if /id reads back right."""

    def layer(entries: list[Entry], what: str) -> Layer:
        return make_layer(tar_layer(entries), compression, kind=kind, created_by=what)

    base = layer(
        [
            Dir("bin"),
            File("bin/busybox", busybox_bytes(), 0o755),
            Symlink("bin/sh", "busybox"),
            Dir("tmp", 0o1777),
            File("id", marker.encode()),
        ],
        "busybox and this image's id",
    )
    noise = layer([Dir("data"), File("data/random.bin", secrets.token_bytes(128 << 10))], "data")
    script = f'[ "$(/bin/busybox cat /id)" = {shlex.quote(marker)} ] && echo {shlex.quote(marker)}'
    return build_image(
        [base, noise],
        kind=kind,
        architecture=architecture,
        variant=variant,
        cmd=["/bin/sh", "-c", script],
        marker=marker,
    )


def own_index(marker: str) -> Index:
    """An OCI index (buildx-style, with attestations) of linux/amd64 and linux/arm64/v8
    images; each prints `<marker> <platform>`, only amd64 really runs here."""
    return build_index(
        [
            own_image(f"{marker} linux/amd64", kind="oci"),
            own_image(f"{marker} linux/arm64/v8", kind="oci", architecture="arm64", variant="v8"),
        ],
        kind="oci",
    )


def unique(prefix: str) -> str:
    return f"acc/{prefix}{secrets.token_hex(4)}"


def blob_gets(front: FaultFront) -> int:
    """Blob GETs the front has seen (any digest)."""
    return sum(1 for e in front.log if e.method == "GET" and BLOB_PATH.match(e.path))


def assert_fetched_once(front: FaultFront, image: Image | Index) -> None:
    """Every blob of the image went over the upstream link exactly once."""
    images = image.images if isinstance(image, Index) else (image,)
    counts = {d: front.count("GET", d) for i in images for d in i.blobs()}
    assert set(counts.values()) == {1}, counts


# --- servers ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def front(registry_anon: RegistryServer) -> Iterator[FaultFront]:
    """The rig registry as the module's passthrough server reaches it, counting."""
    with FaultFront(registry_anon) as front:
        yield front


def proxy_env(front: FaultFront, cache: Path) -> dict[str, str]:
    # REGISTRY_URL for dockerd's mirror requests (/v2/acc/x/...), the alias for names
    # that say where to go (/v2/lab/acc/x/..., and ctr's ?ns=<front host>).
    return {
        "REGISTRY_URL": front.url,
        "UPSTREAMS": f"{ALIAS}={front.url}",
        "CACHE_DIR": str(cache),
    }


@pytest.fixture(scope="module")
def proxy(
    tmp_path_factory: pytest.TempPathFactory, front: FaultFront
) -> Iterator[PassthroughServer]:
    """The module's passthrough server: two workers, so followers of a blob another process
    is fetching are exercised too."""
    env = proxy_env(front, tmp_path_factory.mktemp("v2-cache"))
    with running_server(tmp_path_factory, env, workers=2) as server:
        yield server
        # The module's log is long; a failure's cause is among the lines that are not
        # access-log lines of successful requests (pytest shows them for a failed test).
        print(f"--- passthrough server {server.url}: warnings, errors and failed requests ---")
        for line in server.log_text().splitlines():
            if not re.match(r'\S+ "[A-Z]+ [^"]*" [23]\d\d ', line):
                print(line)


@pytest.fixture
def mirror(docker_mirror: TcpRelay, proxy: PassthroughServer) -> Iterator[TcpRelay]:
    """The session dockerd's registry mirror, relaying to the module's server."""
    with docker_mirror.attached(LOOPBACK, proxy.port) as relay:
        yield relay


def host_of(server: PassthroughServer) -> str:
    return f"{LOOPBACK}:{server.port}"


def push(front: FaultFront, repository: str, image: Image | Index) -> None:
    """Straight into the registry (the front's counts stay about passthrough's reads)."""
    if isinstance(image, Index):
        push_index(front.registry.url, repository, "1.0", image)
    else:
        push_image(front.registry.url, repository, "1.0", image)


# --- docker -----------------------------------------------------------------------------


def docker_pull_and_run(engine: DockerEngine, ref: str, marker: str) -> dict[str, Any]:
    """`docker pull` then `docker run` (the marker must be a whole line of its output);
    returns `docker image inspect`. The image is removed afterwards."""
    engine.docker("pull", ref)
    try:
        run = engine.docker("run", "--rm", "--network", "none", ref, check=False)
        assert run.returncode == 0 and marker in run.stdout.splitlines(), (
            f"docker run {ref}: exit {run.returncode} {run.stdout!r} {run.stderr!r}"
        )
        inspect: dict[str, Any] = json.loads(engine.docker("image", "inspect", ref).stdout)[0]
        return inspect
    finally:
        engine.docker("rmi", "-f", ref, check=False)


def test_docker_pull_through_the_registry_mirror(
    docker_engine: DockerEngine, mirror: TcpRelay, front: FaultFront, proxy: PassthroughServer
) -> None:
    marker = f"v2-mirror-{secrets.token_hex(6)}"
    image = own_image(marker)
    name = unique("plain")
    push(front, name, image)
    relayed = mirror.connections

    # A docker.io name: dockerd asks its mirror for /v2/acc/plain…/manifests/1.0; were the
    # mirror to fail it would fall back to registry-1.docker.io, which is unreachable.
    inspect = docker_pull_and_run(docker_engine, f"{name}:1.0", marker)
    assert inspect["Id"] == image.config_digest
    assert inspect["RootFS"]["Layers"] == image.diff_ids
    assert f"{name}@{image.digest}" in inspect["RepoDigests"]
    assert mirror.connections > relayed
    assert_fetched_once(front, image)
    assert f"/v2/{name}/manifests/1.0" in proxy.log_text()

    # Again by digest, after the image was removed: the blobs come from the store.
    before = blob_gets(front)
    docker_pull_and_run(docker_engine, f"{name}@{image.digest}", marker)
    assert blob_gets(front) == before
    assert_fetched_once(front, image)


def test_docker_pull_of_an_official_name_through_the_mirror(
    docker_engine: DockerEngine, mirror: TcpRelay, front: FaultFront, proxy: PassthroughServer
) -> None:
    marker = f"v2-library-{secrets.token_hex(6)}"
    image = own_image(marker)
    short = f"v2lib{secrets.token_hex(4)}"
    push(front, f"library/{short}", image)

    # A one-component name is docker.io/library/<name>: the mirror sees /v2/library/….
    inspect = docker_pull_and_run(docker_engine, f"{short}:1.0", marker)
    assert inspect["Id"] == image.config_digest
    assert f"/v2/library/{short}/manifests/1.0" in proxy.log_text()
    assert_fetched_once(front, image)


def test_docker_pull_of_a_multi_platform_index_through_the_mirror(
    docker_engine: DockerEngine, mirror: TcpRelay, front: FaultFront
) -> None:
    marker = f"v2-index-{secrets.token_hex(6)}"
    index = own_index(marker)
    name = unique("multi")
    push(front, name, index)

    amd64 = index.image_for("linux", "amd64")
    inspect = docker_pull_and_run(docker_engine, f"{name}:1.0", f"{marker} linux/amd64")
    assert inspect["Id"] == amd64.config_digest
    # docker records the digest it pulled by: the index's.
    assert f"{name}@{index.digest}" in inspect["RepoDigests"]
    assert_fetched_once(front, amd64)
    arm64 = index.image_for("linux", "arm64", "v8")
    assert [front.count("GET", d) for d in arm64.blobs()] == [0] * len(arm64.blobs())


def test_docker_pull_through_an_alias(
    docker_engine: DockerEngine, front: FaultFront, proxy: PassthroughServer
) -> None:
    marker = f"v2-alias-{secrets.token_hex(6)}"
    image = own_image(marker)
    name = unique("plain")
    push(front, name, image)

    # passthrough as a registry of its own: loopback needs no TLS in docker.
    ref = f"{host_of(proxy)}/{ALIAS}/{name}"
    inspect = docker_pull_and_run(docker_engine, f"{ref}:1.0", marker)
    assert inspect["Id"] == image.config_digest
    assert inspect["RootFS"]["Layers"] == image.diff_ids
    assert f"{ref}@{image.digest}" in inspect["RepoDigests"]
    assert_fetched_once(front, image)


# --- containerd -------------------------------------------------------------------------


def ctr_hosts_dir(root: Path, registry_host: str, mirror_url: str) -> Path:
    """A --hosts-dir whose only way to `registry_host` is the mirror: server= is a port
    nobody listens on, so a pull that succeeds went through passthrough."""
    directory = root / "hosts"
    (directory / registry_host).mkdir(parents=True)
    (directory / registry_host / "hosts.toml").write_text(
        f'server = "http://{LOOPBACK}:{free_port()}"\n'
        "\n"
        f'[host."{mirror_url}"]\n'
        '  capabilities = ["pull", "resolve"]\n'
    )
    return directory


@pytest.fixture
def ctr_namespace(docker_engine: DockerEngine) -> Iterator[str]:
    """A containerd namespace of the test's own (dockerd's is "moby"), emptied after."""
    namespace = f"v2-{secrets.token_hex(4)}"
    yield namespace
    images = docker_engine.ctr(namespace, "images", "ls", "-q", check=False).stdout.split()
    if images:
        docker_engine.ctr(namespace, "images", "rm", "--sync", *images, check=False)
    docker_engine.ctr(namespace, "namespaces", "rm", namespace, check=False)


def ns_request_lines(server: PassthroughServer, name: str, registry_host: str) -> list[str]:
    """Access-log lines of containerd's manifest requests for `name` that carry
    ?ns=<registry_host>."""
    port = re.escape(registry_host.rpartition(":")[2])
    pattern = re.compile(
        rf"/v2/{re.escape(name)}/manifests/[^ ?]+\?(?:[^ ]*&)?ns=127\.0\.0\.1(?::|%3A){port}\b"
    )
    return [
        line
        for line in server.log_text().splitlines()
        if pattern.search(line) and '"containerd/' in line
    ]


@pytest.mark.parametrize("shape", ["image", "index"])
def test_ctr_pull_through_a_hosts_toml_mirror_and_run(
    shape: str,
    docker_engine: DockerEngine,
    ctr_namespace: str,
    front: FaultFront,
    proxy: PassthroughServer,
    tmp_path: Path,
) -> None:
    marker = f"v2-ctr-{secrets.token_hex(6)}"
    content: Image | Index = own_image(marker) if shape == "image" else own_index(marker)
    name = unique("ctr")
    push(front, name, content)
    hosts = ctr_hosts_dir(tmp_path, front.host, proxy.url)

    # The reference names the front's host; containerd asks the mirror with
    # ?ns=<front host>, which passthrough maps to the alias whose URL has that host.
    ref = f"{front.host}/{name}:1.0"
    pull = ["images", "pull", "--hosts-dir", str(hosts), "--snapshotter", "native"]
    if shape == "index":
        # Both platforms, not --all-platforms: ctr 1.6 would also try to unpack the
        # attestation manifests (unknown/unknown) and fail on their in-toto "layers".
        pull += ["--platform", "linux/amd64", "--platform", "linux/arm64/v8"]
    docker_engine.ctr(ctr_namespace, *pull, ref)
    check = docker_engine.ctr(ctr_namespace, "images", "check", "--snapshotter", "native")
    assert re.search(r"\bcomplete\b", check.stdout), check.stdout

    # The rig's containerd runs it with the runc the rig uses everywhere.
    container = f"c-{secrets.token_hex(4)}"
    run = docker_engine.ctr(
        ctr_namespace,
        "run",
        "--rm",
        "--snapshotter",
        "native",
        "--runc-binary",
        RUNC,
        ref,
        container,
    )
    expected = marker if shape == "image" else f"{marker} linux/amd64"
    assert expected in run.stdout.splitlines(), run.stdout

    assert ns_request_lines(proxy, name, front.host), proxy.log_text()[-3000:]
    # For the index the arm64 image's blobs came too: every blob, once.
    assert_fetched_once(front, content)
    assert content.digest in docker_engine.ctr(ctr_namespace, "images", "ls").stdout


# --- podman -----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["gzip", "zstd", "index"])
def test_podman_pull_through_an_alias_and_run(
    shape: str, front: FaultFront, proxy: PassthroughServer
) -> None:
    marker = f"v2-podman-{secrets.token_hex(6)}"
    content: Image | Index
    if shape == "index":
        content = own_index(marker)
        # podman picks the host's platform from the index.
        image = content.image_for("linux", "amd64")
    else:
        # zstd layers exist only in OCI manifests.
        kind: ManifestKind = "docker" if shape == "gzip" else "oci"
        compression: Compression = "gzip" if shape == "gzip" else "zstd"
        content = image = own_image(marker, kind=kind, compression=compression)
    name = unique("pod")
    push(front, name, content)

    pulled = podman_pull(f"{host_of(proxy)}/{ALIAS}/{name}:1.0", run_marker=image.marker)
    assert pulled.layers == image.diff_ids
    assert pulled.image_id == image.config_digest.removeprefix("sha256:")
    assert pulled.inspect["Digest"] == content.digest
    assert_fetched_once(front, image)


# --- skopeo -----------------------------------------------------------------------------


def oci_layout(directory: Path) -> tuple[str, set[str]]:
    """The one manifest an oci: layout's index.json names, and the digests of its blobs,
    each checked against its content."""
    index = json.loads((directory / "index.json").read_text())
    (entry,) = index["manifests"]
    found = set()
    for path in (directory / "blobs" / "sha256").iterdir():
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
        assert digest.hexdigest() == path.name, f"{path} does not hash to its name"
        found.add(f"sha256:{path.name}")
    return entry["digest"], found


def image_digests(image: Image) -> set[str]:
    return {image.digest, *image.blobs()}


def test_skopeo_copies_a_multi_platform_index_whole_and_one_platform(
    front: FaultFront, proxy: PassthroughServer, tmp_path: Path
) -> None:
    index = own_index(f"v2-skopeo-{secrets.token_hex(6)}")
    name = unique("multi")
    push(front, name, index)
    src = f"docker://{host_of(proxy)}/{ALIAS}/{name}:1.0"

    whole = tmp_path / "all"
    skopeo_copy(src, f"oci:{whole}:1.0", extra_args=["--all"])
    top, blobs = oci_layout(whole)
    assert top == index.digest
    expected = {index.digest}.union(*(image_digests(i) for i in index.manifests))
    assert blobs == expected
    assert (whole / "blobs" / "sha256" / index.digest[7:]).read_bytes() == index.manifest

    arm64 = index.image_for("linux", "arm64", "v8")
    one = tmp_path / "arm64"
    skopeo_copy(src, f"oci:{one}:1.0", platform=("linux", "arm64", "v8"))
    top, blobs = oci_layout(one)
    assert top == arm64.digest
    assert blobs == image_digests(arm64)
    # Two copies, one upstream GET per blob: the second came from the store.
    assert_fetched_once(front, index)


def test_skopeo_copies_zstd_layers_as_pushed(
    front: FaultFront, proxy: PassthroughServer, tmp_path: Path
) -> None:
    image = own_image(f"v2-zstd-{secrets.token_hex(6)}", kind="oci", compression="zstd")
    name = unique("zstd")
    push(front, name, image)

    dest = tmp_path / "zstd"
    skopeo_copy(f"docker://{host_of(proxy)}/{ALIAS}/{name}:1.0", f"oci:{dest}:1.0")
    top, blobs = oci_layout(dest)
    assert top == image.digest
    assert blobs == image_digests(image)
    manifest = json.loads((dest / "blobs" / "sha256" / image.digest[7:]).read_bytes())
    assert [layer["mediaType"] for layer in manifest["layers"]] == [OCI_LAYER_ZSTD] * 2
    assert_fetched_once(front, image)


def test_skopeo_inspect_and_list_tags_through_an_alias(
    front: FaultFront, proxy: PassthroughServer
) -> None:
    image = own_image(f"v2-inspect-{secrets.token_hex(6)}")
    name = unique("tags")
    push(front, name, image)
    push_image(front.registry.url, name, "2.0", image)
    repo = f"docker://{host_of(proxy)}/{ALIAS}/{name}"
    flags = ("--tls-verify=false", "--no-creds")

    raw = skopeo("inspect", "--raw", *flags, f"{repo}:1.0").stdout
    assert raw.encode() == image.manifest
    config = json.loads(skopeo("inspect", "--config", "--raw", *flags, f"{repo}:1.0").stdout)
    assert config == image.config_json
    tags = json.loads(skopeo("list-tags", *flags, repo).stdout)
    assert sorted(tags["Tags"]) == ["1.0", "2.0"]


# --- the tar route and /v2 on one store --------------------------------------------------


def download_tar(server: PassthroughServer, name: str, dest: Path) -> None:
    url = f"{server.url}/docker/{name.replace('/', '__')}_1.0.tar"
    with requests.Session() as session:
        session.trust_env = False
        with session.get(url, stream=True, timeout=120) as response, dest.open("wb") as out:
            assert response.status_code == 200, response.text[:500]
            for chunk in response.iter_content(CHUNK):
                out.write(chunk)


@pytest.fixture
def shared_store(
    passthrough_server: Callable[..., PassthroughServer], fault_front: FaultFront, tmp_path: Path
) -> PassthroughServer:
    """A server of the test's own: its own counting front and CACHE_DIR, which the tar
    route and /v2 share."""
    return passthrough_server(proxy_env(fault_front, tmp_path / "cache"))


def test_tar_download_after_a_docker_pull_costs_no_blob_get(
    docker_engine: DockerEngine,
    docker_mirror: TcpRelay,
    shared_store: PassthroughServer,
    fault_front: FaultFront,
    tmp_path: Path,
) -> None:
    marker = f"v2-warm-{secrets.token_hex(6)}"
    image = own_image(marker)
    name = unique("warm")
    push(fault_front, name, image)

    with docker_mirror.attached(LOOPBACK, shared_store.port):
        docker_pull_and_run(docker_engine, f"{name}:1.0", marker)
    assert_fetched_once(fault_front, image)
    before = blob_gets(fault_front)

    download_tar(shared_store, name, tmp_path / "after-pull.tar")
    check_archive(tmp_path / "after-pull.tar", image)
    assert blob_gets(fault_front) == before, fault_front.counts
    assert_fetched_once(fault_front, image)


def test_docker_pull_after_a_tar_download_costs_no_blob_get(
    docker_engine: DockerEngine,
    docker_mirror: TcpRelay,
    shared_store: PassthroughServer,
    fault_front: FaultFront,
    tmp_path: Path,
) -> None:
    marker = f"v2-warm-{secrets.token_hex(6)}"
    image = own_image(marker)
    name = unique("warm")
    push(fault_front, name, image)

    download_tar(shared_store, name, tmp_path / "first.tar")
    check_archive(tmp_path / "first.tar", image)
    assert_fetched_once(fault_front, image)
    before = blob_gets(fault_front)

    with docker_mirror.attached(LOOPBACK, shared_store.port):
        inspect = docker_pull_and_run(docker_engine, f"{name}:1.0", marker)
    assert inspect["RootFS"]["Layers"] == image.diff_ids
    assert blob_gets(fault_front) == before, fault_front.counts
    assert_fetched_once(fault_front, image)
