"""End to end: passthrough under gunicorn turns real registries' images into archives that
docker loads and runs — every filename form and route, every kind of registry auth, every
manifest and layer kind — and refuses what it must (bad input, wrong passwords, corrupt
blobs) without leaking secrets or temp files."""

from __future__ import annotations

import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest

from tests.e2e.helpers import (
    CLIENT_AUTH_CHALLENGE,
    archive_problem,
    auth_of,
    basic_header,
    download,
    encoded,
    fetch,
    load_and_run,
    one_line_error,
    push,
    running_server,
    tar_problem,
    unique,
)
from tests.support.fronts import FaultFront
from tests.support.helpers import wait_until
from tests.support.images import (
    ALL_EXTRAS,
    Dir,
    File,
    Image,
    Index,
    make_layer,
    multi_platform_index,
    runnable_image,
    tar_layer,
)
from tests.support.loaders import podman_load, skopeo_inspect_archive
from tests.support.registry import ALICE, BOB, RegistryServer
from tests.support.server import PassthroughServer
from tests.support.token_issuer import TokenIssuer

# REGISTRY_DEFAULT_NAMESPACE of the server that tests one-component names with it (two
# components: namespaces may be nested).
DEFAULT_NAMESPACE = unique("ns") + "/sub"


def env_for(registry: RegistryServer | str, credential: tuple[str, str] | None = None,
            **extra: str) -> dict[str, str]:
    url = registry if isinstance(registry, str) else registry.url
    env = {"REGISTRY_URL": url, **extra}
    if credential is not None:
        env["REGISTRY_USERNAME"], env["REGISTRY_PASSWORD"] = credential
    return env


# --- servers, one per configuration, shared by the module ------------------------------


@pytest.fixture(scope="module", params=["temp", "s3"])
def store_kind(request: pytest.FixtureRequest) -> str:
    """The whole matrix runs twice: with no store (each download spools its layers into
    anonymous temp files) and on the S3 store (SeaweedFS), every server with a key
    prefix of its own."""
    return str(request.param)


@pytest.fixture(scope="module")
def anon_server(tmp_path_factory, store_env, registry_anon) -> Iterator[PassthroughServer]:
    """REGISTRY_URL is the anonymous registry; no credentials."""
    with running_server(tmp_path_factory, store_env(env_for(registry_anon))) as server:
        yield server


@pytest.fixture(scope="module")
def basic_server(tmp_path_factory, store_env, registry_basic) -> Iterator[PassthroughServer]:
    """REGISTRY_URL is the htpasswd registry, with alice's credentials."""
    with running_server(
        tmp_path_factory, store_env(env_for(registry_basic, auth_of(ALICE)))
    ) as server:
        yield server


@pytest.fixture(scope="module")
def ns_server(tmp_path_factory, store_env, registry_basic) -> Iterator[PassthroughServer]:
    """basic_server plus REGISTRY_DEFAULT_NAMESPACE."""
    env = env_for(registry_basic, auth_of(ALICE), REGISTRY_DEFAULT_NAMESPACE=DEFAULT_NAMESPACE)
    with running_server(tmp_path_factory, store_env(env)) as server:
        yield server


@pytest.fixture(scope="module")
def token_env_server(
    tmp_path_factory, store_env, registry_token, token_issuer_session
) -> Iterator[PassthroughServer]:
    """The token registry with alice's credentials, realm and service set explicitly."""
    env = env_for(
        registry_token,
        auth_of(ALICE),
        REGISTRY_AUTH_URL=token_issuer_session.realm,
        REGISTRY_SERVICE=token_issuer_session.service,
    )
    with running_server(tmp_path_factory, store_env(env)) as server:
        yield server


@pytest.fixture(scope="module")
def token_anon_server(tmp_path_factory, store_env, registry_token) -> Iterator[PassthroughServer]:
    """The token registry without credentials of its own (clients may bring theirs)."""
    with running_server(tmp_path_factory, store_env(env_for(registry_token))) as server:
        yield server


