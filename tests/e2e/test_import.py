"""Importing archives into a passthrough with no upstream: a `docker save` archive made
by the rig's dockerd and an OCI archive made by skopeo, each put into the hosted area
by `passthrough import` (the same store as the running server), then pulled by docker
from passthrough and run, and downloaded through the tar routes and `docker load`ed.
OCI input keeps its digests; a second import writes no object; a truncated archive and
one missing a blob are one line each, non-zero, with nothing stored; the upload
endpoint refuses anonymous clients (401) and users who may not push (403). On the S3
store (SeaweedFS) the command imports both kinds and a second run writes no object."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from passthrough.store import layout
from tests.e2e.helpers import download
from tests.e2e.hosted import Hosted, error_codes, hosted_server
from tests.e2e.test_hosted_clients import Docker, run_marker
from tests.support.archives import REF_NAME, docker_save_legacy, oci_archive, write_tar
from tests.support.docker_engine import DockerEngine
from tests.support.fixtures_matrix import s3_env
from tests.support.images import push_image, runnable_image
from tests.support.loaders import docker_load_and_run, skopeo
from tests.support.registry import RegistryServer
from tests.support.seaweed import SeaweedS3
from tests.support.server import REPO_ROOT, scrubbed_environment

pytestmark = pytest.mark.rig

ACCESS = """
rules:
  - repositories: ["team/**"]
    pull: ["*"]
    push: [alice]
"""


@pytest.fixture(scope="module")
def hosted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosted]:
    root = tmp_path_factory.mktemp("import")
    access = root / "access.yaml"
    access.write_text(ACCESS)
    with hosted_server(root, patterns="team/**", extra={"ACCESS_FILE": str(access)}) as server:
        yield server


@pytest.fixture
def docker(docker_engine: DockerEngine, tmp_path: Path, hosted: Hosted) -> Docker:
    client = Docker(docker_engine, tmp_path / "docker-config")
    client("login", hosted.host, "-u", "alice", "--password-stdin", stdin=hosted.users["alice"])
    return client


def mine(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(4)}"


def run_import(hosted: Hosted, *args: str) -> subprocess.CompletedProcess[str]:
    """``passthrough import`` with the server's settings (its store, its TMPDIR)."""
    env = scrubbed_environment()
    server = hosted.server
    env.update({"TMPDIR": str(server.tmpdir), "ENV_FILE": str(server.root / "no-such.env")})
    env.update(server.overrides)
    command = [str(Path(sys.executable).with_name("passthrough")), "import", *args]
    return subprocess.run(
        command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False
    )


