"""Real clients pushing into the hosted area and pulling out of it again: the rig's
dockerd (`docker login`, `docker push`, `docker pull`, `docker run`; loopback needs no
TLS), podman (`podman push`, then a pull and a run), skopeo (a multi-platform index with
`copy --all` in and out, digests unchanged), and the ORAS Python SDK pushing an artifact
whose `subject` the referrers API then lists (with the artifactType filter); and the tar
routes (`/docker/team__<app>_1.0.tar`, `/ref/team/<app>:1.0.tar`) reading what docker
pushed from the store.

Every client logs in as one of the server's htpasswd users and follows the Bearer
challenge to passthrough's token service for its push scope. Images come from the rig
registry (each test's own marker image), never from the hosted area itself, so what a
client pulls back is what another client pushed.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import oras.oci
import oras.provider
import pytest

from tests.e2e.helpers import download
from tests.e2e.hosted import (
    OCI_INDEX,
    OCI_MANIFEST,
    Hosted,
    hosted_server,
    image_manifest,
    push_blob,
)
from tests.support.docker_engine import DOCKER_CLI, DockerEngine
from tests.support.helpers import digest as digest_of
from tests.support.images import (
    multi_platform_index,
    push_image,
    push_index,
    runnable_image,
)
from tests.support.loaders import docker_load_and_run, podman_run, podman_store, skopeo
from tests.support.registry import RegistryServer

pytestmark = pytest.mark.rig


@pytest.fixture(scope="module")
def hosted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosted]:
    with hosted_server(tmp_path_factory.mktemp("hosted-clients"), patterns="team/**") as server:
        yield server


def mine(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(4)}"


class Docker:
    """The docker CLI against the rig's dockerd with a client config of the test's own
    (its login stays in it)."""

    def __init__(self, engine: DockerEngine, config: Path) -> None:
        self.engine = engine
        self.env = {**engine.env, "DOCKER_CONFIG": str(config)}
        config.mkdir(parents=True, exist_ok=True)
        (config / "config.json").write_text("{}")

    def __call__(
        self, *args: str, check: bool = True, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [DOCKER_CLI, *args],
            env=self.env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if check:
            assert proc.returncode == 0, f"docker {' '.join(args)}: {proc.stderr}{proc.stdout}"
        return proc


@pytest.fixture
def docker(docker_engine: DockerEngine, tmp_path: Path) -> Docker:
    return Docker(docker_engine, tmp_path / "docker-config")


def run_marker(docker: Docker, ref: str, marker: str) -> None:
    run = docker("run", "--rm", "--network", "none", ref, check=False)
    assert run.returncode == 0 and marker in run.stdout.splitlines(), (
        f"docker run {ref}: {run.returncode} {run.stdout!r} {run.stderr!r}"
    )


def manifest_of(hosted: Hosted, name: str, reference: str, accept: str) -> tuple[str, Any]:
    got = hosted.session().get(
        hosted.url(f"/v2/{name}/manifests/{reference}"), headers={"Accept": accept}, timeout=30
    )
    assert got.status_code == 200, got.text
    return got.headers["Docker-Content-Digest"], json.loads(got.content)


def test_docker_push_then_pull_run_and_the_tar_routes(
    docker: Docker, registry_anon: RegistryServer, hosted: Hosted, tmp_path: Path
) -> None:
    marker = mine("hosted-docker-")
    image = runnable_image(marker)
    source = f"acc/{mine('src')}"
    push_image(registry_anon.url, source, "1.0", image)
    app = mine("app")
    name = f"team/{app}"
    target = f"{hosted.host}/{name}:1.0"

    docker("pull", f"{registry_anon.host}/{source}:1.0")
    docker("tag", f"{registry_anon.host}/{source}:1.0", target)
    login = docker(
        "login", hosted.host, "-u", "alice", "--password-stdin", stdin=hosted.users["alice"]
    )
    assert "Login Succeeded" in login.stdout
    pushed = docker("push", target)
    digest, manifest = manifest_of(
        hosted, name, "1.0", "application/vnd.docker.distribution.manifest.v2+json"
    )
    assert digest in pushed.stdout
    assert manifest["config"]["digest"] == image.config_digest
    docker("rmi", "-f", target, f"{registry_anon.host}/{source}:1.0")

    # Back out of the hosted area: the image runs, it is the one pushed.
    docker("pull", target)
    try:
        run_marker(docker, target, marker)
        inspect = json.loads(docker("image", "inspect", target).stdout)[0]
        assert inspect["Id"] == image.config_digest
        assert f"{hosted.host}/{name}@{digest}" in inspect["RepoDigests"]
    finally:
        docker("rmi", "-f", target, check=False)

    # The tar routes read the hosted repository from the store; the archive names the
    # image by PUBLIC_URL's host.
    auth = ("alice", hosted.users["alice"])
    for route in (f"/docker/team__{app}_1.0.tar", f"/ref/{name}:1.0.tar"):
        archive = tmp_path / f"{route.rsplit('/', 1)[1]}"
        download(hosted.url(route), archive, auth=auth)
        run = docker_load_and_run(docker.engine.host, archive, target, marker=marker)
        assert run.image_id == image.config_digest
        assert run.layers == image.diff_ids


def test_a_wrong_password_pushes_nothing(docker: Docker, hosted: Hosted) -> None:
    """The users are real: docker login with a wrong password fails, and so does a push
    with it, whether as Basic straight to /v2 or through the token service."""
    bad = "not-" + secrets.token_hex(8)
    login = docker("login", hosted.host, "-u", "alice", "--password-stdin", stdin=bad, check=False)
    assert login.returncode != 0, login.stdout
    name = f"team/{mine('wrong')}"
    wrong = hosted.session(None)
    wrong.auth = ("alice", bad)
    answer = wrong.post(hosted.url(f"/v2/{name}/blobs/uploads/"), timeout=30)
    assert answer.status_code == 401, answer.text
    token = wrong.get(
        hosted.url("/v2/token"), params={"scope": f"repository:{name}:push"}, timeout=30
    )
    assert token.status_code == 401, token.text
    assert hosted.users["alice"] not in answer.text + token.text
    assert bad not in hosted.server.log_text()


def test_the_tar_routes_read_an_image_pushed_over_basic(
    docker_engine: DockerEngine, hosted: Hosted, tmp_path: Path
) -> None:
    """The tar routes without a docker push in between: blobs and manifest PUT with Basic
    credentials straight to /v2, then both routes' archives load and run."""
    marker = mine("hosted-tar-")
    image = runnable_image(marker)
    app = mine("tar")
    name = f"team/{app}"
    http = hosted.session()
    for blob in image.blobs().values():
        push_blob(http, hosted.public_url, name, blob.read())
    answer = http.put(
        hosted.url(f"/v2/{name}/manifests/1.0"),
        data=image.manifest,
        headers={"Content-Type": image.media_type},
        timeout=30,
    )
    assert answer.status_code == 201, answer.text
    auth = ("alice", hosted.users["alice"])
    for route in (f"/docker/team__{app}_1.0.tar", f"/ref/{name}:1.0.tar"):
        archive = tmp_path / route.rsplit("/", 1)[1]
        download(hosted.url(route), archive, auth=auth)
        run = docker_load_and_run(
            docker_engine.host, archive, f"{hosted.host}/{name}:1.0", marker=marker
        )
        assert run.image_id == image.config_digest and run.layers == image.diff_ids