@pytest.fixture(scope="module")
def token_required_server(
    tmp_path_factory, store_env, registry_token
) -> Iterator[PassthroughServer]:
    """The token registry with REGISTRY_CLIENT_AUTH=required."""
    env = env_for(registry_token, REGISTRY_CLIENT_AUTH="required")
    with running_server(tmp_path_factory, store_env(env)) as server:
        yield server


# --- images, pushed once per module ----------------------------------------------------


@dataclass(frozen=True)
class Form:
    filename: str
    repository: str
    tag: str
    image: Image
    namespaced: bool = False


FORMS = ["one-component", "namespace-shorthand", "nested", "nested-and-shorthand",
         "default-namespace"]


@pytest.fixture(scope="module")
def forms(registry_basic) -> dict[str, Form]:
    """One image per filename form, on the htpasswd registry."""
    solo, my, team, org, bare = (unique(p) for p in ("solo", "myrepo", "team", "org", "bare"))
    specs = {
        "one-component": (f"{solo}_latest.tar", solo, "latest", False),
        "namespace-shorthand": (f"{my}_myimage_v1.0.tar", f"{my}/myimage", "v1.0", False),
        "nested": (f"{team}__platform__api_2026.06.tar", f"{team}/platform/api", "2026.06",
                   False),
        "nested-and-shorthand": (f"{org}__team_app_1.2.3-rc.1.tar", f"{org}/team/app",
                                 "1.2.3-rc.1", False),
        "default-namespace": (f"{bare}_v2.5.tar", f"{DEFAULT_NAMESPACE}/{bare}", "v2.5", True),
    }
    out = {}
    for name, (filename, repository, tag, namespaced) in specs.items():
        image = runnable_image(unique(f"form-{name}-"))
        push(registry_basic, repository, tag, image)
        out[name] = Form(filename, repository, tag, image, namespaced)
    return out


KINDS: dict[str, Callable[[str], Image | Index]] = {
    "docker-v2-gzip": lambda m: runnable_image(m, kind="docker"),
    "oci-gzip": lambda m: runnable_image(m, kind="oci"),
    "oci-zstd": lambda m: runnable_image(m, kind="oci", compression="zstd"),
    "oci-uncompressed": lambda m: runnable_image(m, kind="oci", compression="none"),
    "docker-extras-hardlinked-sh": lambda m: runnable_image(
        m, kind="docker", extras=ALL_EXTRAS, sh_link="hardlink"),
    "oci-zstd-extras": lambda m: runnable_image(m, kind="oci", compression="zstd",
                                                extras=ALL_EXTRAS),
    "oci-uncompressed-extras": lambda m: runnable_image(m, kind="oci", compression="none",
                                                        extras=ALL_EXTRAS),
    "oci-index-with-attestations": lambda m: multi_platform_index(m, kind="oci"),
    "docker-manifest-list": lambda m: multi_platform_index(m, kind="docker"),
}


@dataclass(frozen=True)
class Pushed:
    repository: str
    tag: str
    pushed: Image | Index

    @property
    def image(self) -> Image:
        """What a linux/amd64 client gets."""
        if isinstance(self.pushed, Index):
            return self.pushed.image_for("linux", "amd64")
        return self.pushed

    @property
    def filename(self) -> str:
        return self.repository.replace("/", "_") + f"_{self.tag}.tar"


@pytest.fixture(scope="module")
def kinds(registry_anon) -> dict[str, Pushed]:
    """One image of each manifest/layer kind on the anonymous registry."""
    namespace = unique("kinds")
    out = {}
    for name, make in KINDS.items():
        pushed = Pushed(f"{namespace}/{name}", "v1", make(unique(f"{name}-")))
        push(registry_anon, pushed.repository, pushed.tag, pushed.pushed)
        out[name] = pushed
    return out


