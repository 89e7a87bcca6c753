"""The /v2 pull-through proxy in authenticated mode (PROXY_MODE=authenticated,
PUBLIC_URL, TOKEN_SECRET) in front of the rig's token-auth registry: passthrough is its
own token service, the credentials a client presents are its upstream identity, and a
client whose credentials cannot read a repository never gets its content, cached or
not. Real clients: skopeo (anonymous and --src-creds) and docker login + pull."""

from __future__ import annotations

import base64
import contextlib
import json
import random
import secrets
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import requests

from tests.e2e.v2proxy.rig import (
    API_VERSION,
    MANIFEST_ACCEPT,
    Answer,
    assert_manifest,
    call,
    check_pulled,
    spec_error,
)
from tests.support.docker_engine import DOCKER_CLI, DockerEngine
from tests.support.fronts import FaultFront
from tests.support.helpers import digest as digest_of
from tests.support.helpers import wait_until
from tests.support.images import File, Image, build_image, make_layer, push_image, tar_layer
from tests.support.loaders import LoaderError, skopeo_copy
from tests.support.procs import free_port
from tests.support.registry import ALICE, BOB, PUSHER, Credential
from tests.support.server import PassthroughServer

ServerFactory = Callable[..., PassthroughServer]
PUSH_AUTH = (PUSHER.username, PUSHER.password)


@pytest.fixture(scope="module")
def store_kind() -> str:
    """/v2 needs a store; the proxy's behaviour on both stores is test_v2_proxy's job."""
    return "filesystem"


@pytest.fixture(scope="module")
def image() -> Image:
    rng = random.Random(777)
    return build_image(
        [
            make_layer(tar_layer([File("data/a.bin", rng.randbytes(400_000))])),
            make_layer(tar_layer([File("data/b.bin", rng.randbytes(150_000))])),
        ]
    )


@dataclass
class Rig:
    server: PassthroughServer
    front: FaultFront
    public_url: str
    secret: str
    ttl: int = 300

    @property
    def host(self) -> str:
        return self.server.url.removeprefix("http://")

    @property
    def challenge(self) -> str:
        return f'Bearer realm="{self.public_url}/v2/token",service="passthrough"'

    def push(self, prefix: str, image: Image, tag: str = "v1") -> str:
        name = f"{prefix}/r{secrets.token_hex(5)}"
        push_image(self.front.registry.url, name, tag, image, auth=PUSH_AUTH)
        return name

    def token(self, scopes: list[str], credential: Credential | None = None, **params: str) -> str:
        query = urlencode(
            [("service", "passthrough"), *(("scope", s) for s in scopes), *params.items()]
        )
        headers = {} if credential is None else {"Authorization": basic(credential)}
        got = call(f"{self.server.url}/v2/token?{query}", headers=headers)
        assert got.status == 200, got.describe()
        assert "no-store" in got.headers.get("Cache-Control", "")
        answer = got.json()
        assert answer["token"] and answer["access_token"] == answer["token"]
        assert answer["expires_in"] == self.ttl
        return str(answer["token"])

    def get(
        self, path: str, authorization: str | None = None, method: str = "GET", **headers: str
    ) -> Answer:
        sent = {"Accept": MANIFEST_ACCEPT, **headers}
        if authorization is not None:
            sent["Authorization"] = authorization
        return call(f"{self.server.url}{path}", method, sent)


def basic(credential: Credential) -> str:
    raw = f"{credential.username}:{credential.password}".encode()
    return "Basic " + base64.b64encode(raw).decode()


def bearer(token: str) -> str:
    return f"Bearer {token}"


def pull_scope(name: str) -> str:
    return f"repository:{name}:pull"


@pytest.fixture
def start_rig(
    passthrough_server: ServerFactory, fault_front_token: FaultFront
) -> Callable[..., Rig]:
    def start(secret: str | None = None, env: Mapping[str, str] | None = None, **kw: Any) -> Rig:
        port = free_port()
        public_url = f"http://127.0.0.1:{port}"
        secret = secret or secrets.token_urlsafe(32)
        server = passthrough_server(
            {
                "REGISTRY_URL": fault_front_token.url,
                "PROXY_MODE": "authenticated",
                "PUBLIC_URL": public_url,
                "TOKEN_SECRET": secret,
                **(env or {}),
            },
            port=port,
            **kw,
        )
        ttl = int((env or {}).get("TOKEN_TTL", 300))
        return Rig(server, fault_front_token, public_url, secret, ttl)

    return start


@pytest.fixture
def rig(start_rig: Callable[..., Rig]) -> Rig:
    return start_rig()


