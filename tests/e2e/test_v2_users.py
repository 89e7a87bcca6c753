"""passthrough's own users end to end: gunicorn with HTPASSWD_FILE (made by Debian's
htpasswd -B), ACCESS_FILE, PUBLIC_URL, TOKEN_SECRET and HOSTED_REPOSITORIES in front of
the rig's anonymous registry (transparent mode). `docker login` through the token
service against the rig's dockerd, right and wrong password; a dockerd with
passthrough as its Docker Hub mirror and no credentials still pulls and runs a proxied
image; curl with Basic straight to /v2; failed logins rate limited (429) and counted in
/metrics; a non-bcrypt entry stops start-up naming the line; no password or hash in
the log."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.e2e.helpers import push, unique
from tests.e2e.test_v2_tokens import MirrorEngine, docker, fresh_private, scopes_asked_by
from tests.support.docker_engine import DockerEngine
from tests.support.helpers import wait_until
from tests.support.htpasswd import bcrypt_line, htpasswd
from tests.support.images import Image, runnable_image
from tests.support.loaders import LoaderError, skopeo
from tests.support.procs import LOOPBACK, StartupError, free_port
from tests.support.registry import ALICE as UPSTREAM_ALICE
from tests.support.registry import BOB as UPSTREAM_BOB
from tests.support.registry import RegistryServer
from tests.support.server import PassthroughServer
from tests.support.token_issuer import TokenIssuer

SECRET = "e2e secret for passthrough's own users"
CURL = "/usr/bin/curl"


@dataclass(frozen=True)
class User:
    name: str
    password: str


ALICE = User("alice", "alice-hosted-pw-4Kd")
BOB = User("bob", "bob-hosted-pw-8Wq")
CAROL = User("carol", "carol-hosted-pw-2Rt")
USERS = (ALICE, BOB, CAROL)
ACCESS = """\
groups:
  builders: [alice, bob]
rules:
  - repositories: ["team/*"]
    pull: ["@builders"]
    push: [alice]
    delete: [alice]
  - repositories: ["apps/**"]
    pull: ["*", anonymous]
    push: ["@builders"]