@dataclass(frozen=True)
class TokenImages:
    public: Pushed
    private: Pushed
    other_private: Pushed


@pytest.fixture(scope="module")
def token_images(registry_token) -> TokenImages:
    """Images on the token registry: public/* anyone may pull, private/* alice only."""
    images = TokenImages(
        Pushed(f"public/{unique('pub')}", "v1", runnable_image(unique("public-"))),
        Pushed(f"private/{unique('priv')}", "v1", runnable_image(unique("private-"), kind="oci")),
        Pushed(f"private/{unique('other')}", "v1", runnable_image(unique("other-"))),
    )
    for pushed in (images.public, images.private, images.other_private):
        push(registry_token, pushed.repository, pushed.tag, pushed.pushed)
    return images


def repo_tag(host: str, pushed: Pushed) -> str:
    return f"{host}/{pushed.repository}:{pushed.tag}"


# --- filename forms x routes ------------------------------------------------------------

ROUTES = ["docker", "registry", "registry-encoded-host", "registry-auth",
          "registry-auth-encoded-host"]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("form", FORMS)
def test_filename_form_on_every_route(
    form, route, forms, basic_server, ns_server, registry_basic, docker_host, tmp_path
):
    """Each form, on the htpasswd registry: /docker and /registry naming the environment's
    host:port use alice's environment credentials; /registry-auth uses bob's, the client's."""
    f = forms[form]
    server = ns_server if f.namespaced else basic_server
    host = registry_basic.host
    auth = None
    if route == "docker":
        path = f"/docker/{f.filename}"
    elif route.startswith("registry-auth"):
        auth = auth_of(BOB)
        shown = encoded(host) if route.endswith("encoded-host") else host
        path = f"/registry-auth/http/{shown}/docker/{f.filename}"
    else:
        shown = encoded(host) if route.endswith("encoded-host") else host
        path = f"/registry/http/{shown}/docker/{f.filename}"
    got = download(server.url + path, tmp_path / f.filename, auth=auth)
    expected = f"{host}/{f.repository}:{f.tag}"
    assert got.headers["X-Image-Reference"] == expected
    assert got.headers["Docker-Content-Digest"] == f.image.digest
    assert got.headers["Content-Disposition"] == f'attachment; filename="{f.filename}"'
    load_and_run(docker_host, got.path, expected, f.image)


# --- manifest and layer kinds, anonymous registry --------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_manifest_and_layer_kinds_from_an_anonymous_registry(
    kind, kinds, anon_server, registry_anon, docker_host, tmp_path, store_kind
):
    pushed = kinds[kind]
    got = download(f"{anon_server.url}/docker/{pushed.filename}", tmp_path / "image.tar")
    if store_kind == "temp":
        # No store: the layer sizes are unknown when the headers go out.
        assert got.headers.get("Transfer-Encoding") == "chunked"
    else:
        # A store knows the sizes of the layers it holds (the kinds share a base layer):
        # an exact length when it holds them all, else chunked.
        length = got.headers.get("Content-Length")
        assert length == str(got.path.stat().st_size) or length is None
    assert got.headers["Docker-Content-Digest"] == pushed.image.digest
    if isinstance(pushed.pushed, Index):
        index = pushed.pushed
        assert len(index.images) == 2
        if kind.startswith("oci"):
            assert len(index.attestations) == 2  # the entry the service must skip
        assert pushed.image.marker and pushed.image.marker.endswith(" linux/amd64")
    load_and_run(docker_host, got.path, repo_tag(registry_anon.host, pushed), pushed.image)


