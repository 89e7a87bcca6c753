"""PROXY_MODE=authenticated end to end: passthrough under gunicorn is its own token
service in front of the rig's token registry (public/* for anyone, private/* for alice
only), and real clients follow its Bearer challenge: skopeo (GET with Basic), dockerd
(`docker login`, then pulls, and anonymous pulls), containerd's ctr (the OAuth2 POST
form). The credentials a client gives passthrough are the ones upstream sees, they
never reach a log, and a token from one replica works on another that shares
TOKEN_SECRET but not on one with another secret."""

from __future__ import annotations

import base64
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.e2e.helpers import auth_of, push, unique
from tests.support.docker_engine import DOCKER_CLI, DockerEngine
from tests.support.images import Image, runnable_image
from tests.support.loaders import LoaderError, skopeo
from tests.support.procs import LOOPBACK, free_port
from tests.support.registry import ALICE, BOB, RegistryServer
from tests.support.server import PassthroughServer
from tests.support.token_issuer import TokenIssuer

SECRET = "e2e token secret shared by the replicas"
MANIFEST_TYPES = ", ".join(
    [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)


@dataclass(frozen=True)
class Pushed:
    repository: str
    tag: str
    image: Image
    digest: str


@dataclass(frozen=True)
class Images:
    public: Pushed
    private: Pushed


@pytest.fixture(scope="module")
def images(registry_token: RegistryServer) -> Images:
    def one(repository: str, marker: str) -> Pushed:
        image = runnable_image(marker)
        return Pushed(repository, "v1", image, push(registry_token, repository, "v1", image))

    return Images(
        one(f"public/{unique('tok')}", unique("MARKER-public-")),
        one(f"private/{unique('tok')}", unique("MARKER-private-")),
    )


def fresh_private(registry: RegistryServer) -> Pushed:
    """A private image no other test pulled: its scope is new, so passthrough must ask
    upstream for a token (a cached upstream token would hide whose credentials it used)."""
    image = runnable_image(unique("MARKER-fresh-"))
    repository = f"private/{unique('fresh')}"
    return Pushed(repository, "v1", image, push(registry, repository, "v1", image))


def start_authenticated(
    tmp_path_factory: pytest.TempPathFactory,
    registry: RegistryServer,
    secret: str = SECRET,
    workers: int = 2,
) -> tuple[PassthroughServer, str]:
    """A server in authenticated mode; returns it and the address clients use, which is
    its PUBLIC_URL. gunicorn binds that port besides the one PassthroughServer picks (its
    --bind appends), because the realm must be known before the server starts."""
    public_port = free_port()
    public_url = f"http://{LOOPBACK}:{public_port}"
    root = tmp_path_factory.mktemp("passthrough-auth")
    server = PassthroughServer(
        {
            "REGISTRY_URL": registry.url,
            "CACHE_DIR": str(root / "cache"),
            "PROXY_MODE": "authenticated",
            "PUBLIC_URL": public_url,
            "TOKEN_SECRET": secret,
            "TOKEN_TTL": "120",
        },
        workers=workers,
        tmp_root=root,
        extra_args=("--bind", f"{LOOPBACK}:{public_port}"),
    )
    server.start()
    return server, public_url


@pytest.fixture(scope="module")
def authenticated(
    tmp_path_factory: pytest.TempPathFactory, registry_token: RegistryServer
) -> Iterator[tuple[PassthroughServer, str]]:
    server, public_url = start_authenticated(tmp_path_factory, registry_token)
    try:
        yield server, public_url
    finally:
        server.stop()
        log = server.log_text()
        print(f"--- passthrough server {server.url} log (last 60 lines) ---")
        print("\n".join(log.splitlines()[-60:]))


@pytest.fixture
def server(authenticated: tuple[PassthroughServer, str]) -> PassthroughServer:
    return authenticated[0]


@pytest.fixture
def public(authenticated: tuple[PassthroughServer, str]) -> str:
    """host:port of the server as clients name it."""
    return authenticated[1].removeprefix("http://")


def assert_no_secret_in(text: str) -> None:
    for credential in (ALICE, BOB):
        assert credential.password not in text


def scopes_asked_by(issuer: TokenIssuer, user: str | None) -> list[str]:
    return [s for r in issuer.requests if r.user == user for s in r.scopes]


# -- the challenge and the token endpoint over HTTP ------------------------------------------


def test_the_challenge_names_public_url_not_the_host(server, public):
    answer = requests.get(f"http://{public}/v2/", headers={"Host": "attacker.example"}, timeout=30)
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"] == (
        f'Bearer realm="http://{public}/v2/token",service="passthrough"'
    )
    assert answer.json()["errors"][0]["code"] == "UNAUTHORIZED"
    token = requests.get(f"http://{public}/v2/token?service=passthrough", timeout=30).json()
    assert token["expires_in"] == 120
    bearer = {"Authorization": f"Bearer {token['token']}"}
    # Every request lands on one of two workers: each verifies the other's tokens.
    for _ in range(8):
        assert requests.get(f"{server.url}/v2/", headers=bearer, timeout=30).status_code == 200