"""


@dataclass(frozen=True)
class Rig:
    server: PassthroughServer
    public: str  # host:port, as clients name the server (PUBLIC_URL)
    files: Path
    cache: Path


def write_users(root: Path) -> Path:
    # Debian's own htpasswd: cost 5 (its default) for alice, the least for the others.
    lines = [htpasswd("-B", ALICE.name, ALICE.password)]
    lines += [bcrypt_line(u.name, u.password) for u in (BOB, CAROL)]
    path = root / "htpasswd"
    path.write_text("\n".join(lines) + "\n")
    return path


def start(
    tmp_path_factory: pytest.TempPathFactory,
    registry: RegistryServer,
    workers: int = 2,
    **env: str,
) -> tuple[PassthroughServer, str, Path]:
    root = tmp_path_factory.mktemp("passthrough-users")
    (root / "access.yaml").write_text(ACCESS)
    env.setdefault("CACHE_DIR", str(root / "cache"))
    public_port = free_port()
    public_url = f"http://{LOOPBACK}:{public_port}"
    server = PassthroughServer(
        {
            "REGISTRY_URL": registry.url,
            "PUBLIC_URL": public_url,
            "TOKEN_SECRET": SECRET,
            "HTPASSWD_FILE": str(write_users(root)),
            "ACCESS_FILE": str(root / "access.yaml"),
            "HOSTED_REPOSITORIES": "team/*,apps/**",
            **env,
        },
        workers=workers,
        tmp_root=root,
        # Clients use PUBLIC_URL's port; PassthroughServer binds its own besides.
        extra_args=("--bind", f"{LOOPBACK}:{public_port}"),
    )
    server.start()
    return server, public_url.removeprefix("http://"), root


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, registry_anon: RegistryServer) -> Iterator[Rig]:
    server, public, root = start(tmp_path_factory, registry_anon)
    try:
        yield Rig(server, public, root, root / "cache")
    finally:
        server.stop()
        print(f"--- passthrough server {server.url} log (last 80 lines) ---")
        print("\n".join(server.log_text().splitlines()[-80:]))


@dataclass(frozen=True)
class Proxied:
    repository: str
    tag: str
    image: Image


@pytest.fixture(scope="module")
def proxied(registry_anon: RegistryServer) -> Proxied:
    image = runnable_image(unique("MARKER-users-"))
    repository = f"lab/{unique('users')}"
    push(registry_anon, repository, "v1", image)
    return Proxied(repository, "v1", image)


def assert_no_secret_in(text: str, files: Path) -> None:
    for user in USERS:
        assert user.password not in text
    for line in (files / "htpasswd").read_text().splitlines():
        assert line.split(":", 1)[1] not in text


def curl(*args: str) -> tuple[int, dict[str, str], str]:
    """curl's status, headers (lowercased names) and body."""
    done = subprocess.run(
        [CURL, "-sS", "-D", "-", *args], capture_output=True, text=True, timeout=120, check=True
    )
    # text=True reads CRLF as LF.
    head, _, body = done.stdout.partition("\n\n")
    status_line, *header_lines = head.split("\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def metric(server: PassthroughServer, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"{server.url}/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


# -- docker login ----------------------------------------------------------------------------


def test_docker_login_right_and_wrong_password(rig, docker_engine: DockerEngine, tmp_path):
    config = tmp_path / "docker-config"
    config.mkdir()
    before = metric(rig.server, "passthrough_login_failures_total", reason="wrong_password")
    wrong = docker(
        docker_engine.host,
        config,
        "login",
        rig.public,
        "-u",
        ALICE.name,
        "--password-stdin",
        stdin="not-" + ALICE.password,
    )
    assert wrong.returncode != 0
    assert "unauthorized" in (wrong.stderr + wrong.stdout).lower()
    assert (
        not (config / "config.json").exists()
        or rig.public not in (config / "config.json").read_text()
    )
    after = metric(rig.server, "passthrough_login_failures_total", reason="wrong_password")
    assert after >= before + 1

    right = docker(
        docker_engine.host,
        config,
        "login",
        rig.public,
        "-u",
        ALICE.name,
        "--password-stdin",
        stdin=ALICE.password,
    )
    assert right.returncode == 0, right.stderr
    assert "Login Succeeded" in right.stdout
    assert rig.public in (config / "config.json").read_text()

    unknown = docker(
        docker_engine.host,
        config,
        "login",
        rig.public,
        "-u",
        "mallory",
        "--password-stdin",
        stdin="whatever-pw",
    )
    assert unknown.returncode != 0
    assert_no_secret_in(rig.server.log_text(), rig.files)
    # The refusal names no user (the access log has docker's ?account=, a user name
    # that docker itself puts in the URL).
    refusals = [line for line in rig.server.log_text().splitlines() if "login refused" in line]
    assert refusals and not any("mallory" in line or "alice" in line for line in refusals)


def test_docker_pulls_a_proxied_image_anonymously_and_logged_in(
    rig, proxied, docker_engine: DockerEngine, tmp_path
):
    reference = f"{rig.public}/{proxied.repository}:{proxied.tag}"
    anonymous = tmp_path / "anonymous"
    anonymous.mkdir()
    try:
        pulled = docker(docker_engine.host, anonymous, "pull", reference)
        assert pulled.returncode == 0, pulled.stderr
        logged_in = tmp_path / "logged-in"
        logged_in.mkdir()
        login = docker(
            docker_engine.host,
            logged_in,
            "login",
            rig.public,
            "-u",
            BOB.name,
            "--password-stdin",
            stdin=BOB.password,
        )
        assert login.returncode == 0, login.stderr
        docker(docker_engine.host, logged_in, "rmi", "-f", reference)
        pulled = docker(docker_engine.host, logged_in, "pull", reference)
        assert pulled.returncode == 0, pulled.stderr
        ran = docker(docker_engine.host, logged_in, "run", "--rm", "--network", "none", reference)
        assert ran.returncode == 0, ran.stderr
        assert proxied.image.marker in ran.stdout.splitlines()
    finally:
        docker(docker_engine.host, anonymous, "rmi", "-f", reference)


# -- a dockerd mirror with no credentials ---------------------------------------------------------


def test_an_anonymous_dockerd_mirror_still_pulls_proxied_images(rig, proxied, tmp_path):
    with MirrorEngine(f"http://{rig.public}") as engine:
        config = tmp_path / "anonymous"
        config.mkdir()
        (config / "config.json").write_text("{}")
        name = f"{proxied.repository}:{proxied.tag}"
        pulled = docker(engine.host, config, "pull", name)
        assert pulled.returncode == 0, pulled.stderr + engine.logs()
        ran = docker(engine.host, config, "run", "--rm", "--network", "none", name)
        assert ran.returncode == 0, ran.stderr + engine.logs()
        assert proxied.image.marker in ran.stdout.splitlines()
        layers = docker(
            engine.host, config, "image", "inspect", "-f", "{{json .RootFS.Layers}}", name
        )
        assert json.loads(layers.stdout) == proxied.image.diff_ids
    # Through passthrough (the mirror), anonymously: the token asked for no user.
    log = rig.server.log_text()
    assert f"HEAD /v2/{proxied.repository}/manifests/{proxied.tag}" in log


# -- curl with Basic -------------------------------------------------------------------------------


def test_curl_with_basic_straight_to_v2(rig, proxied):
    base = f"http://{rig.public}"
    status, headers, _ = curl(f"{base}/v2/")
    assert status == 401
    assert headers["www-authenticate"] == (f'Bearer realm="{base}/v2/token",service="passthrough"')
    status, _, body = curl("-u", f"{CAROL.name}:{CAROL.password}", f"{base}/v2/")
    assert (status, body) == (200, "{}")
    status, headers, body = curl("-u", f"{CAROL.name}:wrong", f"{base}/v2/")
    assert status == 401
    assert json.loads(body)["errors"][0]["code"] == "UNAUTHORIZED"
    assert headers["www-authenticate"].startswith(f'Bearer realm="{base}/v2/token"')

    # Proxied names: anonymous pulls need no login in transparent mode; a user's Basic
    # is checked.
    manifest = f"{base}/v2/{proxied.repository}/manifests/{proxied.tag}"
    accept = "Accept: application/vnd.docker.distribution.manifest.v2+json"
    status, headers, _ = curl("-H", accept, manifest)
    assert status == 200
    assert headers["docker-content-digest"].startswith("sha256:")
    status, _, _ = curl("-H", accept, "-u", f"{BOB.name}:{BOB.password}", manifest)
    assert status == 200
    status, _, _ = curl("-H", accept, "-u", f"{BOB.name}:nope", manifest)
    assert status == 401

    # A hosted name without a login: the challenge for the scope.
    status, headers, _ = curl(f"{base}/v2/team/app/tags/list")
    assert status == 401
    assert 'scope="repository:team/app:pull"' in headers["www-authenticate"]
    # carol may not pull team/* by ACCESS_FILE.
    status, _, body = curl("-u", f"{CAROL.name}:{CAROL.password}", f"{base}/v2/team/app/tags/list")
    assert status == 403
    assert json.loads(body)["errors"][0]["code"] == "DENIED"
    assert_no_secret_in(rig.server.log_text(), rig.files)


def test_failed_logins_are_rate_limited_and_counted(tmp_path_factory, registry_anon):
    # A server of its own, one worker: the limit is per worker process.
    server, public, root = start(tmp_path_factory, registry_anon, workers=1)
    try:
        base = f"http://{public}"
        for _ in range(10):
            status, _, _ = curl("-u", f"{ALICE.name}:guess", f"{base}/v2/")
            assert status == 401
        # The right password too: the address is refused before any check.
        status, headers, body = curl("-u", f"{ALICE.name}:{ALICE.password}", f"{base}/v2/")
        assert status == 429
        assert 1 <= int(headers["retry-after"]) <= 60
        assert json.loads(body)["errors"][0]["code"] == "TOOMANYREQUESTS"
        token = requests.get(f"{base}/v2/token", auth=(ALICE.name, ALICE.password), timeout=30)
        assert token.status_code == 429
        assert metric(server, "passthrough_login_failures_total", reason="wrong_password") == 10
        assert metric(server, "passthrough_login_failures_total", reason="rate_limited") == 2
        assert_no_secret_in(server.log_text(), root)
    finally:
        server.stop()


def test_behind_a_trusted_proxy_the_limit_and_the_log_follow_the_forwarded_client(
    tmp_path_factory, registry_anon
):
    # The rig's loopback plays the ingress: its X-Forwarded-For names the clients.
    server, public, root = start(
        tmp_path_factory, registry_anon, workers=1, TRUSTED_PROXIES="127.0.0.0/8"
    )
    try:
        base = f"http://{public}"
        mallory = ("-H", "X-Forwarded-For: 198.51.100.66")
        for _ in range(10):
            status, _, _ = curl(*mallory, "-u", f"{ALICE.name}:guess", f"{base}/v2/")
            assert status == 401
        status, _, _ = curl(*mallory, "-u", f"{ALICE.name}:{ALICE.password}", f"{base}/v2/")
        assert status == 429
        # A header the client wrote itself, to the left of what the proxy appended.
        spoof = ("-H", "X-Forwarded-For: 192.0.2.1, 198.51.100.66")
        status, _, _ = curl(*spoof, "-u", f"{ALICE.name}:{ALICE.password}", f"{base}/v2/")
        assert status == 429
        # Everyone else behind the same proxy still logs in.
        other = ("-H", "X-Forwarded-For: 198.51.100.7")
        status, _, _ = curl(*other, "-u", f"{ALICE.name}:{ALICE.password}", f"{base}/v2/")
        assert status == 200
        # gunicorn logs a request once its response is sent: curl may be done before
        # the last line is written.
        wait_until(
            lambda: '\n198.51.100.7 "GET /v2/' in "\n" + server.log_text(),
            10,
            "the access log line of the last request",
        )
        log = server.log_text()
        assert "login refused (wrong_password) from 198.51.100.66" in log
        # gunicorn's access log reads the same environ: the client, not the proxy.
        access = [line for line in log.splitlines() if '"GET /v2/ HTTP/1.1"' in line]
        assert access and all(" 127.0.0.1 " not in f" {line} " for line in access), access
        assert any("198.51.100.7" in line and '" 200 ' in line for line in access), access
        assert_no_secret_in(log, root)
    finally:
        server.stop()


def test_a_non_bcrypt_user_stops_start_up_naming_the_line(tmp_path, registry_anon):
    weak = htpasswd("-m", "mallory", "md5-pw")
    users = tmp_path / "htpasswd"
    users.write_text(bcrypt_line("alice", "a") + "\n" + weak + "\n")
    server = PassthroughServer(
        {
            "REGISTRY_URL": registry_anon.url,
            "CACHE_DIR": str(tmp_path / "cache"),
            "PUBLIC_URL": "http://127.0.0.1:1",
            "TOKEN_SECRET": SECRET,
            "HTPASSWD_FILE": str(users),
        },
        tmp_root=tmp_path,
        startup_timeout=20,
    )
    with pytest.raises(StartupError) as caught:
        server.start()
    message = str(caught.value)
    assert "HTPASSWD_FILE line 2: user 'mallory' has a MD5 ($apr1$) password" in message
    assert weak.split(":", 1)[1] not in message
    server.cleanup()


# -- pushes (the hosted core) --------------------------------------------------------------------


def login(engine: DockerEngine, config: Path, public: str, user: User) -> None:
    config.mkdir(exist_ok=True)
    done = docker(
        engine.host,
        config,
        "login",
        public,
        "-u",
        user.name,
        "--password-stdin",
        stdin=user.password,
    )
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def local_image(rig, proxied, docker_engine: DockerEngine, tmp_path_factory) -> Iterator[str]:
    """The proxied image pulled into the rig's dockerd: what the push tests push."""
    config = tmp_path_factory.mktemp("pull-config")
    reference = f"{rig.public}/{proxied.repository}:{proxied.tag}"
    pulled = docker(docker_engine.host, config, "pull", reference)
    assert pulled.returncode == 0, pulled.stderr
    yield reference
    docker(docker_engine.host, config, "rmi", "-f", reference)


def push_as(
    engine: DockerEngine, config: Path, source: str, target: str
) -> subprocess.CompletedProcess[str]:
    tagged = docker(engine.host, config, "tag", source, target)
    assert tagged.returncode == 0, tagged.stderr
    try:
        pushed: subprocess.CompletedProcess[str] = docker(engine.host, config, "push", target)
        return pushed
    finally:
        docker(engine.host, config, "rmi", target)


def test_docker_push_by_an_allowed_user_then_pull_by_another(
    rig, proxied, local_image, docker_engine: DockerEngine, tmp_path
):
    target = f"{rig.public}/team/{unique('app')}:v1"
    alice = tmp_path / "alice"
    login(docker_engine, alice, rig.public, ALICE)
    pushed = push_as(docker_engine, alice, local_image, target)
    assert pushed.returncode == 0, pushed.stderr + pushed.stdout
    assert "digest: sha256:" in pushed.stdout

    # bob pulls it (builders pull team/*) and runs it; the layers are the proxied image's.
    bob = tmp_path / "bob"
    login(docker_engine, bob, rig.public, BOB)
    try:
        pulled = docker(docker_engine.host, bob, "pull", target)
        assert pulled.returncode == 0, pulled.stderr
        ran = docker(docker_engine.host, bob, "run", "--rm", "--network", "none", target)
        assert ran.returncode == 0, ran.stderr
        assert proxied.image.marker in ran.stdout.splitlines()
    finally:
        docker(docker_engine.host, bob, "rmi", "-f", target)
    # The tar routes serve it to the same users, Basic as on /v2.
    name, tag = target.removeprefix(f"{rig.public}/").split(":")
    archive = f"http://{rig.public}/ref/{name}:{tag}.tar"
    status, _, _ = curl(
        "-o", str(tmp_path / "bob.tar"), "-u", f"{BOB.name}:{BOB.password}", archive
    )
    assert status == 200 and (tmp_path / "bob.tar").stat().st_size > 1000
    status, headers, _ = curl("-o", "/dev/null", archive)
    assert status == 401 and headers["www-authenticate"].startswith("Basic ")
    status, _, _ = curl("-o", "/dev/null", "-u", f"{CAROL.name}:{CAROL.password}", archive)
    assert status == 403
    # carol may not pull team/*.
    carol = tmp_path / "carol"
    login(docker_engine, carol, rig.public, CAROL)
    refused = docker(docker_engine.host, carol, "pull", target)
    assert refused.returncode != 0
    assert_no_secret_in(rig.server.log_text(), rig.files)


def test_a_push_the_rules_refuse_is_403_denied(rig, local_image, docker_engine, tmp_path):
    # bob may pull team/* but only alice pushes there.
    bob = tmp_path / "bob"
    login(docker_engine, bob, rig.public, BOB)
    target = f"{rig.public}/team/{unique('nope')}:v1"
    refused = push_as(docker_engine, bob, local_image, target)
    assert refused.returncode != 0
    assert "denied" in refused.stderr.lower(), refused.stderr
    base = f"http://{rig.public}"
    status, _, body = curl(
        "-X", "POST", "-u", f"{BOB.name}:{BOB.password}", f"{base}/v2/team/x/blobs/uploads/"
    )
    assert status == 403
    error = json.loads(body)["errors"][0]
    assert error["code"] == "DENIED" and "may not push" in error["message"]
    # A push to a proxied name: DENIED, naming where pushes go.
    status, _, body = curl(
        "-X", "POST", "-u", f"{ALICE.name}:{ALICE.password}", f"{base}/v2/library/x/blobs/uploads/"
    )
    assert status == 403
    message = json.loads(body)["errors"][0]["message"]
    assert "is not a hosted repository" in message and "team/*, apps/**" in message


def test_an_anonymous_push_is_401(rig, local_image, docker_engine, tmp_path):
    base = f"http://{rig.public}"
    status, headers, body = curl("-X", "POST", f"{base}/v2/team/x/blobs/uploads/")
    assert status == 401
    assert headers["www-authenticate"] == (
        f'Bearer realm="{base}/v2/token",service="passthrough",scope="repository:team/x:pull,push"'
    )
    assert json.loads(body)["errors"][0]["code"] == "UNAUTHORIZED"
    anonymous = tmp_path / "anonymous"
    anonymous.mkdir()
    refused = push_as(docker_engine, anonymous, local_image, f"{rig.public}/apps/{unique('a')}:v1")
    assert refused.returncode != 0
    assert "unauthorized" in refused.stderr.lower() or "denied" in refused.stderr.lower()


def test_hosted_anonymous_pull(
    rig, local_image, docker_engine, tmp_path_factory, registry_anon, tmp_path
):
    alice = tmp_path / "alice"
    login(docker_engine, alice, rig.public, ALICE)
    app, team = f"apps/{unique('open')}/site", f"team/{unique('closed')}"
    for name in (app, team):
        pushed = push_as(docker_engine, alice, local_image, f"{rig.public}/{name}:v1")
        assert pushed.returncode == 0, pushed.stderr
    accept = "Accept: application/vnd.docker.distribution.manifest.v2+json"
    # Off (the rig): anonymous clients pull no hosted name, whatever ACCESS_FILE says.
    status, _, _ = curl("-H", accept, f"http://{rig.public}/v2/{app}/manifests/v1")
    assert status == 401
    # On, over the same store: apps/** (anonymous in ACCESS_FILE) yes, team/* no.
    server, public, _ = start(
        tmp_path_factory,
        registry_anon,
        workers=1,
        HOSTED_ANONYMOUS_PULL="true",
        CACHE_DIR=str(rig.cache),
    )
    try:
        anonymous = tmp_path / "anonymous"
        anonymous.mkdir()
        pulled = docker(docker_engine.host, anonymous, "pull", f"{public}/{app}:v1")
        assert pulled.returncode == 0, pulled.stderr
        docker(docker_engine.host, anonymous, "rmi", "-f", f"{public}/{app}:v1")
        status, _, _ = curl("-H", accept, f"http://{public}/v2/{app}/manifests/v1")
        assert status == 200
        status, headers, _ = curl("-H", accept, f"http://{public}/v2/{team}/manifests/v1")
        assert status == 401
        assert f'scope="repository:{team}:pull"' in headers["www-authenticate"]
        refused = docker(docker_engine.host, anonymous, "pull", f"{public}/{team}:v1")
        assert refused.returncode != 0
    finally:
        server.stop()


# -- PROXY_MODE=authenticated: one client, upstream and passthrough credentials ---------------


BUILDER = User("builder", "builder-hosted-pw-6Yh")


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory, registry_token: RegistryServer) -> Iterator[Rig]:
    """Authenticated mode over the rig's token registry (upstream users alice and bob).
    passthrough's users: builder (no upstream account) and bob with his upstream
    password (one login that works on both sides)."""
    root = tmp_path_factory.mktemp("passthrough-both")
    users = root / "htpasswd"
    users.write_text(
        bcrypt_line(BUILDER.name, BUILDER.password)
        + "\n"
        + bcrypt_line(UPSTREAM_BOB.username, UPSTREAM_BOB.password)
        + "\n"
    )
    public_port = free_port()
    public_url = f"http://{LOOPBACK}:{public_port}"
    server = PassthroughServer(
        {
            "REGISTRY_URL": registry_token.url,
            "CACHE_DIR": str(root / "cache"),
            "PROXY_MODE": "authenticated",
            "PUBLIC_URL": public_url,
            "TOKEN_SECRET": SECRET,
            "HTPASSWD_FILE": str(users),
            "HOSTED_REPOSITORIES": "team/*",
        },
        workers=2,
        tmp_root=root,
        extra_args=("--bind", f"{LOOPBACK}:{public_port}"),
    )
    server.start()
    try:
        yield Rig(server, public_url.removeprefix("http://"), root, root / "cache")
    finally:
        server.stop()
        print(f"--- passthrough server {server.url} log (last 80 lines) ---")
        print("\n".join(server.log_text().splitlines()[-80:]))