@pytest.mark.parametrize("kind", ["docker-extras-hardlinked-sh", "oci-zstd-extras"])
def test_podman_and_skopeo_accept_the_archive(kind, kinds, anon_server, registry_anon, tmp_path):
    pushed = kinds[kind]
    got = download(f"{anon_server.url}/docker/{pushed.filename}", tmp_path / "image.tar")
    image = pushed.image
    expected = repo_tag(registry_anon.host, pushed)
    pod = podman_load(got.path, run_marker=image.marker)
    assert pod.names == [expected]
    assert pod.layers == image.diff_ids
    info = skopeo_inspect_archive(got.path)
    # Layers are uncompressed tars in the archive: their digests are the diff_ids.
    assert info["Layers"] == image.diff_ids
    assert (info["Os"], info["Architecture"]) == ("linux", "amd64")


# --- authentication ---------------------------------------------------------------------


def test_token_auth_with_environment_credentials(
    token_env_server, token_images, registry_token, token_issuer: TokenIssuer, docker_host,
    tmp_path,
):
    private = token_images.private
    got = download(f"{token_env_server.url}/docker/{private.filename}", tmp_path / "p.tar")
    load_and_run(docker_host, got.path, repo_tag(registry_token.host, private), private.image)
    granted = [r for r in token_issuer.requests if r.status == 200]
    assert granted, token_issuer.requests
    for record in granted:
        assert record.user == ALICE.username
        assert record.service == token_issuer.service
        assert f"repository:{private.repository}:pull" in record.scopes


def test_environment_credentials_never_go_to_another_registry(
    basic_server, token_images, registry_token, token_issuer: TokenIssuer, tmp_path
):
    """alice (basic_server's environment user) may pull private/* on the token registry
    too; a /registry route naming that other host must still be anonymous there."""
    private = token_images.private
    url = f"{basic_server.url}/registry/http/{registry_token.host}/docker/{private.filename}"
    got = fetch(url, tmp_path / "refused.tar")
    assert 400 <= got.status < 500, got.describe()
    one_line_error(got)
    assert token_issuer.requests, "the token registry was never asked"
    assert all(not r.has_authorization and r.user is None for r in token_issuer.requests)


def test_token_auth_with_client_credentials_on_registry_auth(
    token_anon_server, anon_server, token_images, registry_token, token_issuer: TokenIssuer,
    docker_host, tmp_path,
):
    private = token_images.private
    expected = repo_tag(registry_token.host, private)
    for server in (token_anon_server, anon_server):  # the environment's registry, and not
        token_issuer.clear_requests()
        url = f"{server.url}/registry-auth/http/{registry_token.host}/docker/{private.filename}"
        got = download(url, tmp_path / "alice.tar", auth=auth_of(ALICE))
        load_and_run(docker_host, got.path, expected, private.image)
        assert {r.user for r in token_issuer.requests if r.status == 200} == {ALICE.username}
    # bob's credentials are good, but he has no grant on private/*.
    url = f"{anon_server.url}/registry-auth/http/{registry_token.host}/docker/{private.filename}"
    refused = fetch(url, tmp_path / "bob.tar", auth=auth_of(BOB))
    assert 400 <= refused.status < 500, refused.describe()
    one_line_error(refused)


def test_registry_auth_route_without_credentials_is_challenged(
    anon_server, registry_token, token_images, token_issuer: TokenIssuer, tmp_path
):
    url = (f"{anon_server.url}/registry-auth/http/{registry_token.host}/docker/"
           f"{token_images.public.filename}")
    got = fetch(url, tmp_path / "challenged.tar")
    one_line_error(got, 401)
    assert got.headers["WWW-Authenticate"] == CLIENT_AUTH_CHALLENGE
    assert token_issuer.requests == []


def test_client_auth_required_on_the_environment_route(
    token_required_server, token_images, registry_token, token_issuer: TokenIssuer, docker_host,
    tmp_path,
):
    for pushed in (token_images.private, token_images.public):
        got = fetch(f"{token_required_server.url}/docker/{pushed.filename}", tmp_path / "x.tar")
        one_line_error(got, 401)
        assert got.headers["WWW-Authenticate"] == CLIENT_AUTH_CHALLENGE
    assert token_issuer.requests == [], "challenged before any upstream call"
    private = token_images.private
    got = download(f"{token_required_server.url}/docker/{private.filename}", tmp_path / "a.tar",
                   auth=auth_of(ALICE))
    load_and_run(docker_host, got.path, repo_tag(registry_token.host, private), private.image)
    assert {r.user for r in token_issuer.requests if r.status == 200} == {ALICE.username}


