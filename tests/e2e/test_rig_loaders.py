"""The loader side of the rig, proven against real tools before passthrough uses it.

Images from tests.support.images are pushed to a private Debian docker-registry
(anonymous, Basic, and token auth), copied out with skopeo into docker-archive
files, and loaded and run by the fixture dockerd and by podman. The registries
here are private to this file; the shared ones live in tests/support/registry.py.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import http.server
import importlib.util
import io
import json
import os
import signal
import socket
import subprocess
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from tests.support.docker_engine import DockerEngine, _shim_pids
from tests.support.images import (
    ALL_EXTRAS,
    DOCKER_MANIFEST,
    EMPTY_TAR,
    EMPTY_TAR_DIFF_ID,
    OCI_LAYER_ZSTD,
    Image,
    PushError,
    big_layer,
    decompress,
    multi_platform_index,
    push_image,
    push_index,
    push_raw_manifest,
    runnable_image,
)
from tests.support.loaders import (
    LoaderError,
    docker_load_and_run,
    podman_load,
    skopeo_copy_to_archive,
    skopeo_inspect_archive,
    skopeo_inspect_oci_archive,
)

if importlib.util.find_spec("tests.conftest") is None:
    # Until the lead's conftest star-imports tests.support.fixtures_loaders.
    from tests.support.fixtures_loaders import docker_engine  # noqa: F401

pytestmark = pytest.mark.rig

REGISTRY_BIN = "/usr/bin/docker-registry"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class _Registry:
    """A docker-registry process of this file's own, stopped by pid."""

    proc: subprocess.Popen[bytes]
    port: int
    root: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _start_registry(root: Path, auth: dict[str, Any] | None = None) -> _Registry:
    if not os.access(REGISTRY_BIN, os.X_OK):
        raise RuntimeError(f"{REGISTRY_BIN} missing (apt-get install docker-registry)")
    port = _free_port()
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(root / "storage")},
                    "delete": {"enabled": True},
                    "maintenance": {"uploadpurging": {"enabled": False}}},
        "http": {"addr": f"127.0.0.1:{port}", "secret": "rig-loaders-test"},
    }
    if auth:
        config["auth"] = auth
    (root / "config.yml").write_text(yaml.safe_dump(config))
    log = (root / "registry.log").open("wb")
    proc = subprocess.Popen([REGISTRY_BIN, "serve", str(root / "config.yml")],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    reg = _Registry(proc, port, root)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError((root / "registry.log").read_text())
        try:
            if requests.get(f"{reg.url}/v2/", timeout=2).status_code in (200, 401):
                return reg
        except requests.ConnectionError:
            time.sleep(0.05)
    reg.stop()
    raise RuntimeError("docker-registry did not answer in 30s")


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Registry]:
    reg = _start_registry(tmp_path_factory.mktemp("registry"))
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Registry]:
    root = tmp_path_factory.mktemp("basic-registry")
    subprocess.run(["htpasswd", "-Bbc", str(root / "htpasswd"), "alice", "s3cret"], check=True,
                   capture_output=True)
    reg = _start_registry(root, {"htpasswd": {"realm": "rig", "path": str(root / "htpasswd")}})
    try:
        yield reg
    finally:
        reg.stop()


# --- a minimal Docker token issuer (RS256, kid in libtrust form) -----------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _libtrust_kid(key: rsa.RSAPrivateKey) -> str:
    # docker/libtrust: base32 of the first 240 bits of sha256(DER SPKI), in 4s.
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    b32 = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(b32[i:i + 4] for i in range(0, len(b32), 4))


@dataclass
class _TokenIssuer:
    server: http.server.ThreadingHTTPServer
    thread: threading.Thread
    issued: list[str]

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/token"