# -- skopeo: GET /v2/token with Basic --------------------------------------------------------


def skopeo_inspect(reference: str, creds: tuple[str, str] | None) -> dict[str, object]:
    args = ["inspect", "--tls-verify=false", "--raw"]
    args += ["--creds", ":".join(creds)] if creds else ["--no-creds"]
    return dict(json.loads(skopeo(*args, f"docker://{reference}").stdout))


def test_skopeo_with_credentials_pulls_private_as_that_user(
    server, public, registry_token, token_issuer, tmp_path
):
    private = fresh_private(registry_token)
    reference = f"{public}/{private.repository}:{private.tag}"
    manifest = skopeo_inspect(reference, auth_of(ALICE))
    assert manifest["config"]["digest"] == private.image.config_blob.digest  # type: ignore[index]
    # Upstream saw alice: the token passthrough issued carried her credentials.
    assert f"repository:{private.repository}:pull" in scopes_asked_by(token_issuer, "alice")

    copied = tmp_path / "copied"
    skopeo(
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        "--src-creds",
        ":".join(auth_of(ALICE)),
        f"docker://{reference}",
        f"dir:{copied}",
    )
    for layer in private.image.layers:
        assert (copied / layer.digest.removeprefix("sha256:")).read_bytes() == layer.read()
    assert_no_secret_in(server.log_text())


@pytest.mark.parametrize("creds", [None, auth_of(BOB)], ids=["anonymous", "bob"])
def test_skopeo_without_the_right_credentials_gets_no_private_image(server, public, images, creds):
    private = images.private
    with pytest.raises(LoaderError):
        skopeo_inspect(f"{public}/{private.repository}:{private.tag}", creds)
    assert_no_secret_in(server.log_text())


def test_skopeo_anonymous_pulls_public(public, images, token_issuer):
    pushed = images.public
    manifest = skopeo_inspect(f"{public}/{pushed.repository}:{pushed.tag}", None)
    assert manifest["config"]["digest"] == pushed.image.config_blob.digest  # type: ignore[index]
    assert f"repository:{pushed.repository}:pull" in scopes_asked_by(token_issuer, None)


# -- dockerd: docker login, then pulls -------------------------------------------------------