def imported(hosted: Hosted, *args: str) -> dict[str, Any]:
    done = run_import(hosted, *args, "--json")
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def objects(hosted: Hosted) -> dict[str, tuple[int, int]]:
    """The store's objects (not its staging files or locks): size and mtime."""
    assert hosted.cache is not None
    skip = (hosted.cache / layout.STAGING_DIR, hosted.cache / layout.LOCK_DIR)
    return {
        str(path.relative_to(hosted.cache)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in hosted.cache.rglob("*")
        if path.is_file() and not any(path.is_relative_to(s) for s in skip)
    }


def pull_run_and_download(
    docker: Docker, hosted: Hosted, name: str, tag: str, marker: str, tmp_path: Path
) -> None:
    """docker pull from passthrough and run; the tar route downloaded, loaded and run."""
    target = f"{hosted.host}/{name}:{tag}"
    docker("pull", target)
    try:
        run_marker(docker, target, marker)
    finally:
        docker("rmi", "-f", target, check=False)
    archive = tmp_path / "route.tar"
    download(hosted.url(f"/ref/{name}:{tag}.tar"), archive, auth=("alice", hosted.users["alice"]))
    docker_load_and_run(docker.engine.host, archive, target, marker=marker)


def test_a_docker_save_archive(
    docker: Docker, registry_anon: RegistryServer, hosted: Hosted, tmp_path: Path
) -> None:
    marker = mine("import-docker-")
    image = runnable_image(marker, extras=("duplicate",))
    source = f"acc/{mine('save')}"
    push_image(registry_anon.url, source, "1.0", image)
    ref = f"{registry_anon.host}/{source}:1.0"
    docker("pull", ref)
    saved = tmp_path / "site.tar"
    docker("save", "-o", str(saved), ref)
    docker("rmi", "-f", ref)

    report = imported(hosted, str(saved), "--repository-prefix", "team/")
    name = f"team/{source}"
    assert [(i["repository"], i["tag"], i["kind"]) for i in report["images"]] == [
        (name, "1.0", "docker")
    ]
    manifest = hosted.session().get(hosted.url(f"/v2/{name}/manifests/1.0"), timeout=30).json()
    assert manifest["config"]["digest"] == image.config_digest  # the image id is kept
    pull_run_and_download(docker, hosted, name, "1.0", marker, tmp_path)

    before = objects(hosted)
    again = imported(hosted, str(saved), "--repository-prefix", "team/")
    assert (again["blobs_written"], again["manifests_written"], again["tags_written"]) == (0, 0, 0)
    assert objects(hosted) == before


def test_an_oci_archive_from_skopeo_keeps_its_digests(
    docker: Docker, registry_anon: RegistryServer, hosted: Hosted, tmp_path: Path
) -> None:
    marker = mine("import-oci-")
    source = f"acc/{mine('oci')}"
    pushed = push_image(registry_anon.url, source, "2.0", runnable_image(marker, kind="oci"))
    archive = tmp_path / "oci.tar"
    skopeo(
        "copy", "--quiet", "--src-tls-verify=false", "--src-no-creds",
        f"docker://{registry_anon.host}/{source}:2.0", f"oci-archive:{archive}:{source}:2.0",
    )  # fmt: skip

    report = imported(hosted, str(archive), "--repository-prefix", "team/")
    name = f"team/{source}"
    assert report["images"] == [
        {"repository": name, "tag": "2.0", "digest": pushed, "kind": "oci"}
    ]
    inspected = skopeo(
        "inspect", "--tls-verify=false", "--creds", f"alice:{hosted.users['alice']}",
        f"docker://{hosted.host}/{name}:2.0",
    )  # fmt: skip
    assert json.loads(inspected.stdout)["Digest"] == pushed
    pull_run_and_download(docker, hosted, name, "2.0", marker, tmp_path)

    before = objects(hosted)
    again = imported(hosted, str(archive), "--repository-prefix", "team/")
    assert again["blobs_written"] == 0 and again["blobs_present"] > 0
    assert objects(hosted) == before


def broken_archives(tmp_path: Path) -> tuple[Path, Path, str]:
    """A truncated archive and one missing a layer blob (and that blob's digest)."""
    image = runnable_image(mine("broken-"), kind="oci")
    files = {
        "oci-layout": b'{"imageLayoutVersion":"1.0.0"}',
        "index.json": json.dumps(
            {
                "schemaVersion": 2,
                "manifests": [
                    {
                        "mediaType": image.media_type,
                        "digest": image.digest,
                        "size": len(image.manifest),
                        "annotations": {"org.opencontainers.image.ref.name": "team/broken:1"},
                    }
                ],
            }
        ).encode(),
        "blobs/sha256/" + image.digest[7:]: image.manifest,
    }
    for blob_digest, blob in image.blobs().items():
        files["blobs/sha256/" + blob_digest[7:]] = blob.read()
    whole = write_tar(tmp_path / "whole.tar", files)
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    lost = image.layers[0].digest
    del files["blobs/sha256/" + lost[7:]]
    return truncated, write_tar(tmp_path / "missing.tar", files), lost


def test_a_broken_archive_is_one_line_and_stores_nothing(hosted: Hosted, tmp_path: Path) -> None:
    truncated, missing, lost = broken_archives(tmp_path)
    before = objects(hosted)
    for archive, named in ((truncated, "truncated"), (missing, f"blob {lost} is missing")):
        done = run_import(hosted, str(archive))
        assert done.returncode != 0
        assert len(done.stderr.strip().splitlines()) == 1 and named in done.stderr, done.stderr
    assert objects(hosted) == before
    with tarfile.open(missing) as tar:
        assert all(lost[7:] not in member.name for member in tar.getmembers())
    answer = hosted.session().get(hosted.url("/v2/team/broken/tags/list"), timeout=30)
    assert answer.status_code == 404


def test_the_upload_endpoint(
    registry_anon: RegistryServer, hosted: Hosted, tmp_path: Path
) -> None:
    image = runnable_image(mine("upload-"), kind="oci")
    source = f"acc/{mine('up')}"
    pushed = push_image(registry_anon.url, source, "3.0", image)
    archive = tmp_path / "up.tar"
    skopeo(
        "copy", "--quiet", "--src-tls-verify=false", "--src-no-creds",
        f"docker://{registry_anon.host}/{source}:3.0", f"oci-archive:{archive}:{source}:3.0",
    )  # fmt: skip
    url = hosted.url("/api/v1/import?repository-prefix=team/up/")

    anonymous = hosted.session(None).post(url, data=archive.read_bytes(), timeout=60)
    assert anonymous.status_code == 401 and error_codes(anonymous) == ["UNAUTHORIZED"]
    assert anonymous.headers["WWW-Authenticate"].startswith("Basic ")
    refused = hosted.session("bob").post(url, data=archive.read_bytes(), timeout=60)
    assert refused.status_code == 403 and error_codes(refused) == ["DENIED"], refused.text
    assert f"team/up/{source}" in refused.json()["errors"][0]["message"]
    broken, _, _ = broken_archives(tmp_path)
    bad = hosted.session().post(url, data=broken.read_bytes(), timeout=60)
    assert bad.status_code == 400 and error_codes(bad) == ["ARCHIVE_INVALID"], bad.text

    with archive.open("rb") as body:  # streamed, as curl -T sends it
        done = hosted.session().post(url, data=body, timeout=120)
    assert done.status_code == 201, done.text
    assert done.json()["images"] == [
        {"repository": f"team/up/{source}", "tag": "3.0", "digest": pushed, "kind": "oci"}
    ]
    got = hosted.session("bob").get(hosted.url(f"/v2/team/up/{source}/manifests/3.0"), timeout=30)
    assert got.status_code == 200 and got.headers["Docker-Content-Digest"] == pushed


def bucket_objects(seaweed: SeaweedS3, bucket: str, prefix: str) -> dict[str, tuple[int, str]]:
    """Every object under the prefix: size and ETag (a rewrite changes neither, but
    its LastModified: compared too)."""
    s3 = seaweed.client()
    found: dict[str, tuple[int, str]] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for entry in page.get("Contents", []):
            found[entry["Key"]] = (entry["Size"], f"{entry['ETag']} {entry['LastModified']}")
    return found


def test_the_command_on_the_s3_store(seaweed: SeaweedS3, s3_bucket: str, tmp_path: Path) -> None:
    """docker save layers compressed and OCI blobs copied into a bucket; a second import
    writes no object there."""
    settings = s3_env(seaweed, s3_bucket)
    env = {**scrubbed_environment(), **settings, "HOSTED_REPOSITORIES": "team/**"}
    env.update({"TMPDIR": str(tmp_path), "ENV_FILE": str(tmp_path / "none.env")})
    docker_image = runnable_image(mine("s3-docker-"))
    oci_image = runnable_image(mine("s3-oci-"), kind="oci")
    saved = docker_save_legacy(tmp_path / "save.tar", [(docker_image, ["app:1"])])
    archive = oci_archive(tmp_path / "oci.tar", [(oci_image, {REF_NAME: "team/oci:1"})])
    command = [str(Path(sys.executable).with_name("passthrough")), "import"]

    def run(*args: str) -> dict[str, Any]:
        done = subprocess.run(
            [*command, *args, "--json"], env=env, cwd=REPO_ROOT, capture_output=True,
            text=True, timeout=300, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        report: dict[str, Any] = json.loads(done.stdout)
        return report

    first = [run(str(saved), "--repository-prefix", "team"), run(str(archive))]
    assert [r["images"][0]["repository"] for r in first] == ["team/app", "team/oci"]
    assert first[1]["images"][0]["digest"] == oci_image.digest
    prefix = settings["S3_PREFIX"]
    before = bucket_objects(seaweed, s3_bucket, prefix)
    key = f"{prefix}manifests/sha256/{oci_image.digest[7:]}"
    body = seaweed.client().get_object(Bucket=s3_bucket, Key=key)["Body"].read()
    assert body == oci_image.manifest
    again = [run(str(saved), "--repository-prefix", "team"), run(str(archive))]
    assert all(r["blobs_written"] == 0 and r["tags_written"] == 0 for r in again)
    assert bucket_objects(seaweed, s3_bucket, prefix) == before