def refused(answer: Answer, what: str, image: Image) -> None:
    """Not the content: 401/403/404 with a small body that holds none of it."""
    assert answer.status in (401, 403, 404), f"{what}: {answer.describe()}"
    assert len(answer.body) < 4096, what
    assert image.manifest not in answer.body and image.config not in answer.body, what
    for layer in image.layers:
        assert layer.read()[:64] not in answer.body, what
    assert "Docker-Content-Digest" not in answer.headers or answer.status != 200, what


def skopeo_pull(rig: Rig, ref: str, dest: Path, creds: Credential | None = None) -> Path:
    creds_arg = None if creds is None else (creds.username, creds.password)
    skopeo_copy(
        f"docker://{rig.host}/{ref}", f"dir:{dest}", src_tls_verify=False, src_creds=creds_arg
    )
    return dest


# --- the challenge and the token endpoint -------------------------------------------------


def test_v2_base_answers_a_bearer_challenge_from_public_url(rig: Rig) -> None:
    got = rig.get("/v2/")
    spec_error(got, 401, "UNAUTHORIZED")
    assert got.headers["WWW-Authenticate"] == rig.challenge
    assert got.headers["Docker-Distribution-API-Version"] == API_VERSION
    # The realm comes from PUBLIC_URL, never from what the client says its Host is.
    spoofed = rig.get("/v2/", Host="evil.example:443")
    assert spoofed.status == 401
    assert spoofed.headers["WWW-Authenticate"] == rig.challenge

    token = rig.token([])
    ok = rig.get("/v2/", bearer(token))
    assert ok.status == 200, ok.describe()
    assert ok.json() == {}


def test_requests_without_a_token_get_a_challenge_naming_the_scope(rig: Rig, image: Image) -> None:
    name = rig.push("public", image)
    for path in (
        f"/v2/{name}/manifests/v1",
        f"/v2/{name}/blobs/{image.config_digest}",
        f"/v2/{name}/tags/list",
    ):
        got = rig.get(path)
        spec_error(got, 401, "UNAUTHORIZED")
        challenge = got.headers["WWW-Authenticate"]
        assert challenge.startswith(rig.challenge), challenge
        assert f'scope="{pull_scope(name)}"' in challenge, challenge
        head = rig.get(path, method="HEAD")
        assert head.status == 401 and head.body == b""
        assert head.headers["WWW-Authenticate"] == challenge
    assert rig.front.count_manifest("GET", name, "v1") == 0, "an unauthorized request went upstream"


def test_bad_tokens_are_refused_and_replicas_share_the_key(
    start_rig: Callable[..., Rig], image: Image
) -> None:
    first = start_rig()
    name = first.push("public", image)
    token = first.token([pull_scope(name)])
    path = f"/v2/{name}/manifests/v1"
    assert_manifest(first.get(path, bearer(token)), image)

    tampered = token[:-6] + ("AAAAAA" if not token.endswith("AAAAAA") else "BBBBBB")
    for bad in (tampered, "not-a-token", token + "x"):
        got = first.get(path, bearer(bad))
        spec_error(got, 401, "UNAUTHORIZED")
        assert 'error="invalid_token"' in got.headers["WWW-Authenticate"]
        assert bad not in got.body.decode(errors="replace")

    # A token for another repository does not open this one.
    other = first.token([pull_scope(name + "-other")])
    spec_error(first.get(path, bearer(other)), (401, 403), "UNAUTHORIZED", "DENIED")

    # A replica with the same TOKEN_SECRET accepts the token; another secret does not.
    twin = start_rig(secret=first.secret)
    assert_manifest(twin.get(path, bearer(token)), image)
    stranger = start_rig()
    got = stranger.get(path, bearer(token))
    spec_error(got, 401, "UNAUTHORIZED")
    assert 'error="invalid_token"' in got.headers["WWW-Authenticate"]


def test_a_token_expires_after_token_ttl(start_rig: Callable[..., Rig]) -> None:
    rig = start_rig(env={"TOKEN_TTL": "10"})
    token = rig.token([])
    assert rig.get("/v2/", bearer(token)).status == 200
    wait_until(lambda: rig.get("/v2/", bearer(token)).status == 401, 40, "the token to expire")
    expired = rig.get("/v2/", bearer(token))
    spec_error(expired, 401, "UNAUTHORIZED")
    assert 'error="invalid_token"' in expired.headers["WWW-Authenticate"]