def test_static_bearer_token(
    passthrough_server, token_images, registry_token, token_issuer: TokenIssuer, docker_host,
    tmp_path,
):
    private, other = token_images.private, token_images.other_private
    token = token_issuer.mint(
        "robot", [{"type": "repository", "name": private.repository, "actions": ["pull"]}],
        audience=token_issuer.service,
    )
    server = passthrough_server(env_for(registry_token, REGISTRY_BEARER_TOKEN=token))
    got = download(f"{server.url}/docker/{private.filename}", tmp_path / "b.tar")
    expected = repo_tag(registry_token.host, private)
    load_and_run(docker_host, got.path, expected, private.image)
    # A /registry route naming the environment's host:port uses the token too.
    url = f"{server.url}/registry/http/{encoded(registry_token.host)}/docker/{private.filename}"
    assert download(url, tmp_path / "r.tar").headers["X-Image-Reference"] == expected
    # The token is for one repository; another is refused, and there is no token exchange.
    refused = fetch(f"{server.url}/docker/{other.filename}", tmp_path / "other.tar")
    assert 400 <= refused.status < 500, refused.describe()
    one_line_error(refused)
    assert token_issuer.requests == []
    assert token not in refused.text and token not in server.log_text()


def test_anonymous_access_private_refused_public_works(
    token_anon_server, token_images, registry_token, docker_host, tmp_path
):
    private, public = token_images.private, token_images.public
    refused = fetch(f"{token_anon_server.url}/docker/{private.filename}", tmp_path / "p.tar")
    assert 400 <= refused.status < 500, refused.describe()
    one_line_error(refused)
    got = download(f"{token_anon_server.url}/docker/{public.filename}", tmp_path / "pub.tar")
    load_and_run(docker_host, got.path, repo_tag(registry_token.host, public), public.image)


WRONG_PASSWORD_CASES = ["basic-environment", "token-environment", "basic-client",
                        "token-client"]


@pytest.mark.parametrize("case", WRONG_PASSWORD_CASES)
def test_wrong_password_gives_401_and_is_never_shown(
    case, passthrough_server, registry_basic, registry_token, registry_anon, forms, token_images,
    tmp_path,
):
    password = f"wrong-{unique('pw')}"
    flavour, where = case.split("-")
    registry = registry_basic if flavour == "basic" else registry_token
    filename = (forms["nested"].filename if flavour == "basic"
                else token_images.private.filename)
    auth = None
    if where == "environment":
        server = passthrough_server(env_for(registry, (ALICE.username, password)))
        url = f"{server.url}/docker/{filename}"
    else:
        server = passthrough_server(env_for(registry_anon))
        url = f"{server.url}/registry-auth/http/{registry.host}/docker/{filename}"
        auth = (ALICE.username, password)
    got = fetch(url, tmp_path / "refused.tar", auth=auth)
    one_line_error(got, 401)
    secrets_ = (password, basic_header(ALICE.username, password).split()[1])
    shown = got.text + repr(dict(got.headers))
    log = server.log_text()
    for secret in secrets_:
        assert secret not in shown
        assert secret not in log
    assert "401" in log  # the log is the right one: it saw the request


# --- redirects, corruption, loaders -----------------------------------------------------


