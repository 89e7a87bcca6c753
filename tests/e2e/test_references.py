"""End to end: full references on the /ref/ routes (tags with underscores, pinned
digests, percent-encoded `:` and `@`), platform choice from multi-platform indexes
(`?platform=`, DEFAULT_PLATFORM) and the output options `?format=oci` and
`?layers=gzip`, each proven by loading and running the archive."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import requests

from tests.e2e.helpers import (
    CLIENT_AUTH_CHALLENGE,
    auth_of,
    download,
    encoded,
    fetch,
    load_and_run,
    member_bytes,
    member_json,
    members,
    one_line_error,
    push,
    running_server,
    unique,
)
from tests.support.helpers import digest as digest_of
from tests.support.helpers import sha256_hex
from tests.support.images import (
    ALL_EXTRAS,
    OCI_INDEX,
    OCI_MANIFEST,
    Image,
    Index,
    multi_platform_index,
    runnable_image,
)
from tests.support.loaders import skopeo_inspect_oci_archive
from tests.support.registry import BOB, RegistryServer
from tests.support.server import PassthroughServer

ARM64 = ("linux", "arm64")


@pytest.fixture(scope="module")
def anon_server(tmp_path_factory, registry_anon) -> Iterator[PassthroughServer]:
    with running_server(tmp_path_factory, {"REGISTRY_URL": registry_anon.url}) as server:
        yield server


@pytest.fixture(scope="module")
def arm_server(tmp_path_factory, registry_anon) -> Iterator[PassthroughServer]:
    env = {"REGISTRY_URL": registry_anon.url, "DEFAULT_PLATFORM": "linux/arm64"}
    with running_server(tmp_path_factory, env) as server:
        yield server


@dataclass(frozen=True)
class Images:
    marker: str
    multi_repo: str  # an OCI index (amd64, arm64/v8, attestations) tagged v1
    multi: Index
    amd_only_repo: str  # an index with only linux/amd64 (and its attestation)
    amd_only: Index
    ref_repo: str  # tagged v1_beta here and on the htpasswd registry
    ref: Image
    broken_repo: str  # its manifest's bytes were changed in storage
    broken: Image


REF_TAG = "v1_beta"


def _corrupt_manifest(registry: RegistryServer, image: Image) -> None:
    """Change one digit of a layer size in the stored manifest: still valid JSON of the
    same length, but no longer the content its digest names."""
    path = registry.blob_path(image.digest)
    raw = path.read_bytes()
    match = re.search(rb'"size":(\d+)', raw[raw.index(b'"layers"'):])
    assert match is not None
    at = raw.index(b'"layers"') + match.end() - 1
    changed = raw[:at] + str((int(raw[at:at + 1]) + 1) % 10).encode() + raw[at + 1:]
    json.loads(changed)
    assert len(changed) == len(raw) and changed != raw
    path.write_bytes(changed)


@pytest.fixture(scope="module")
def images(registry_anon, registry_basic) -> Images:
    marker = unique("multi-")
    team = unique("team")
    found = Images(
        marker=marker,
        multi_repo=f"{unique('plat')}/multi",
        multi=multi_platform_index(marker, kind="oci"),
        amd_only_repo=f"{unique('plat')}/amdonly",
        amd_only=multi_platform_index(unique("amd-"), platforms=(("linux", "amd64", None),)),
        ref_repo=f"{team}/api",
        ref=runnable_image(unique("ref-"), kind="oci", extras=("links",)),
        broken_repo=f"{team}/broken",
        broken=runnable_image(unique("broken-"), kind="oci"),
    )
    push(registry_anon, found.multi_repo, "v1", found.multi)
    push(registry_anon, found.amd_only_repo, "v1", found.amd_only)
    push(registry_anon, found.ref_repo, REF_TAG, found.ref)
    push(registry_basic, found.ref_repo, REF_TAG, found.ref)
    push(registry_anon, found.broken_repo, "v1", found.broken)
    _corrupt_manifest(registry_anon, found.broken)
    return found


def arm_marker(images: Images) -> str:
    """What the arm64 image prints: buildx names the platform linux/arm64/v8."""
    return f"{images.marker} linux/arm64/v8"


def multi_filename(images: Images) -> str:
    return images.multi_repo.replace("/", "_") + "_v1.tar"


# --- platforms --------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["docker", "ref", "ref-by-index-digest"])
@pytest.mark.parametrize("platform", ["linux/arm64", "linux/arm64/v8"])
def test_platform_query_picks_arm64(
    route, platform, images, anon_server, registry_anon, docker_host, tmp_path
):
    arm = images.multi.image_for(*ARM64)
    if route == "docker":
        path, tag = f"/docker/{multi_filename(images)}", "v1"
    elif route == "ref":
        path, tag = f"/ref/{images.multi_repo}:v1.tar", "v1"
    else:
        path = f"/ref/{images.multi_repo}@{images.multi.digest}.tar"
        tag = images.multi.digest.replace(":", "-")
    got = download(f"{anon_server.url}{path}?platform={platform}", tmp_path / "arm.tar")
    assert got.headers["Docker-Content-Digest"] == arm.digest
    expected = f"{registry_anon.host}/{images.multi_repo}:{tag}"
    run = load_and_run(docker_host, got.path, expected, arm, marker=arm_marker(images))
    assert run.inspect["Architecture"] == "arm64"
    assert run.inspect["Variant"] == "v8"
    assert run.inspect["Os"] == "linux"


def test_default_platform_from_the_environment(
    images, arm_server, registry_anon, docker_host, tmp_path
):
    expected = f"{registry_anon.host}/{images.multi_repo}:v1"
    url = f"{arm_server.url}/docker/{multi_filename(images)}"
    arm = images.multi.image_for(*ARM64)
    got = download(url, tmp_path / "arm.tar")
    run = load_and_run(docker_host, got.path, expected, arm, marker=arm_marker(images))
    assert run.inspect["Architecture"] == "arm64"
    # The query still wins over DEFAULT_PLATFORM.
    amd = images.multi.image_for("linux", "amd64")
    got = download(url + "?platform=linux/amd64", tmp_path / "amd.tar")
    run = load_and_run(docker_host, got.path, expected, amd, marker=f"{images.marker} linux/amd64")
    assert run.inspect["Architecture"] == "amd64"


def test_default_platform_is_amd64_without_the_environment(
    images, anon_server, registry_anon, docker_host, tmp_path
):
    amd = images.multi.image_for("linux", "amd64")
    got = download(f"{anon_server.url}/ref/{images.multi_repo}%3Av1.tar", tmp_path / "amd.tar")
    expected = f"{registry_anon.host}/{images.multi_repo}:v1"
    run = load_and_run(docker_host, got.path, expected, amd, marker=f"{images.marker} linux/amd64")
    assert run.inspect["Architecture"] == "amd64"


def test_a_platform_the_image_lacks_lists_the_ones_it_has(
    images, anon_server, arm_server, tmp_path
):
    url = f"{anon_server.url}/docker/{multi_filename(images)}?platform=linux/s390x"
    got = fetch(url, tmp_path / "s390x.tar")
    assert 400 <= got.status < 500, got.describe()
    line = one_line_error(got)
    assert "linux/amd64" in line and "linux/arm64" in line
    assert "unknown" not in line  # attestation manifests are not platforms
    # DEFAULT_PLATFORM=linux/arm64 and an index without arm64.
    amd_only = images.amd_only_repo.replace("/", "_") + "_v1.tar"
    got = fetch(f"{arm_server.url}/docker/{amd_only}", tmp_path / "amd-only.tar")
    assert 400 <= got.status < 500, got.describe()
    line = one_line_error(got)
    assert "linux/amd64" in line and "arm64" in line


# --- /ref/ with tags and digests --------------------------------------------------------

TAG_ROUTES = ["ref", "ref-encoded-colon", "registry-ref", "registry-ref-encoded",
              "registry-auth-ref"]


@pytest.mark.parametrize("route", TAG_ROUTES)
def test_ref_tag_with_underscores(
    route, images, anon_server, registry_anon, registry_basic, docker_host, tmp_path
):
    repo = images.ref_repo
    host, auth = registry_anon.host, None
    if route == "ref":
        path = f"/ref/{repo}:{REF_TAG}.tar"
    elif route == "ref-encoded-colon":
        path = f"/ref/{repo}%3A{REF_TAG}.tar"
    elif route == "registry-ref":
        path = f"/registry/http/{host}/ref/{repo}:{REF_TAG}.tar"
    elif route == "registry-ref-encoded":
        path = f"/registry/http/{encoded(host)}/ref/{repo}%3A{REF_TAG}.tar"
    else:
        host, auth = registry_basic.host, auth_of(BOB)
        path = f"/registry-auth/http/{host}/ref/{repo}:{REF_TAG}.tar"
    got = download(anon_server.url + path, tmp_path / "ref.tar", auth=auth)
    expected = f"{host}/{repo}:{REF_TAG}"
    assert got.headers["X-Image-Reference"] == expected
    load_and_run(docker_host, got.path, expected, images.ref)


DIGEST_ROUTES = ["at", "encoded-at", "encoded-at-and-colon", "registry-at",
                 "registry-auth-encoded-at", "tag-and-digest"]


@pytest.mark.parametrize("route", DIGEST_ROUTES)
def test_ref_digest(
    route, images, anon_server, registry_anon, registry_basic, docker_host, tmp_path
):
    repo, digest = images.ref_repo, images.ref.digest
    hexdigest = digest.split(":", 1)[1]
    host, auth, tag = registry_anon.host, None, f"sha256-{hexdigest}"
    if route == "at":
        path = f"/ref/{repo}@{digest}.tar"
    elif route == "encoded-at":
        path = f"/ref/{repo}%40{digest}.tar"
    elif route == "encoded-at-and-colon":
        path = f"/ref/{repo}%40sha256%3A{hexdigest}.tar"
    elif route == "registry-at":
        path = f"/registry/http/{encoded(host)}/ref/{repo}@{digest}.tar"
    elif route == "registry-auth-encoded-at":
        host, auth = registry_basic.host, auth_of(BOB)
        path = f"/registry-auth/http/{host}/ref/{repo}%40{digest}.tar"
    else:
        path, tag = f"/ref/{repo}:{REF_TAG}@{digest}.tar", REF_TAG
    got = download(anon_server.url + path, tmp_path / "digest.tar", auth=auth)
    assert got.headers["Docker-Content-Digest"] == digest
    expected = f"{host}/{repo}:{tag}"
    manifest = member_json(got.path, "manifest.json")
    assert manifest[0]["RepoTags"] == [expected]
    load_and_run(docker_host, got.path, expected, images.ref)


def test_index_digest_picks_amd64_and_names_it_by_the_index(
    images, anon_server, registry_anon, docker_host, tmp_path
):
    index = images.multi
    got = download(f"{anon_server.url}/ref/{images.multi_repo}@{index.digest}.tar",
                   tmp_path / "index.tar")
    amd = index.image_for("linux", "amd64")
    expected = f"{registry_anon.host}/{images.multi_repo}:{index.digest.replace(':', '-')}"
    load_and_run(docker_host, got.path, expected, amd, marker=f"{images.marker} linux/amd64")


@pytest.mark.parametrize("reference", ["tag", "digest"])
def test_registry_auth_ref_without_credentials_is_challenged(
    reference, images, anon_server, registry_basic, tmp_path
):
    ref = (f"{images.ref_repo}:{REF_TAG}" if reference == "tag"
           else f"{images.ref_repo}@{images.ref.digest}")
    url = f"{anon_server.url}/registry-auth/http/{registry_basic.host}/ref/{ref}.tar"
    got = fetch(url, tmp_path / "challenged.tar")
    one_line_error(got, 401)
    assert got.headers["WWW-Authenticate"] == CLIENT_AUTH_CHALLENGE


def test_digest_that_does_not_match_the_content_is_an_error(
    images, anon_server, registry_anon, tmp_path
):
    # The registry serves the changed bytes under the old digest; passthrough must check.
    digest = images.broken.digest
    with requests.Session() as plain:
        plain.trust_env = False  # loopback: no proxy from the environment
        served = plain.get(f"{registry_anon.url}/v2/{images.broken_repo}/manifests/{digest}",
                           headers={"Accept": OCI_MANIFEST}, timeout=30)
    assert served.status_code == 200
    assert digest_of(served.content) != digest
    url = f"{anon_server.url}/ref/{images.broken_repo}@{images.broken.digest}.tar"
    got = fetch(url, tmp_path / "broken.tar")
    assert got.status >= 400, got.describe()
    line = one_line_error(got)
    assert "digest" in line
    # A well-formed digest the repository does not have.
    missing = digest_of(b"no such manifest")
    got = fetch(f"{anon_server.url}/ref/{images.ref_repo}@{missing}.tar", tmp_path / "m.tar")
    one_line_error(got, 404)


# --- output options ---------------------------------------------------------------------


@dataclass(frozen=True)
class OciCase:
    repository: str
    tag: str
    image: Image
    query: str
    compressed: bool  # layers kept as the registry's gzip blobs


@pytest.fixture(scope="module")
def oci_cases(images, registry_anon) -> dict[str, OciCase]:
    namespace = unique("oci")
    zstd = runnable_image(unique("zstd-"), kind="oci", compression="zstd", extras=ALL_EXTRAS)
    gz = runnable_image(unique("gz-"), kind="docker", extras=ALL_EXTRAS, sh_link="hardlink")
    push(registry_anon, f"{namespace}/zstd", "v1", zstd)
    push(registry_anon, f"{namespace}/gz", "v1", gz)
    return {
        "oci-gzip-via-ref": OciCase(images.ref_repo, REF_TAG, images.ref, "format=oci", False),
        "oci-zstd-extras": OciCase(f"{namespace}/zstd", "v1", zstd, "format=oci", False),
        "docker-extras-gzip-layers": OciCase(f"{namespace}/gz", "v1", gz,
                                             "format=oci&layers=gzip", True),
    }


@pytest.mark.parametrize("case", ["oci-gzip-via-ref", "oci-zstd-extras",
                                  "docker-extras-gzip-layers"])
def test_oci_format(case, oci_cases, anon_server, registry_anon, docker_host, tmp_path):
    c = oci_cases[case]
    url = f"{anon_server.url}/ref/{c.repository}:{c.tag}.tar?{c.query}"
    got = download(url, tmp_path / "oci.tar")
    archive = got.path
    files = members(archive)

    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads(files["index.json"])
    assert index["schemaVersion"] == 2
    assert index.get("mediaType", OCI_INDEX) == OCI_INDEX
    (entry,) = index["manifests"]
    full_name = f"{registry_anon.host}/{c.repository}:{c.tag}"
    assert entry["annotations"]["io.containerd.image.name"] == full_name
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == c.tag
    blobs = {name: data for name, data in files.items() if name.startswith("blobs/")}
    assert blobs
    for name, data in blobs.items():
        assert name == "blobs/sha256/" + sha256_hex(data), name

    manifest_bytes = blobs["blobs/sha256/" + entry["digest"].split(":", 1)[1]]
    assert len(manifest_bytes) == entry["size"]
    oci_manifest = json.loads(manifest_bytes)
    assert oci_manifest.get("mediaType", OCI_MANIFEST) == OCI_MANIFEST
    assert oci_manifest["config"]["digest"] == c.image.config_digest
    expected_layers = ([layer.digest for layer in c.image.layers] if c.compressed
                       else c.image.diff_ids)
    assert [d["digest"] for d in oci_manifest["layers"]] == expected_layers
    for descriptor in oci_manifest["layers"]:
        assert len(blobs["blobs/sha256/" + descriptor["digest"].split(":", 1)[1]]) == (
            descriptor["size"])

    info = skopeo_inspect_oci_archive(archive)
    assert info["Digest"] == entry["digest"]
    assert info["Layers"] == expected_layers
    assert (info["Os"], info["Architecture"]) == ("linux", "amd64")
    load_and_run(docker_host, archive, full_name, c.image)


@pytest.mark.parametrize("case", ["docker-extras-gzip-layers", "oci-zstd-extras"])
def test_gzip_layers_load_and_run(case, oci_cases, anon_server, registry_anon, docker_host,
                                  tmp_path):
    c = oci_cases[case]
    url = f"{anon_server.url}/ref/{c.repository}%3A{c.tag}.tar?layers=gzip"
    got = download(url, tmp_path / "gzip.tar")
    manifest = member_json(got.path, "manifest.json")
    layers = manifest[0]["Layers"]
    assert len(layers) == len(c.image.layers)
    for name, layer in zip(layers, c.image.layers, strict=True):
        data = member_bytes(got.path, name)
        if layer.compression == "gzip":
            # The registry's blob, byte for byte.
            assert digest_of(data) == layer.digest, name
        else:
            # Only gzip blobs are kept; zstd ones are sent as the tar.
            assert digest_of(data) == layer.diff_id, name
    load_and_run(docker_host, got.path, f"{registry_anon.host}/{c.repository}:{c.tag}", c.image)