def test_the_identity_travels_in_the_token_to_another_replica(
    start_rig: Callable[..., Rig],
) -> None:
    """No shared session state: alice's token, issued by one replica, reads her private
    repository through another replica with the same TOKEN_SECRET."""
    first = start_rig()
    twin = start_rig(secret=first.secret)
    image = secret_image()
    name = first.push("private", image)
    token = bearer(first.token([pull_scope(name)], ALICE))
    assert_manifest(twin.get(f"/v2/{name}/manifests/v1", token), image)
    got = twin.get(f"/v2/{name}/blobs/{image.layers[0].digest}", token)
    assert (got.status, digest_of(got.body)) == (200, image.layers[0].digest), got.describe()
    # The token is opaque: alice's password is not readable in it.
    raw = token.removeprefix("Bearer ")
    assert ALICE.password not in raw
    padded = raw + "=" * (-len(raw) % 4)
    with contextlib.suppress(ValueError):
        assert ALICE.password.encode() not in base64.urlsafe_b64decode(padded)
    for server in (first.server, twin.server):
        assert ALICE.password not in server.log_text()
        assert raw not in server.log_text()


def test_the_token_endpoint_refuses_another_service_and_bad_scopes(rig: Rig) -> None:
    wrong = call(f"{rig.server.url}/v2/token?service=someone-else&scope=repository:a/b:pull")
    assert wrong.status == 400, wrong.describe()
    bad = call(f"{rig.server.url}/v2/token?service=passthrough&scope=repository")
    assert bad.status == 400, bad.describe()
    form = requests.post(
        f"{rig.server.url}/v2/token",
        data={
            "grant_type": "password",
            "service": "passthrough",
            "scope": "repository:alice/x:pull",
            "username": ALICE.username,
            "password": ALICE.password,
            "client_id": "test",
        },
        timeout=30,
    )
    assert form.status_code == 200, form.text
    assert form.json()["access_token"]


# --- public and private images ------------------------------------------------------------


def test_anonymous_clients_pull_public_images_through_the_token_flow(
    rig: Rig, image: Image, tmp_path: Path
) -> None:
    name = rig.push("public", image)
    token = rig.token([pull_scope(name)])
    assert_manifest(rig.get(f"/v2/{name}/manifests/v1", bearer(token)), image)
    by_digest = rig.get(f"/v2/{name}/manifests/{image.digest}", bearer(token))
    assert_manifest(by_digest, image)
    cache_control = by_digest.headers["Cache-Control"]
    assert "private" in cache_control and "public" not in cache_control, cache_control
    for layer in image.layers:
        got = rig.get(f"/v2/{name}/blobs/{layer.digest}", bearer(token))
        assert (got.status, digest_of(got.body)) == (200, layer.digest), got.describe()
        assert "private" in got.headers["Cache-Control"]
    # skopeo without credentials: /v2/ → 401 Bearer → anonymous token → pull.
    skopeo_pull(rig, f"{name}:v1", tmp_path / "anon")
    check_pulled(tmp_path / "anon", image)


def test_credentials_pull_private_images_with_skopeo_and_basic(
    rig: Rig, image: Image, tmp_path: Path
) -> None:
    name = rig.push("private", image)
    skopeo_pull(rig, f"{name}:v1", tmp_path / "alice", ALICE)
    check_pulled(tmp_path / "alice", image)
    # Basic straight to /v2 works too (clients that never ask for a token).
    assert_manifest(rig.get(f"/v2/{name}/manifests/v1", basic(ALICE)), image)
    token = rig.token([pull_scope(name)], ALICE)
    blob = rig.get(f"/v2/{name}/blobs/{image.layers[0].digest}", bearer(token))
    assert (blob.status, digest_of(blob.body)) == (200, image.layers[0].digest)

    with pytest.raises(LoaderError):
        skopeo_pull(rig, f"{name}:v1", tmp_path / "anon")
    with pytest.raises(LoaderError):
        skopeo_pull(rig, f"{name}:v1", tmp_path / "bob", BOB)

    # The password never reaches the log nor the store.
    assert ALICE.password not in rig.server.log_text()
    cache = Path(rig.server.overrides["CACHE_DIR"])
    for path in cache.rglob("*"):
        if path.is_file():
            assert ALICE.password.encode() not in path.read_bytes(), path
            assert base64.b64encode(f"alice:{ALICE.password}".encode()) not in path.read_bytes()


def secret_image() -> Image:
    """An image whose blobs are in no other repository of the shared registry."""
    return build_image(
        [make_layer(tar_layer([File("data/secret.bin", secrets.token_bytes(300_000))]))]
    )