def _start_issuer(key: rsa.RSAPrivateKey, user: str, password: str) -> _TokenIssuer:
    kid = _libtrust_kid(key)
    issued: list[str] = []
    expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            query = parse_qs(urlsplit(self.path).query)
            if self.headers.get("Authorization") != expected:
                self.send_response(401)
                self.end_headers()
                return
            access = []
            for scope in query.get("scope", []):
                kind, name, actions = scope.split(":")
                access.append({"type": kind, "name": name, "actions": actions.split(",")})
            issued.extend(query.get("scope", []))
            now = int(time.time())
            header = {"typ": "JWT", "alg": "RS256", "kid": kid}
            claims = {"iss": "rig-issuer", "sub": user, "aud": query["service"][0],
                      "exp": now + 300, "nbf": now - 10, "iat": now,
                      "jti": uuid.uuid4().hex, "access": access}
            signing_input = (_b64url(json.dumps(header).encode()) + "."
                             + _b64url(json.dumps(claims).encode()))
            sig = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
            body = json.dumps({"token": signing_input + "." + _b64url(sig),
                               "expires_in": 300}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return _TokenIssuer(server, thread, issued)


@pytest.fixture(scope="module")
def token_registry(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[_Registry, _TokenIssuer]]:
    root = tmp_path_factory.mktemp("token-registry")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rig-issuer")])
    now = time.time()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(dt.datetime.fromtimestamp(now - 3600, dt.UTC))
            .not_valid_after(dt.datetime.fromtimestamp(now + 86400, dt.UTC))
            .sign(key, hashes.SHA256()))
    (root / "issuer.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    issuer = _start_issuer(key, "bob", "hunter2")
    try:
        reg = _start_registry(root, {"token": {
            "realm": issuer.realm, "service": "rig-registry", "issuer": "rig-issuer",
            "rootcertbundle": str(root / "issuer.pem")}})
        try:
            yield reg, issuer
        finally:
            reg.stop()
    finally:
        issuer.server.shutdown()
        issuer.server.server_close()
        issuer.thread.join(10)


# --- helpers -----------------------------------------------------------------


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _roundtrip(engine: DockerEngine, reg: _Registry, image: Image, tmp: Path, *,
               via_dir: bool = False) -> None:
    """push -> skopeo docker-archive -> docker run, podman load+run, skopeo inspect."""
    tag = _unique("t")
    push_image(reg.url, "rig/loaders", tag, image)
    ref = f"{reg.host}/rig/loaders:{tag}"
    archive = skopeo_copy_to_archive(ref, tmp / "image.tar", via_dir=via_dir)
    assert image.marker
    run = docker_load_and_run(engine.host, archive, ref, marker=image.marker)
    assert run.repo_tags == [ref]
    assert run.layers == image.diff_ids
    if image.media_type == DOCKER_MANIFEST:
        # The config blob travels unchanged, so docker's image ID is its digest.
        assert run.image_id == image.config_digest
    pod = podman_load(archive, run_marker=image.marker)
    assert pod.names == [ref]
    assert pod.layers == image.diff_ids
    info = skopeo_inspect_archive(archive)
    # docker-archive holds uncompressed layers, so their digests are the diff_ids.
    assert info["Layers"] == image.diff_ids
    assert info["Architecture"] == "amd64"
    assert info["Os"] == "linux"


# --- tests ---------------------------------------------------------------------


def test_docker_engine_facts(docker_engine: DockerEngine) -> None:
    info = docker_engine.info()
    assert info["Driver"] == "vfs"
    assert info["DockerRootDir"] == str(docker_engine.data_root)
    assert docker_engine.startup_seconds is not None and docker_engine.startup_seconds < 30


@pytest.mark.parametrize("sh_link", ["symlink", "hardlink"])
def test_docker_v2_gzip_with_all_extras(docker_engine: DockerEngine, registry: _Registry,
                                        tmp_path: Path, sh_link: str) -> None:
    image = runnable_image(_unique("docker-gzip"), kind="docker", compression="gzip",
                           extras=ALL_EXTRAS, sh_link=sh_link)  # type: ignore[arg-type]
    _roundtrip(docker_engine, registry, image, tmp_path)


@pytest.mark.parametrize("compression", ["gzip", "none"])
def test_oci_with_all_extras(docker_engine: DockerEngine, registry: _Registry, tmp_path: Path,
                             compression: str) -> None:
    image = runnable_image(_unique(f"oci-{compression}"), kind="oci",
                           compression=compression,  # type: ignore[arg-type]
                           extras=ALL_EXTRAS, sh_link="hardlink")
    _roundtrip(docker_engine, registry, image, tmp_path)


def test_oci_zstd_with_all_extras(docker_engine: DockerEngine, registry: _Registry,
                                  tmp_path: Path) -> None:
    image = runnable_image(_unique("oci-zstd"), kind="oci", compression="zstd",
                           extras=ALL_EXTRAS)
    tag = _unique("z")
    push_image(registry.url, "rig/zstd", tag, image)
    ref = f"{registry.host}/rig/zstd:{tag}"
    # skopeo 1.9 will not turn zstd OCI layers into a docker-archive directly;
    # pinned so a newer skopeo that can is noticed.
    with pytest.raises(LoaderError, match="zstd compression is not supported for docker images"):
        skopeo_copy_to_archive(ref, tmp_path / "direct.tar")
    # It keeps them as they are in an oci-archive.
    oci = skopeo_copy_to_archive(ref, tmp_path / "image.oci.tar", fmt="oci-archive",
                                 archive_ref=tag)
    # skopeo 1.9's inspect has no LayersData yet: read the manifest itself.
    raw = skopeo_inspect_oci_archive(oci, raw=True)
    assert [d["mediaType"] for d in raw["layers"]] == [OCI_LAYER_ZSTD] * len(image.layers)
    assert skopeo_inspect_oci_archive(oci)["Layers"] == [layer.digest for layer in image.layers]
    _roundtrip(docker_engine, registry, image, tmp_path, via_dir=True)


@pytest.mark.parametrize("kind", ["oci", "docker"])
def test_multi_platform_index(docker_engine: DockerEngine, registry: _Registry, tmp_path: Path,
                              kind: str) -> None:
    marker = _unique(f"index-{kind}")
    index = multi_platform_index(marker, kind=kind)  # type: ignore[arg-type]
    assert len(index.attestations) == (2 if kind == "oci" else 0)
    tag = _unique("i")
    digest = push_index(registry.url, "rig/index", tag, index)
    assert digest == index.digest
    got = requests.get(f"{registry.url}/v2/rig/index/manifests/{tag}",
                       headers={"Accept": index.media_type}, timeout=10)
    assert got.content == index.manifest
    ref = f"{registry.host}/rig/index:{tag}"
    archive = skopeo_copy_to_archive(ref, tmp_path / "amd64.tar")
    run = docker_load_and_run(docker_engine.host, archive, ref, marker=f"{marker} linux/amd64")
    assert run.layers == index.image_for("linux", "amd64").diff_ids
    arm = skopeo_copy_to_archive(ref, tmp_path / "arm64.tar", platform=("linux", "arm64", "v8"))
    config = skopeo_inspect_archive(arm, config=True)
    assert config["architecture"] == "arm64"
    assert config["config"]["Cmd"][-1].endswith(f"'{marker} linux/arm64/v8'")


def test_push_by_digest_gives_untagged_archive(docker_engine: DockerEngine,
                                               registry: _Registry, tmp_path: Path) -> None:
    image = runnable_image(_unique("by-digest"), kind="oci", extras=["links"])
    digest = push_image(registry.url, "rig/digest", None, image)
    assert digest == image.digest
    assert requests.get(f"{registry.url}/v2/rig/digest/tags/list",
                        timeout=10).json().get("tags") in (None, [])
    archive = skopeo_copy_to_archive(f"{registry.host}/rig/digest@{digest}", tmp_path / "d.tar")
    assert image.marker
    run = docker_load_and_run(docker_engine.host, archive, marker=image.marker)
    assert run.repo_tags == []
    assert run.loaded == [run.image_id]


def test_push_raw_manifest_keeps_bytes(registry: _Registry) -> None:
    image = runnable_image(_unique("raw"), kind="docker")
    # Docker's own pushes are indented; the registry must keep bytes and digest.
    pretty = json.dumps(image.manifest_json, indent=3).encode()
    digest = push_raw_manifest(registry.url, "rig/raw", "pretty", pretty, image.media_type,
                               image.blobs().values())
    assert digest == "sha256:" + hashlib.sha256(pretty).hexdigest() != image.digest
    got = requests.get(f"{registry.url}/v2/rig/raw/manifests/pretty",
                       headers={"Accept": image.media_type}, timeout=10)
    assert got.content == pretty
    assert got.headers["Docker-Content-Digest"] == digest


def test_big_file_backed_layer_chunked(docker_engine: DockerEngine, registry: _Registry,
                                       tmp_path: Path) -> None:
    big = big_layer(tmp_path / "big.gz", 20 << 20, seed=7)
    assert big.data is None and big.path is not None
    image = runnable_image(_unique("big"), extra_layers=[big])
    push_image(registry.url, "rig/big", "t", image)
    blob = requests.get(f"{registry.url}/v2/rig/big/blobs/{big.digest}", timeout=60)
    assert blob.status_code == 200
    assert "sha256:" + hashlib.sha256(blob.content).hexdigest() == big.digest
    archive = skopeo_copy_to_archive(f"{registry.host}/rig/big:t", tmp_path / "big.tar")
    assert image.marker
    run = docker_load_and_run(docker_engine.host, archive, marker=image.marker)
    assert run.layers == image.diff_ids


def test_docker_saves_empty_layer_as_1024_zero_bytes(docker_engine: DockerEngine,
                                                     registry: _Registry,
                                                     tmp_path: Path) -> None:
    image = runnable_image(_unique("empty"), extras=["empty"])
    push_image(registry.url, "rig/empty", "t", image)
    archive = skopeo_copy_to_archive(f"{registry.host}/rig/empty:t", tmp_path / "in.tar")
    assert image.marker
    run = docker_load_and_run(docker_engine.host, archive, marker=image.marker, remove=False)
    try:
        docker_engine.docker("save", "-o", str(tmp_path / "saved.tar"), run.image_id)
    finally:
        docker_engine.docker("rmi", "-f", run.image_id, check=False)
    with tarfile.open(tmp_path / "saved.tar") as saved:
        manifest = json.load(saved.extractfile("manifest.json"))  # type: ignore[arg-type]
        layers = manifest[0]["Layers"]
        assert len(layers) == len(image.layers)
        empty = saved.extractfile(layers[1])
        assert empty is not None
        assert empty.read() == EMPTY_TAR
    assert image.diff_ids[1] == EMPTY_TAR_DIFF_ID


def test_push_with_basic_auth(basic_registry: _Registry, tmp_path: Path) -> None:
    image = runnable_image(_unique("basic"), kind="oci")
    with pytest.raises(PushError, match="401"):
        push_image(basic_registry.url, "rig/basic", "t", image)
    push_image(basic_registry.url, "rig/basic", "t", image, auth=("alice", "s3cret"))
    archive = skopeo_copy_to_archive(f"{basic_registry.host}/rig/basic:t", tmp_path / "b.tar",
                                     creds=("alice", "s3cret"))
    assert skopeo_inspect_archive(archive)["Layers"] == image.diff_ids


def test_push_with_token_auth(token_registry: tuple[_Registry, _TokenIssuer],
                              tmp_path: Path) -> None:
    reg, issuer = token_registry
    index = multi_platform_index(_unique("token"), kind="oci")
    with pytest.raises(PushError, match="token request"):
        push_index(reg.url, "rig/token", "t", index, auth=("bob", "wrong"))
    push_index(reg.url, "rig/token", "t", index, auth=("bob", "hunter2"))
    assert "repository:rig/token:pull,push" in issuer.issued
    archive = skopeo_copy_to_archive(f"{reg.host}/rig/token:t", tmp_path / "t.tar",
                                     creds=("bob", "hunter2"))
    assert skopeo_inspect_archive(archive)["Layers"] == index.image_for(
        "linux", "amd64").diff_ids


def test_engine_stop_leaves_nothing() -> None:
    engine = DockerEngine().start()
    try:
        image = runnable_image(_unique("stop"))
        tar = _docker_archive(image, engine.base / "img.tar")
        assert "Loaded image ID: " + image.config_digest in engine.docker(
            "load", "-i", str(tar)).stdout
        # A container that ignores SIGTERM: stop() must kill it, not wait it out.
        engine.docker("run", "-d", "--network", "none", image.config_digest,
                      "/bin/sh", "-c", "trap '' TERM; while :; do /bin/busybox sleep 1; done")
        assert engine._dockerd is not None and engine._containerd is not None
        pids = [engine._dockerd.pid, engine._containerd.pid]
        assert _shim_pids(engine.containerd_sock)
    finally:
        began = time.monotonic()
        engine.stop()
    assert time.monotonic() - began < 20
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid)
    assert _shim_pids(engine.containerd_sock) == []
    assert not engine.base.exists()


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _docker_archive(image: Image, path: Path) -> Path:
    """A minimal `docker save` archive built by hand, for tests that need no registry."""
    with tarfile.open(path, "w") as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        config_name = image.config_digest.split(":")[1] + ".json"
        add(config_name, image.config)
        names = []
        for i, layer in enumerate(image.layers):
            names.append(f"{i}/layer.tar")
            add(names[-1], decompress(layer.read(), layer.compression))
        add("manifest.json", json.dumps(
            [{"Config": config_name, "RepoTags": None, "Layers": names}]).encode())
    return path