def test_podman_push_then_pull_and_run(registry_anon: RegistryServer, hosted: Hosted) -> None:
    marker = mine("hosted-podman-")
    image = runnable_image(marker, kind="oci")
    source = f"{registry_anon.host}/acc/{mine('src')}:1.0"
    push_image(registry_anon.url, source.split("/", 1)[1].rsplit(":", 1)[0], "1.0", image)
    target = f"{hosted.host}/team/{mine('pod')}:1.0"
    creds = f"alice:{hosted.users['alice']}"

    with podman_store() as (podman, env):
        podman_run([*podman, "pull", "--quiet", "--tls-verify=false", source], env=env)
        podman_run([*podman, "tag", source, target], env=env)
        podman_run(
            [*podman, "push", "--quiet", "--tls-verify=false", "--creds", creds, target], env=env
        )
        podman_run([*podman, "rmi", "-f", source, target], env=env)
        podman_run(
            [*podman, "pull", "--quiet", "--tls-verify=false", "--creds", creds, target], env=env
        )
        inspect = json.loads(podman_run([*podman, "image", "inspect", target], env=env).stdout)[0]
        assert inspect["Id"] == image.config_digest.removeprefix("sha256:")
        assert inspect["RootFS"]["Layers"] == image.diff_ids
        run = podman_run(
            [
                *podman, "run", "--rm", "--network", "none", "--ulimit", "nofile=1024:1024",
                "--ulimit", "nproc=1024:1024", target,
            ],
            env=env,
            check=False,
        )  # fmt: skip
        assert run.returncode == 0 and marker in run.stdout.splitlines(), run.stderr