def test_a_cached_private_repository_is_refused_to_clients_who_cannot_read_it(rig: Rig) -> None:
    image = secret_image()
    name = rig.push("private", image)
    alice = bearer(rig.token([pull_scope(name)], ALICE))
    # Alice warms the store: manifests by tag and digest, every blob.
    assert_manifest(rig.get(f"/v2/{name}/manifests/v1", alice), image)
    assert_manifest(rig.get(f"/v2/{name}/manifests/{image.digest}", alice), image)
    digests = [image.config_digest, *(layer.digest for layer in image.layers)]
    for digest in digests:
        got = rig.get(f"/v2/{name}/blobs/{digest}", alice)
        assert (got.status, digest_of(got.body)) == (200, digest), got.describe()

    outsiders = {
        "no credentials": None,
        "anonymous token": bearer(rig.token([pull_scope(name)])),
        "bob's token": bearer(rig.token([pull_scope(name)], BOB)),
        "bob's basic": basic(BOB),
        "a wrong password": basic(Credential(ALICE.username, "not-her-password")),
    }
    for who, authorization in outsiders.items():
        for method in ("GET", "HEAD"):
            for ref in ("v1", image.digest):
                got = rig.get(f"/v2/{name}/manifests/{ref}", authorization, method)
                refused(got, f"{who} {method} manifest {ref}", image)
            for digest in digests:
                got = rig.get(f"/v2/{name}/blobs/{digest}", authorization, method)
                refused(got, f"{who} {method} blob {digest[:19]}", image)
        ranged = rig.get(f"/v2/{name}/blobs/{digests[1]}", authorization, Range="bytes=0-99")
        refused(ranged, f"{who} Range", image)
        tags = rig.get(f"/v2/{name}/tags/list", authorization)
        assert tags.status in (401, 403, 404), f"{who} tags: {tags.describe()}"

    # Nor through a repository the client may read: the store is shared by digest, the
    # upstream's answer for that repository decides (distribution links blobs per repo).
    decoy = build_image([make_layer(tar_layer([File("decoy", b"nothing to see")]))])
    for who, prefix, credential in (("anonymous", "public", None), ("bob", "bob", BOB)):
        other = rig.push(prefix, decoy)
        token = bearer(rig.token([pull_scope(other)], credential))
        assert_manifest(rig.get(f"/v2/{other}/manifests/v1", token), decoy)
        for method in ("GET", "HEAD"):
            got = rig.get(f"/v2/{other}/manifests/{image.digest}", token, method)
            refused(got, f"{who} {method} the manifest through {other}", image)
            for digest in digests:
                got = rig.get(f"/v2/{other}/blobs/{digest}", token, method)
                refused(got, f"{who} {method} blob {digest[:19]} through {other}", image)

    # Alice still gets it, from the store (upstream only answers her HEAD).
    fetched = rig.front.count("GET", digests[1])
    got = rig.get(f"/v2/{name}/blobs/{digests[1]}", alice)
    assert (got.status, digest_of(got.body)) == (200, digests[1])
    assert rig.front.count("GET", digests[1]) == fetched


# --- docker -------------------------------------------------------------------------------


def _docker(engine: DockerEngine, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**engine.env, "DOCKER_CONFIG": str(config)}
    return subprocess.run(
        [DOCKER_CLI, *args], env=env, capture_output=True, text=True, timeout=300, check=False
    )


def test_docker_login_and_pull_a_private_image(
    rig: Rig, image: Image, docker_engine: DockerEngine, tmp_path: Path
) -> None:
    name = rig.push("private", image)
    config = tmp_path / "docker-config"
    config.mkdir()
    ref = f"{rig.host}/{name}:v1"
    # Without login, refused.
    anon = _docker(docker_engine, config, "pull", ref)
    assert anon.returncode != 0, anon.stdout
    login = subprocess.run(
        [DOCKER_CLI, "login", rig.host, "-u", ALICE.username, "--password-stdin"],
        input=ALICE.password,
        env={**docker_engine.env, "DOCKER_CONFIG": str(config)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert login.returncode == 0, login.stderr
    try:
        pulled = _docker(docker_engine, config, "pull", ref)
        assert pulled.returncode == 0, pulled.stderr
        inspect = _docker(docker_engine, config, "image", "inspect", ref)
        assert inspect.returncode == 0, inspect.stderr
        (info,) = json.loads(inspect.stdout)
        assert info["Id"] == image.config_digest
        assert info["RootFS"]["Layers"] == image.diff_ids
    finally:
        _docker(docker_engine, config, "rmi", "-f", ref)
    assert ALICE.password not in rig.server.log_text()
