"""The rig proves itself: real registries of each flavour accept pushes and serve them
back, directly and through both fronts; auth is enforced; the fronts' redirects,
counters and faults behave as the service's tests will rely on."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import sys
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
import requests

from tests.support.fronts import FaultFront, RedirectFront
from tests.support.helpers import digest as digest_of
from tests.support.procs import ManagedProcess, StartupError, free_port, wait_for_http
from tests.support.registry import (
    ALICE,
    BASIC_USERS,
    BOB,
    MEDIA_MANIFEST,
    PUSHER,
    HasURL,
    PushedImage,
    RegistryServer,
    parse_challenge,
    push_blob,
    push_image,
    push_manifest,
    registry_session,
    schema2_manifest,
)
from tests.support.token_issuer import TokenIssuer, decode_jwt

pytestmark = pytest.mark.rig

# Without it distribution 2.8 answers 400: it would have to down-convert to schema 1,
# which it no longer does.
ACCEPT = {"Accept": MEDIA_MANIFEST}


def _unique(prefix: str) -> str:
    # Session registries are shared: every test writes to its own repositories.
    return f"{prefix}/t{secrets.token_hex(4)}"


def _plain() -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    return session


@pytest.fixture
def plain() -> Iterator[requests.Session]:
    """A client without any auth handling."""
    with _plain() as session:
        yield session


@pytest.fixture(params=["anonymous", "basic", "token"])
def any_registry(request: pytest.FixtureRequest) -> RegistryServer:
    name = {"anonymous": "registry_anon", "basic": "registry_basic", "token": "registry_token"}
    registry: RegistryServer = request.getfixturevalue(name[request.param])
    return registry


def _pusher_session(target: HasURL):
    return registry_session(target, PUSHER.username, PUSHER.password)


def _push_sample(registry: RegistryServer, name: str, size: int = 3000) -> PushedImage:
    with _pusher_session(registry) as session:
        return push_image(session, name, "v1", [os.urandom(size), os.urandom(size // 3 + 1)])


# --- processes and plumbing -------------------------------------------------------------


def test_startup_failure_carries_the_log_tail(tmp_path):
    proc = ManagedProcess(
        [sys.executable, "-c", "print('boom: bad config', flush=True); raise SystemExit(3)"],
        log_dir=tmp_path,
        name="failing",
    ).start()
    with pytest.raises(StartupError) as caught:
        wait_for_http(f"http://127.0.0.1:{free_port()}/", 10, process=proc)
    assert "boom: bad config" in str(caught.value)
    assert "exited with code 3" in str(caught.value)
    assert proc.stop() == 3


def test_stop_escalates_to_sigkill(tmp_path):
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
        " print('up', flush=True); time.sleep(60)"
    )
    proc = ManagedProcess([sys.executable, "-c", code], log_dir=tmp_path, name="stubborn").start()
    deadline = time.monotonic() + 10
    while "up" not in proc.log_text() and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    assert proc.stop(timeout=0.5) == -9
    assert time.monotonic() - started < 5
    with pytest.raises(ProcessLookupError):
        os.kill(proc.pid, 0)


def test_registry_binds_loopback_only(registry_anon):
    assert urlsplit(registry_anon.url).hostname == "127.0.0.1"
    config = json.loads(registry_anon.config_path.read_text())
    assert config["http"]["addr"] == registry_anon.host


# --- push and read back, each flavour ---------------------------------------------------


def test_push_and_read_back_directly(any_registry):
    name = _unique("public")
    image = _push_sample(any_registry, name)
    layer = image.layer_digests[0]
    with _pusher_session(any_registry) as session:
        manifest = session.get(f"/v2/{name}/manifests/v1", headers=ACCEPT)
        assert manifest.status_code == 200
        assert manifest.content == image.manifest
        assert manifest.headers["Docker-Content-Digest"] == image.manifest_digest
        blob = session.get(f"/v2/{name}/blobs/{layer}")
        assert blob.status_code == 200
        assert digest_of(blob.content) == layer
        assert any_registry.blob_path(layer).read_bytes() == blob.content
        by_digest = session.get(f"/v2/{name}/manifests/{image.manifest_digest}", headers=ACCEPT)
        assert by_digest.content == image.manifest


@pytest.mark.parametrize("front_class", [RedirectFront, FaultFront])
def test_push_and_read_back_through_fronts(any_registry, front_class):
    name = _unique("public")
    with front_class(any_registry) as front, _pusher_session(front) as session:
        # Pushing through the front proves upload Locations point back at the front.
        started = session.post(f"/v2/{name}/blobs/uploads/")
        assert started.status_code == 202
        assert urlsplit(started.headers["Location"]).netloc == front.host
        session.delete(started.headers["Location"])
        image = push_image(session, name, "v1", [os.urandom(200_000)])
        manifest = session.get(f"/v2/{name}/manifests/v1", headers=ACCEPT)
        assert manifest.status_code == 200
        assert manifest.content == image.manifest
        for digest in (*image.layer_digests, image.config_digest):
            blob = session.get(f"/v2/{name}/blobs/{digest}")
            assert blob.status_code == 200, blob.text
            assert digest_of(blob.content) == digest
            assert blob.headers["Content-Length"] == str(len(blob.content))
        head = session.head(f"/v2/{name}/blobs/{image.config_digest}")
        assert head.status_code == (307 if front_class is RedirectFront else 200)
        if isinstance(front, RedirectFront):
            assert front.redirects == 3
            assert front.blob_host.requests == 2
            assert front.blob_host.requests_with_authorization == 0


def test_chunked_upload_through_front_is_streamed(registry_anon):
    name = _unique("public")
    data = os.urandom(300_000)
    with FaultFront(registry_anon) as front, _pusher_session(front) as session:
        started = session.post(f"/v2/{name}/blobs/uploads/")

        def body() -> Iterator[bytes]:
            for i in range(0, len(data), 50_000):
                yield data[i : i + 50_000]

        # A generator makes requests send Transfer-Encoding: chunked.
        patched = session.patch(
            started.headers["Location"],
            data=body(),
            headers={"Content-Type": "application/octet-stream"},
        )
        assert patched.status_code == 202, patched.text
        assert patched.headers["Range"] == f"0-{len(data) - 1}"
        location = patched.headers["Location"]
        done = session.put(location + f"&digest={digest_of(data)}")
        assert done.status_code == 201, done.text
        assert registry_anon.blob_path(digest_of(data)).read_bytes() == data


def test_blob_path_lets_tests_corrupt_a_blob(registry_anon, plain):
    name = _unique("public")
    with _pusher_session(registry_anon) as session:
        digest = push_blob(session, name, os.urandom(5000))
    path = registry_anon.blob_path(digest)
    corrupted = bytes(b ^ 0xFF for b in path.read_bytes())
    path.write_bytes(corrupted)
    served = plain.get(f"{registry_anon.url}/v2/{name}/blobs/{digest}")
    # The registry does not re-check digests on read: the corruption reaches the client.
    assert served.status_code == 200
    assert served.content == corrupted
    assert digest_of(served.content) != digest


# --- authentication ---------------------------------------------------------------------


def test_basic_registry_refuses_wrong_and_missing_passwords(registry_basic, plain):
    name = _unique("public")
    image = _push_sample(registry_basic, name)
    url = f"{registry_basic.url}/v2/{name}/manifests/v1"
    anonymous = plain.get(url)
    assert anonymous.status_code == 401
    scheme, params = parse_challenge(anonymous.headers["WWW-Authenticate"])
    assert scheme == "Basic" and params["realm"] == "rig-basic"
    assert plain.get(url, auth=(ALICE.username, "wrong")).status_code == 401
    with registry_session(registry_basic, ALICE.username, "wrong") as session:
        assert session.get(f"/v2/{name}/manifests/v1", headers=ACCEPT).status_code == 401
    for user, password in BASIC_USERS.items():
        answer = plain.get(url, auth=(user, password), headers=ACCEPT)
        assert answer.status_code == 200
        assert answer.content == image.manifest


def test_token_issuer_refuses_a_wrong_password(registry_token, token_issuer, plain):
    answer = plain.get(
        token_issuer.realm, params={"service": token_issuer.service}, auth=(ALICE.username, "wrong")
    )
    assert answer.status_code == 401
    assert answer.json()["errors"][0]["code"] == "UNAUTHORIZED"
    with registry_session(registry_token, ALICE.username, "wrong") as session:
        assert session.get("/v2/").status_code == 401
    assert [r.status for r in token_issuer.requests] == [401, 401]
    assert all(r.user is None and r.has_authorization for r in token_issuer.requests)
    # Passwords are never recorded.
    assert "wrong" not in repr(token_issuer.requests)
    assert ALICE.password not in repr(token_issuer.requests)


def test_token_registry_enforces_grants(registry_token, token_issuer, plain):
    public, private = _unique("public"), _unique("private")
    _push_sample(registry_token, public)
    private_image = _push_sample(registry_token, private)
    token_issuer.clear_requests()

    with registry_session(registry_token) as anonymous:
        assert anonymous.get(f"/v2/{public}/manifests/v1", headers=ACCEPT).status_code == 200
        refused = anonymous.get(f"/v2/{private}/manifests/v1", headers=ACCEPT)
        assert refused.status_code == 401
        assert refused.json()["errors"][0]["code"] in ("UNAUTHORIZED", "DENIED")
        assert "insufficient_scope" in refused.headers["WWW-Authenticate"]
        assert anonymous.post(f"/v2/{public}/blobs/uploads/").status_code == 401

    with registry_session(registry_token, ALICE.username, ALICE.password) as alice:
        answer = alice.get(f"/v2/{private}/manifests/v1", headers=ACCEPT)
        assert answer.status_code == 200
        assert answer.content == private_image.manifest
        # alice may pull private/* but not push there.
        assert alice.post(f"/v2/{private}/blobs/uploads/").status_code == 401
        own = _unique("alice")
        push_blob(alice, own, b"alice's blob")

    with registry_session(registry_token, BOB.username, BOB.password) as bob:
        assert bob.get(f"/v2/{private}/manifests/v1", headers=ACCEPT).status_code == 401
        assert bob.get(f"/v2/{public}/manifests/v1", headers=ACCEPT).status_code == 200

    anonymous_requests = [r for r in token_issuer.requests if not r.has_authorization]
    assert anonymous_requests and all(r.user is None for r in anonymous_requests)
    for record in token_issuer.requests:
        assert record.service == token_issuer.service
        assert len(record.scopes) == 1
    private_pulls = [r for r in token_issuer.requests if r.scopes == [f"repository:{private}:pull"]]
    by_user = {r.user: r.access for r in private_pulls}
    assert by_user[None] == ()
    assert by_user["bob"] == ()
    assert by_user["alice"] == ({"type": "repository", "name": private, "actions": ["pull"]},)


def test_token_claims_and_scope_parameters(registry_token, token_issuer, plain):
    a, b = _unique("public"), _unique("private")
    answer = plain.get(
        token_issuer.realm,
        params=[
            ("service", token_issuer.service),
            ("scope", f"repository:{a}:pull,push"),
            ("scope", f"repository:{b}:pull"),
            ("account", ALICE.username),
        ],
        auth=(ALICE.username, ALICE.password),
    )
    assert answer.status_code == 200
    body = answer.json()
    assert body["token"] == body["access_token"]
    assert body["expires_in"] == 300
    assert body["issued_at"].endswith("Z")
    header, claims = decode_jwt(body["token"])
    assert header["alg"] == "RS256" and len(header["x5c"]) == 1
    assert claims["iss"] == token_issuer.issuer
    assert claims["aud"] == token_issuer.service
    assert claims["sub"] == ALICE.username
    assert claims["nbf"] <= claims["iat"] < claims["exp"]
    assert claims["access"] == [
        {"type": "repository", "name": a, "actions": ["pull"]},
        {"type": "repository", "name": b, "actions": ["pull"]},
    ]
    (record,) = token_issuer.requests
    assert record.scopes == [f"repository:{a}:pull,push", f"repository:{b}:pull"]
    assert record.account == ALICE.username and record.user == ALICE.username


def test_registry_rejects_forged_tokens(registry_token, token_issuer, plain: requests.Session):
    name = _unique("public")
    _push_sample(registry_token, name)
    url = f"{registry_token.url}/v2/{name}/manifests/v1"
    access = [{"type": "repository", "name": name, "actions": ["pull"]}]

    def status(token: str) -> int:
        return plain.get(url, headers={**ACCEPT, "Authorization": f"Bearer {token}"}).status_code

    assert status(token_issuer.mint("x", access)) == 200
    assert status(token_issuer.mint("x", access, audience="another-service")) == 401
    assert status(token_issuer.mint("x", access, issuer="another-issuer")) == 401
    assert status(token_issuer.mint("x", access, ttl=-3600)) == 401
    with TokenIssuer() as stranger:
        assert status(stranger.mint("x", access)) == 401


def test_token_issuer_answer_options(registry_token, token_issuer):
    name = _unique("public")
    _push_sample(registry_token, name)
    token_issuer.token_field = "access_token"
    token_issuer.include_expires_in = False
    with registry_session(registry_token) as session:
        assert session.get(f"/v2/{name}/manifests/v1", headers=ACCEPT).status_code == 200
        (body,) = session.token_responses
    assert set(body) == {"access_token", "issued_at"}
    token_issuer.token_field = "token"
    token_issuer.include_expires_in = True
    token_issuer.include_issued_at = False
    with registry_session(registry_token) as session:
        assert session.get(f"/v2/{name}/manifests/v1", headers=ACCEPT).status_code == 200
        (body,) = session.token_responses
    assert set(body) == {"token", "expires_in"}
    token_issuer.fail_next(503)
    with registry_session(registry_token) as session:
        assert session.get(f"/v2/{name}/manifests/v1", headers=ACCEPT).status_code == 401
        assert session.get(f"/v2/{name}/manifests/v1", headers=ACCEPT).status_code == 200
    assert [r.status for r in token_issuer.requests][-2:] == [503, 200]


# --- the redirect front -----------------------------------------------------------------


def test_redirect_front_sends_blobs_to_the_blob_host(registry_anon, redirect_front_anon, plain):
    name = _unique("public")
    image = _push_sample(registry_anon, name, size=150_000)
    digest = image.layer_digests[0]
    expected = registry_anon.blob_path(digest).read_bytes()
    url = f"{redirect_front_anon.url}/v2/{name}/blobs/{digest}"

    first = plain.get(url, allow_redirects=False)
    assert first.status_code == 307
    location = urlsplit(first.headers["Location"])
    assert location.hostname == "127.0.0.2"
    assert location.port == urlsplit(redirect_front_anon.blob_host.url).port

    followed = plain.get(url)
    assert followed.status_code == 200
    assert followed.content == expected
    assert [r.status_code for r in followed.history] == [307]

    ranged = plain.get(first.headers["Location"], headers={"Range": "bytes=10-19"})
    assert ranged.status_code == 206 and ranged.content == expected[10:20]

    host = redirect_front_anon.blob_host
    assert (host.requests, host.requests_with_authorization) == (2, 0)
    rejected = plain.get(first.headers["Location"], headers={"Authorization": "Bearer x"})
    assert rejected.status_code == 400
    assert (host.requests, host.requests_with_authorization) == (3, 1)
    assert plain.get(f"{host.url}/blobs/{digest}?sig=bad").status_code == 403
    assert plain.get(f"{host.url}/blobs/{digest}").status_code == 403
    # Manifests are proxied, not redirected.
    manifest = plain.get(f"{redirect_front_anon.url}/v2/{name}/manifests/v1", headers=ACCEPT)
    assert manifest.status_code == 200 and manifest.content == image.manifest


def test_redirect_front_checks_authorization_first(registry_token, redirect_front_token, plain):
    name = _unique("private")
    image = _push_sample(registry_token, name, size=100_000)
    digest = image.layer_digests[0]
    front = redirect_front_token

    refused = plain.get(f"{front.url}/v2/{name}/blobs/{digest}")
    assert refused.status_code == 401
    assert refused.json()["errors"][0]["code"] == "UNAUTHORIZED"
    scheme, params = parse_challenge(refused.headers["WWW-Authenticate"])
    assert scheme == "Bearer" and params["scope"] == f"repository:{name}:pull"
    assert plain.head(f"{front.url}/v2/{name}/blobs/{digest}").status_code == 401
    assert front.blob_host.requests == 0

    with registry_session(front, ALICE.username, ALICE.password) as alice:
        blob = alice.get(f"/v2/{name}/blobs/{digest}")
        assert blob.status_code == 200
        assert blob.content == registry_token.blob_path(digest).read_bytes()
        assert [r.status_code for r in blob.history] == [307]
        # The front got the Bearer token; requests drops it for the blob host, which is
        # another host (the counters below prove it).
        assert blob.history[0].request.headers["Authorization"].startswith("Bearer ")
    with registry_session(front, BOB.username, BOB.password) as bob:
        assert bob.get(f"/v2/{name}/blobs/{digest}").status_code == 401
    assert front.blob_host.requests == 1
    assert front.blob_host.requests_with_authorization == 0
    assert front.redirects == 1


# --- the fault front --------------------------------------------------------------------


def _read_all(response: requests.Response) -> tuple[bytes, BaseException | None]:
    """The body bytes that arrived before the stream ended, and how it ended."""
    received = bytearray()
    try:
        for chunk in response.raw.stream(8192, decode_content=False):
            received += chunk
    except Exception as exc:
        return bytes(received), exc
    return bytes(received), None


def test_fault_front_cuts_the_nth_blob_get(registry_anon, fault_front, plain):
    name = _unique("public")
    data = os.urandom(200_000)
    with _pusher_session(registry_anon) as session:
        digest = push_blob(session, name, data)
    fault = fault_front.inject(digest=digest, nth=2, kind="cut", cut_after=65536)
    url = f"{fault_front.url}/v2/{name}/blobs/{digest}"

    assert plain.get(url).content == data
    with plain.get(url, stream=True) as cut:
        assert cut.status_code == 200
        assert cut.headers["Content-Length"] == str(len(data))
        received, error = _read_all(cut)
    assert received == data[:65536]
    assert error is not None
    assert plain.get(url).content == data
    assert fault_front.count("GET", digest) == 3
    assert fault.fired == 1
    assert [r.fault for r in fault_front.log] == [None, "cut", None]


def test_fault_front_cut_is_always_short(registry_anon, fault_front, plain):
    name = _unique("public")
    data = os.urandom(1000)
    with _pusher_session(registry_anon) as session:
        digest = push_blob(session, name, data)
    fault_front.inject(digest=digest, kind="cut")  # cut_after > the blob
    with plain.get(f"{fault_front.url}/v2/{name}/blobs/{digest}", stream=True) as cut:
        received, error = _read_all(cut)
    assert received == data[:-1] and error is not None


def test_fault_front_503_and_429(registry_anon, fault_front, plain: requests.Session):
    name = _unique("public")
    image = _push_sample(registry_anon, name)
    layer, config = image.layer_digests[0], image.config_digest
    fault_front.inject(digest=layer, nth=1, kind="503")
    fault_front.inject(digest=None, nth=3, kind="429", retry_after=7)

    def get(digest: str) -> requests.Response:
        return plain.get(f"{fault_front.url}/v2/{name}/blobs/{digest}")

    first = get(layer)
    assert first.status_code == 503
    assert first.json()["errors"][0]["code"] == "UNAVAILABLE"
    assert get(layer).status_code == 200
    third = get(config)  # the third blob GET of any digest
    assert third.status_code == 429
    assert third.headers["Retry-After"] == "7"
    assert get(config).content == registry_anon.blob_path(config).read_bytes()
    assert fault_front.count("GET", layer) == 2
    assert fault_front.count("GET", config) == 2
    # HEADs and manifests are counted but never faulted.
    assert plain.head(f"{fault_front.url}/v2/{name}/blobs/{layer}").status_code == 200
    assert plain.get(f"{fault_front.url}/v2/{name}/manifests/v1", headers=ACCEPT).status_code == 200
    assert fault_front.count("HEAD", layer) == 1
    assert fault_front.count_manifest("GET", name, "v1") == 1
    assert fault_front.count("GET", f"/v2/{name}/manifests/v1") == 1

    fault_front.reset()
    assert fault_front.count("GET", layer) == 0
    assert get(layer).status_code == 200


def test_fault_front_passes_range_requests(registry_anon, fault_front, plain):
    name = _unique("public")
    data = os.urandom(100_000)
    with _pusher_session(registry_anon) as session:
        digest = push_blob(session, name, data)
    url = f"{fault_front.url}/v2/{name}/blobs/{digest}"
    ranged = plain.get(url, headers={"Range": "bytes=1000-1999"})
    assert ranged.status_code == 206
    assert ranged.headers["Content-Range"] == f"bytes 1000-1999/{len(data)}"
    assert ranged.content == data[1000:2000]
    tail = plain.get(url, headers={"Range": "bytes=99000-"})
    assert tail.status_code == 206 and tail.content == data[99000:]
    assert fault_front.range_requests == 2
    assert fault_front.count("GET", digest) == 2
    # A resumed download after a cut: the front serves the rest by Range.
    fault_front.inject(digest=digest, kind="cut", cut_after=30_000)
    with plain.get(url, stream=True) as cut:
        head, _ = _read_all(cut)
    rest = plain.get(url, headers={"Range": f"bytes={len(head)}-"})
    assert hashlib.sha256(head + rest.content).hexdigest() == digest.split(":")[1]
    assert fault_front.range_requests == 3


def test_unsatisfiable_range_gets_a_broken_416(registry_anon, fault_front, plain):
    """A distribution 2.8 quirk the service must live with: a Range starting at the
    blob's size gets 416 with the blob's Content-Length and a short text body, so it
    breaks (a resuming client must never ask for `bytes=<size>-`). The front relays
    that faithfully, and drops the connection instead of hanging."""
    name = _unique("public")
    data = os.urandom(5000)
    with _pusher_session(registry_anon) as session:
        digest = push_blob(session, name, data)
    for base in (registry_anon.url, fault_front.url):
        url = f"{base}/v2/{name}/blobs/{digest}"
        started = time.monotonic()
        with plain.get(
            url, headers={"Range": f"bytes={len(data)}-"}, stream=True, timeout=10
        ) as answer:
            assert answer.status_code == 416
            assert answer.headers["Content-Range"] == f"bytes */{len(data)}"
            assert answer.headers["Content-Length"] == str(len(data))
            answer.raw.enforce_content_length = True
            received, error = _read_all(answer)
        # At most Go's error text ("invalid range: failed to overlap"), never the blob.
        assert len(received) < len(data) and error is not None, received
        assert time.monotonic() - started < 5


def test_fronts_bind_the_addresses_they_claim(redirect_front_anon, fault_front):
    for host_port in (
        redirect_front_anon.host,
        redirect_front_anon.blob_host.host,
        fault_front.host,
    ):
        host, port = host_port.rsplit(":", 1)
        assert host.startswith("127.")
        with socket.create_connection((host, int(port)), timeout=2):
            pass
    assert redirect_front_anon.blob_host.host.startswith("127.0.0.2:")


# --- manifests by hand, for the image factory's sake -------------------------------------


def test_push_manifest_by_digest_and_tag(registry_token, plain):
    name = _unique("public")
    with _pusher_session(registry_token) as session:
        config = json.dumps(
            {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}
        ).encode()
        config_digest = push_blob(session, name, config)
        manifest = json.dumps(schema2_manifest((config_digest, len(config)), [])).encode()
        digest = push_manifest(session, name, digest_of(manifest), manifest)
        assert push_manifest(session, name, "latest", manifest) == digest
    with registry_session(registry_token) as anonymous:
        answer = anonymous.get(f"/v2/{name}/manifests/latest", headers=ACCEPT)
        assert answer.status_code == 200
        assert answer.headers["Docker-Content-Digest"] == digest


# --- the project's server under gunicorn ------------------------------------------------


def test_passthrough_server_starts_with_a_scrubbed_environment(
    passthrough_server, registry_anon, monkeypatch, plain
):
    # Were these to leak into the server, its configuration check would stop it.
    monkeypatch.setenv("REGISTRY_URL", "ftp://leaked.invalid")
    monkeypatch.setenv("LOG_LEVEL", "nonsense")
    server = passthrough_server({"REGISTRY_URL": registry_anon.url})
    assert plain.get(f"{server.url}/health").status_code == 200
    # An idle keep-alive connection would hold up gunicorn's graceful stop by seconds.
    plain.close()
    assert server.tmpdir.is_dir()
    assert server.leftover_temp_files() == []
    env = server.environment()
    assert env["REGISTRY_URL"] == registry_anon.url
    assert "LOG_LEVEL" not in env
    assert env["TMPDIR"] == str(server.tmpdir)
    assert not os.path.exists(env["ENV_FILE"])
    pid = server.pid
    assert server.stop() == 0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