def test_skopeo_copies_an_index_into_hosted_and_out_unchanged(
    registry_anon: RegistryServer, hosted: Hosted, tmp_path: Path
) -> None:
    index = multi_platform_index(mine("hosted-skopeo-"))
    source = f"acc/{mine('multi')}"
    push_index(registry_anon.url, source, "1.0", index)
    name = f"team/{mine('sk')}"
    creds = f"alice:{hosted.users['alice']}"

    skopeo(
        # --preserve-digests: skopeo's blob-info cache may know another compressed variant
        # of a layer at this registry (the busybox layer podman pushed) and would put it in
        # the children instead, changing their digests.
        "copy", "--quiet", "--all", "--preserve-digests", "--src-tls-verify=false",
        "--src-no-creds", "--dest-tls-verify=false", "--dest-creds", creds,
        f"docker://{registry_anon.host}/{source}:1.0", f"docker://{hosted.host}/{name}:1.0",
    )  # fmt: skip
    digest, document = manifest_of(hosted, name, "1.0", OCI_INDEX)
    assert digest == index.digest
    assert {m["digest"] for m in document["manifests"]} == {
        m["digest"] for m in index.manifest_json["manifests"]
    }

    out = tmp_path / "out"
    skopeo(
        "copy", "--quiet", "--all", "--src-tls-verify=false", "--src-creds", creds,
        f"docker://{hosted.host}/{name}:1.0", f"oci:{out}:1.0",
    )  # fmt: skip
    layout = json.loads((out / "index.json").read_text())
    assert [m["digest"] for m in layout["manifests"]] == [index.digest]
    stored = {f"sha256:{p.name}" for p in (out / "blobs" / "sha256").iterdir()}
    expected = {index.digest, *index.blobs()}
    for child in index.manifests:
        expected.add(child.digest)
    assert expected <= stored
    for path in (out / "blobs" / "sha256").iterdir():
        assert digest_of(path.read_bytes()) == f"sha256:{path.name}"
    # One platform out again, as a client that wants only arm64 would take it.
    arm64 = index.image_for("linux", "arm64", "v8")
    one = tmp_path / "arm64"
    skopeo(
        "--override-os", "linux", "--override-arch", "arm64", "--override-variant", "v8",
        "copy", "--quiet", "--src-tls-verify=false", "--src-creds", creds,
        f"docker://{hosted.host}/{name}:1.0", f"oci:{one}:1.0",
    )  # fmt: skip
    (entry,) = json.loads((one / "index.json").read_text())["manifests"]
    assert entry["digest"] == arm64.digest


def push_subject(hosted: Hosted, name: str) -> tuple[str, int]:
    """A small image pushed with requests (Basic): the artifact's subject."""
    http = hosted.session()
    config, layer = (
        b'{"architecture":"amd64","os":"linux"}',
        b"subject layer " + secrets.token_bytes(8),
    )
    push_blob(http, hosted.public_url, name, config)
    push_blob(http, hosted.public_url, name, layer)
    body = image_manifest(config, [layer])
    answer = http.put(
        hosted.url(f"/v2/{name}/manifests/1.0"),
        data=body,
        headers={"Content-Type": OCI_MANIFEST},
        timeout=30,
    )
    assert answer.status_code == 201, answer.text
    return digest_of(body), len(body)


def test_oras_pushes_an_artifact_with_a_subject_and_referrers_list_it(
    hosted: Hosted, tmp_path: Path
) -> None:
    name = f"team/{mine('art')}"
    subject_digest, subject_size = push_subject(hosted, name)
    sbom = tmp_path / "sbom.spdx.json"
    sbom.write_text(json.dumps({"spdxVersion": "SPDX-2.3", "name": mine("sbom-")}))
    config = tmp_path / "config.json"
    config.write_text("{}")
    artifact_type = "application/vnd.example.sbom.config.v1+json"

    # Basic on every request: oras-py's token backend keeps the pull token of its first
    # HEAD after a 401 insufficient_scope and refreshes only on a 403.
    registry = oras.provider.Registry(hostname=hosted.host, insecure=True, auth_backend="basic")
    registry.session.trust_env = False
    registry.auth.set_basic_auth("alice", hosted.users["alice"])
    pushed = registry.push(
        target=f"{hosted.host}/{name}:sbom",
        files=[f"{sbom}:application/spdx+json"],
        manifest_config=f"{config}:{artifact_type}",
        subject=oras.oci.Subject(OCI_MANIFEST, subject_digest, subject_size),
        manifest_annotations={"org.example.kind": "sbom"},
        disable_path_validation=True,
        quiet=True,
    )
    assert pushed.status_code == 201, pushed.text
    assert pushed.headers["OCI-Subject"] == subject_digest
    artifact_digest = pushed.headers["Docker-Content-Digest"]

    http = hosted.session()
    listed = http.get(hosted.url(f"/v2/{name}/referrers/{subject_digest}"), timeout=30)
    assert listed.status_code == 200 and listed.headers["Content-Type"] == OCI_INDEX
    (entry,) = json.loads(listed.content)["manifests"]
    assert entry["digest"] == artifact_digest
    assert entry["artifactType"] == artifact_type
    assert entry["annotations"] == {"org.example.kind": "sbom"}
    filtered = http.get(
        hosted.url(f"/v2/{name}/referrers/{subject_digest}"),
        params={"artifactType": artifact_type},
        timeout=30,
    )
    assert [m["digest"] for m in json.loads(filtered.content)["manifests"]] == [artifact_digest]
    assert filtered.headers["OCI-Filters-Applied"] == "artifactType"
    other = http.get(
        hosted.url(f"/v2/{name}/referrers/{subject_digest}"),
        params={"artifactType": "application/vnd.example.other"},
        timeout=30,
    )
    assert json.loads(other.content)["manifests"] == []

    # And oras pulls the artifact back: the file as it was pushed.
    out = tmp_path / "pulled"
    files = registry.pull(target=f"{hosted.host}/{name}:sbom", outdir=str(out))
    assert [Path(f).read_bytes() for f in files] == [sbom.read_bytes()]