def test_blob_redirect_to_another_host_gets_no_authorization(
    redirect_front_token, passthrough_server, token_images, docker_host, tmp_path
):
    front = redirect_front_token
    private = token_images.private
    server = passthrough_server(env_for(front.url, auth_of(ALICE)))
    got = download(f"{server.url}/docker/{private.filename}", tmp_path / "r.tar")
    load_and_run(docker_host, got.path, repo_tag(front.host, private), private.image)
    assert front.redirects > 0
    host = front.blob_host
    assert host.requests > 0
    assert host.requests_with_authorization == 0
    assert {entry.status for entry in host.log} == {200}


@pytest.fixture(scope="module")
def corrupt_image(registry_anon) -> Pushed:
    """An image whose last layer, its own, has bytes flipped in the registry's storage
    (same size): the registry serves it as it is."""
    payload = os.urandom(512 * 1024)  # random: gzip cannot shrink it, the body is long
    own = make_layer(tar_layer([Dir("data"), File("data/blob.bin", payload)]),
                     created_by="the layer that gets corrupted")
    image = runnable_image(unique("corrupt-"), extra_layers=[own])
    pushed = Pushed(f"{unique('corrupt')}/image", "v1", image)
    push(registry_anon, pushed.repository, pushed.tag, image)
    path = registry_anon.blob_path(own.digest)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + 64):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    assert path.stat().st_size == own.size
    return pushed


@pytest.mark.parametrize("query", ["", "?layers=gzip", "?format=oci"])
def test_corrupted_blob_never_yields_a_complete_archive(
    query, corrupt_image, anon_server, tmp_path
):
    got = fetch(f"{anon_server.url}/docker/{corrupt_image.filename}{query}", tmp_path / "c.tar")
    if got.status == 200:
        # Too late for a status: the transfer must break, never end cleanly.
        assert got.error is not None, got.describe()
        assert archive_problem(got.path) is not None
    else:
        assert got.status >= 400, got.describe()
        one_line_error(got)


# --- bad input --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fault_server(
    tmp_path_factory, store_env, registry_anon
) -> Iterator[tuple[PassthroughServer, FaultFront]]:
    """A server whose registry is a FaultFront: its log shows every upstream request."""
    with FaultFront(registry_anon) as front, running_server(
        tmp_path_factory, store_env(env_for(front.url))
    ) as server:
        yield server, front


BAD_PATHS = [
    "/docker/nginx.tar",  # no tag
    "/docker/nginx_latest.zip",
    "/docker/Nginx_latest.tar",  # upper case
    "/docker/_nginx_latest.tar",  # empty path component
    "/docker/team___api_latest.tar",  # three underscores
    "/docker/nginx_.tar",  # empty tag
    "/docker/nginx_-v1.tar",  # a tag cannot start with '-'
    "/docker/nginx_" + "v" * 129 + ".tar",  # tag too long
    "/docker/ng!nx_latest.tar",
    "/docker/nginx%0D%0AX-Injected:%201_latest.tar",  # no header or log line injection
    "/docker/" + "a" * 510 + "_1.tar",  # longer than 512 characters
    "/docker/nginx_latest.tar?platform=linux",
    "/docker/nginx_latest.tar?format=zip",
    "/docker/nginx_latest.tar?layers=xz",
    "/registry/ftp/{host}/docker/nginx_latest.tar",
    "/registry/http/bad%20host/docker/nginx_latest.tar",
    "/registry/http/{host}/docker/Nginx_latest.tar",
    "/registry-auth/http/{host}/docker/nginx.tar",
    "/ref/team/api.tar",  # neither tag nor digest
    "/ref/team/api@sha256:abc.tar",
    "/ref/team/api:v1.zip",
]


@pytest.mark.parametrize("path", BAD_PATHS)
def test_bad_input_is_400_before_any_upstream_call(path, fault_server, tmp_path):
    server, front = fault_server
    front.reset()
    auth = auth_of(ALICE) if path.startswith("/registry-auth") else None
    got = fetch(server.url + path.format(host=front.host), tmp_path / "bad.tar", auth=auth)
    line = one_line_error(got, 400)
    assert len(line) < 400
    assert "X-Injected" not in got.headers
    assert got.headers["Content-Type"].startswith("text/plain")
    assert front.log == [], f"upstream was asked: {front.log}"