def copy(source: str, target: str, src: tuple[str, str], dest: tuple[str, str]) -> None:
    skopeo(
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        "--src-creds",
        ":".join(src),
        "--dest-creds",
        ":".join(dest),
        f"docker://{source}",
        f"docker://{target}",
    )


def inspect(reference: str, creds: tuple[str, str] | None) -> dict[str, object]:
    args = ["inspect", "--tls-verify=false", "--raw"]
    args += ["--creds", ":".join(creds)] if creds else ["--no-creds"]
    return dict(json.loads(skopeo(*args, f"docker://{reference}").stdout))


def test_one_client_copies_a_private_upstream_image_into_the_hosted_area(
    both, registry_token, token_issuer: TokenIssuer
):
    private = fresh_private(registry_token)
    source = f"{both.public}/{private.repository}:{private.tag}"
    target = f"{both.public}/team/{unique('copied')}:v1"
    # The source's Basic credentials are alice's upstream login (not a passthrough user:
    # they go upstream, inside the token); the destination's are builder's (checked
    # here, never sent upstream).
    upstream = (UPSTREAM_ALICE.username, UPSTREAM_ALICE.password)
    copy(source, target, upstream, (BUILDER.name, BUILDER.password))
    assert f"repository:{private.repository}:pull" in scopes_asked_by(token_issuer, "alice")
    assert scopes_asked_by(token_issuer, "builder") == []

    copied = inspect(target, (BUILDER.name, BUILDER.password))
    assert copied["config"]["digest"] == private.image.config_blob.digest  # type: ignore[index]
    # The hosted copy needs a passthrough user; alice's upstream login is none.
    with pytest.raises(LoaderError):
        inspect(target, upstream)
    with pytest.raises(LoaderError):
        inspect(target, None)
    # And builder is nobody upstream: the private source stays closed to that login.
    with pytest.raises(LoaderError):
        inspect(source, (BUILDER.name, BUILDER.password))
    log = both.server.log_text()
    for secret in (UPSTREAM_ALICE.password, BUILDER.password):
        assert secret not in log


def test_one_login_that_is_both_a_user_and_an_upstream_account(
    both, registry_token, token_issuer: TokenIssuer
):
    # bob's upstream account may pull bob/*; his passthrough user has the same password.
    image = runnable_image(unique("MARKER-bob-"))
    repository = f"bob/{unique('own')}"
    push(registry_token, repository, "v1", image)
    bob = (UPSTREAM_BOB.username, UPSTREAM_BOB.password)
    target = f"{both.public}/team/{unique('bobs')}:v1"
    copy(f"{both.public}/{repository}:v1", target, bob, bob)
    assert f"repository:{repository}:pull" in scopes_asked_by(token_issuer, "bob")
    copied = inspect(target, bob)
    assert copied["config"]["digest"] == image.config_blob.digest  # type: ignore[index]
    # A passthrough user's name with another password is refused, not sent upstream.
    with pytest.raises(LoaderError):
        inspect(target, (UPSTREAM_BOB.username, "not-" + UPSTREAM_BOB.password))
    assert UPSTREAM_BOB.password not in both.server.log_text()