def docker(docker_host: str, config: Path, *args: str, stdin: str | None = None):
    # A client config of this test's own: docker login writes credentials there.
    env = {**os.environ, "DOCKER_HOST": docker_host, "DOCKER_CONFIG": str(config)}
    env.pop("DOCKER_CONTEXT", None)
    return subprocess.run(
        [DOCKER_CLI, *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def test_docker_login_and_pull(server, public, images, docker_engine: DockerEngine, tmp_path):
    config = tmp_path / "docker-config"
    config.mkdir()
    private, pushed = images.private, images.public
    private_ref = f"{public}/{private.repository}:{private.tag}"
    public_ref = f"{public}/{pushed.repository}:{pushed.tag}"
    try:
        # Anonymous: dockerd follows the Bearer challenge without credentials.
        pulled = docker(docker_engine.host, config, "pull", public_ref)
        assert pulled.returncode == 0, pulled.stderr
        denied = docker(docker_engine.host, config, "pull", private_ref)
        assert denied.returncode != 0

        login = docker(
            docker_engine.host,
            config,
            "login",
            public,
            "-u",
            ALICE.username,
            "--password-stdin",
            stdin=ALICE.password,
        )
        assert login.returncode == 0, login.stderr
        assert "Login Succeeded" in login.stdout
        pulled = docker(docker_engine.host, config, "pull", private_ref)
        assert pulled.returncode == 0, pulled.stderr
        inspected = docker(
            docker_engine.host,
            config,
            "image",
            "inspect",
            "-f",
            "{{json .RootFS.Layers}}",
            private_ref,
        )
        assert json.loads(inspected.stdout) == private.image.diff_ids
        ran = docker(docker_engine.host, config, "run", "--rm", "--network", "none", private_ref)
        assert ran.returncode == 0, ran.stderr
        assert private.image.marker in ran.stdout.splitlines()
    finally:
        docker(docker_engine.host, config, "rmi", "-f", private_ref, public_ref)
    assert_no_secret_in(server.log_text())


class MirrorEngine(DockerEngine):
    """A dockerd of its own whose daemon.json names passthrough as its Docker Hub mirror
    (the session's engine must stay mirror-free for the other tests)."""

    def __init__(self, mirror: str) -> None:
        super().__init__()
        self.mirror_config = self.base / "mirror-daemon.json"
        self.mirror_config.write_text(json.dumps({"registry-mirrors": [mirror]}))

    @property
    def dockerd_argv(self) -> list[str]:
        argv = super().dockerd_argv
        return [
            f"--config-file={self.mirror_config}" if a.startswith("--config-file=") else a
            for a in argv
        ]


def hub_credentials(config: Path, username: str, password: str) -> None:
    """A client config logged in to Docker Hub (written, since the rig has no Hub): the
    docker CLI sends these with every docker.io pull, and dockerd offers them to the
    mirror's token service."""
    auth = base64.b64encode(f"{username}:{password}".encode()).decode()
    config.mkdir(exist_ok=True)
    (config / "config.json").write_text(
        json.dumps({"auths": {"https://index.docker.io/v1/": {"auth": auth}}})
    )


def test_dockerd_mirror_anonymous_and_with_hub_credentials(
    authenticated, registry_token, images, token_issuer, tmp_path
):
    server, public_url = authenticated
    private = fresh_private(registry_token)
    with MirrorEngine(public_url) as engine:
        anonymous = tmp_path / "anonymous"
        anonymous.mkdir()
        (anonymous / "config.json").write_text("{}")
        # No credentials: dockerd follows the Bearer challenge anonymously (with a Basic
        # one it would drop the mirror and go to Docker Hub, which the rig cannot reach).
        name = f"{images.public.repository}:{images.public.tag}"
        pulled = docker(engine.host, anonymous, "pull", name)
        assert pulled.returncode == 0, pulled.stderr + engine.logs()
        assert f"GET /v2/{images.public.repository}/manifests/" in server.log_text()
        denied = docker(engine.host, anonymous, "pull", f"{private.repository}:{private.tag}")
        assert denied.returncode != 0

        logged_in = tmp_path / "hub"
        hub_credentials(logged_in, ALICE.username, ALICE.password)
        pulled = docker(engine.host, logged_in, "pull", f"{private.repository}:{private.tag}")
        assert pulled.returncode == 0, pulled.stderr + engine.logs()
        inspected = docker(
            engine.host,
            logged_in,
            "image",
            "inspect",
            "-f",
            "{{json .RootFS.Layers}}",
            f"{private.repository}:{private.tag}",
        )
        assert json.loads(inspected.stdout) == private.image.diff_ids
    # Upstream saw alice: her Hub credentials went through passthrough's token.
    assert f"repository:{private.repository}:pull" in scopes_asked_by(token_issuer, "alice")
    assert_no_secret_in(server.log_text())


# -- containerd: the OAuth2 POST form --------------------------------------------------------


def test_ctr_fetch_with_credentials_posts_the_form(
    server, public, registry_token, docker_engine: DockerEngine, token_issuer
):
    private = fresh_private(registry_token)
    reference = f"{public}/{private.repository}:{private.tag}"
    ctr = ["ctr", "--address", str(docker_engine.containerd_sock), "--namespace", "pt-tokens"]
    fetched = subprocess.run(
        [*ctr, "content", "fetch", "--plain-http", "--user", ":".join(auth_of(ALICE)), reference],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert fetched.returncode == 0, fetched.stderr
    log = server.log_text()
    assert '"POST /v2/token HTTP/1.1" 200' in log
    assert f"repository:{private.repository}:pull" in scopes_asked_by(token_issuer, "alice")
    assert_no_secret_in(log)
    subprocess.run([*ctr, "images", "rm", reference], capture_output=True, timeout=60, check=False)


# -- replicas --------------------------------------------------------------------------------


def test_a_token_works_on_every_replica_sharing_the_secret(
    tmp_path_factory, registry_token, images
):
    private = images.private
    first, first_url = start_authenticated(tmp_path_factory, registry_token, workers=1)
    replica, _ = start_authenticated(tmp_path_factory, registry_token, workers=1)
    foreign, _ = start_authenticated(
        tmp_path_factory, registry_token, secret=SECRET + " but another", workers=1
    )
    try:
        answer = requests.get(
            f"{first_url}/v2/token",
            params={"service": "passthrough", "scope": f"repository:{private.repository}:pull"},
            auth=auth_of(ALICE),
            timeout=30,
        )
        assert answer.status_code == 200
        assert answer.headers["Cache-Control"] == "no-store"
        token = answer.json()["token"]
        assert ALICE.password not in token
        path = f"/v2/{private.repository}/manifests/{private.tag}"
        headers = {"Authorization": f"Bearer {token}", "Accept": MANIFEST_TYPES}
        served = requests.get(f"{replica.url}{path}", headers=headers, timeout=60)
        assert served.status_code == 200, served.text
        assert served.headers["Docker-Content-Digest"] == private.digest
        refused = requests.get(f"{foreign.url}{path}", headers=headers, timeout=60)
        assert refused.status_code == 401
        assert 'error="invalid_token"' in refused.headers["WWW-Authenticate"]
        for each in (first, replica, foreign):
            assert_no_secret_in(each.log_text())
            assert token not in each.log_text()
    finally:
        for each in (first, replica, foreign):
            each.cleanup()