# --- temp files -------------------------------------------------------------------------


def test_no_temp_file_remains(
    anon_server, basic_server, ns_server, token_env_server, token_anon_server,
    token_required_server, fault_server, kinds, corrupt_image, tmp_path,
):
    """After every download test above (and one more of each outcome here), no server
    left anything in its TMPDIR."""
    download(f"{anon_server.url}/docker/{kinds['oci-zstd-extras'].filename}", tmp_path / "a.tar")
    fetch(f"{anon_server.url}/docker/{corrupt_image.filename}", tmp_path / "c.tar")
    for server in (anon_server, basic_server, ns_server, token_env_server, token_anon_server,
                   token_required_server, fault_server[0]):
        # On S3 a layer is uploaded after it was sent: wait for those uploads to end.
        wait_until(partial(no_leftovers, server), 30, f"{server}'s uploads")
        assert server.tmpdir.is_dir()


def no_leftovers(server: PassthroughServer) -> bool:
    return server.leftover_temp_files() == []


def test_helpers_can_tell_a_broken_archive(tmp_path: Path) -> None:
    """archive_problem, on which the corruption test relies, must see truncation, also at
    a member boundary."""
    good = tmp_path / "good.tar"
    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(5000))
    manifest = tmp_path / "manifest.json"
    manifest.write_text('[{"Config": "c.json", "Layers": ["l/layer.tar"]}]')
    with tarfile.open(good, "w", format=tarfile.USTAR_FORMAT) as archive:
        archive.add(manifest, "manifest.json")
        archive.add(data, "c.json")
        archive.add(data, "l/layer.tar")
    assert archive_problem(good) is None
    raw = good.read_bytes()
    for cut_at in (2048, 512 * 13, 512 * 14):
        cut = tmp_path / "cut.tar"
        cut.write_bytes(raw[:cut_at] + bytes(1024))  # even with end-of-archive blocks
        assert archive_problem(cut) is not None, cut_at
    cut.write_bytes(raw[:3000])
    assert tar_problem(cut) is not None


# --- HEAD (kept last, so that under -x a failure here hides nothing else) --------------


@pytest.mark.parametrize("query", ["", "?layers=gzip"])
def test_head_answers_like_get_without_fetching_a_layer(query, fault_server, kinds, tmp_path):
    """HEAD: GET's headers, no body, and no layer download. Cold, GET streams chunked
    (size unknown); with ?layers=gzip every size is known and GET sends Content-Length."""
    server, front = fault_server  # the front is over the anonymous registry
    pushed = kinds["oci-gzip"]
    url = f"{server.url}/docker/{pushed.filename}{query}"
    front.reset()
    head = fetch(url, tmp_path / "head", method="HEAD")
    assert head.status == 200, head.describe()
    assert head.body == b""
    for layer in pushed.image.layers:
        assert front.count("GET", layer.digest) == 0, "HEAD must not download a layer"
    assert front.log, "HEAD resolves the image upstream"
    get = download(url, tmp_path / "get.tar")
    for name in ("Content-Type", "Docker-Content-Digest", "X-Image-Reference", "ETag",
                 "Content-Disposition"):
        assert head.headers[name] == get.headers[name], name
    assert head.headers["Docker-Content-Digest"] == pushed.image.digest
    assert head.headers["X-Image-Reference"] == repo_tag(front.host, pushed)
    # A Content-Length on HEAD is the size GET would send; never a made-up one.
    assert head.headers.get("Content-Length") == get.headers.get("Content-Length"), (
        f"HEAD says Content-Length {head.headers.get('Content-Length')!r}, GET sent "
        f"{get.headers.get('Content-Length')!r} and {get.path.stat().st_size} bytes")
