"""Helpers of the download end-to-end tests: module-scoped servers, pushing rig images,
streaming a download to a file the way a router would, and reading the archive."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import secrets
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from requests.structures import CaseInsensitiveDict

from tests.support.images import EMPTY_TAR, Image, Index, push_image, push_index
from tests.support.loaders import DockerRun, docker_load_and_run
from tests.support.registry import PUSHER, Credential, RegistryServer
from tests.support.server import PassthroughServer

PUSH_AUTH = (PUSHER.username, PUSHER.password)
CLIENT_AUTH_CHALLENGE = 'Basic realm="registry credentials"'


def unique(prefix: str) -> str:
    """A repository path component no other test uses (the registries are shared)."""
    return f"{prefix}{secrets.token_hex(4)}"


def encoded(host: str) -> str:
    """host:port with the colon percent-encoded, as some clients send it."""
    return host.replace(":", "%3A")


def basic_header(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def auth_of(credential: Credential) -> tuple[str, str]:
    return (credential.username, credential.password)


@contextlib.contextmanager
def running_server(
    tmp_path_factory: pytest.TempPathFactory, env: Mapping[str, str], **kw: Any
) -> Iterator[PassthroughServer]:
    """A PassthroughServer for a whole module; stopped by pid at the end, its log tail
    printed (pytest shows it when a test of the module fails)."""
    server = PassthroughServer(dict(env), tmp_root=tmp_path_factory.mktemp("passthrough"), **kw)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        print(f"--- passthrough server {server.url} log (last 60 lines) ---")
        print("\n".join(server.log_text().splitlines()[-60:]))


def push(registry: RegistryServer, repository: str, tag: str | None, image: Image | Index) -> str:
    """Push an image or index with the rig's all-powerful pusher; returns its digest."""
    if isinstance(image, Index):
        return push_index(registry.url, repository, tag, image, auth=PUSH_AUTH)
    return push_image(registry.url, repository, tag, image, auth=PUSH_AUTH)


@dataclass
class Fetched:
    """One download as the client saw it: status, headers, the bytes that arrived (in
    `path`) and, when the transfer broke, how."""

    status: int
    headers: CaseInsensitiveDict[str]
    path: Path
    error: BaseException | None

    @property
    def body(self) -> bytes:
        return self.path.read_bytes()

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")

    def describe(self) -> str:
        head = self.body[:300]
        return f"HTTP {self.status} {dict(self.headers)} error={self.error!r} body[:300]={head!r}"


def fetch(
    url: str,
    dest: Path,
    *,
    auth: tuple[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
    method: str = "GET",
    timeout: float = 120.0,
) -> Fetched:
    """GET `url` streaming into `dest`. A broken transfer is recorded, not raised."""
    error: BaseException | None = None
    with requests.Session() as session:
        session.trust_env = False
        with session.request(
            method, url, auth=auth, headers=dict(headers or {}), stream=True, timeout=timeout
        ) as response, dest.open("wb") as out:
            try:
                for chunk in response.iter_content(1 << 20):
                    out.write(chunk)
            except (requests.exceptions.ChunkedEncodingError,
                    requests.exceptions.ConnectionError) as exc:
                error = exc
            return Fetched(response.status_code, response.headers, dest, error)


def download(
    url: str, dest: Path, *, auth: tuple[str, str] | None = None, timeout: float = 120.0
) -> Fetched:
    """A download that must succeed: 200, an unbroken transfer and a complete tar."""
    got = fetch(url, dest, auth=auth, timeout=timeout)
    assert got.status == 200, got.describe()
    assert got.error is None, got.describe()
    assert got.headers["Content-Type"] == "application/x-tar"
    problem = archive_problem(dest)
    assert problem is None, f"{url}: {problem}"
    return got


def tar_problem(path: Path) -> str | None:
    """Why `path` is not a complete tar archive, or None when it is: whole 512-byte
    blocks, every member's data present, and the two zero blocks at the end."""
    size = path.stat().st_size
    if size == 0:
        return "empty body"
    if size % 512:
        return f"{size} bytes is not a whole number of tar blocks"
    with path.open("rb") as f:
        f.seek(size - len(EMPTY_TAR))
        if f.read() != EMPTY_TAR:
            return "no end-of-archive blocks"
    try:
        with tarfile.open(path) as archive:
            for member in archive:
                if member.isfile():
                    data = archive.extractfile(member)
                    assert data is not None
                    if len(data.read()) != member.size:
                        return f"{member.name} is short"
    except (tarfile.TarError, OSError) as exc:
        return f"not a readable tar: {exc}"
    return None


def archive_problem(path: Path) -> str | None:
    """Why `path` is not a complete image archive, or None: a complete tar (a body cut
    at a layer boundary can be one) holding everything its manifest.json names."""
    problem = tar_problem(path)
    if problem is not None:
        return problem
    with tarfile.open(path) as archive:
        names = set(archive.getnames())
        if "manifest.json" not in names:
            return "no manifest.json"
        manifest_file = archive.extractfile("manifest.json")
        assert manifest_file is not None
        manifest = json.load(manifest_file)
    for image in manifest:
        for name in (image["Config"], *image["Layers"]):
            if name not in names:
                return f"manifest.json names {name}, which is not in the archive"
    return None


def check_archive(path: Path, image: Image) -> None:
    """The archive is a docker save of `image`: its config bytes, and every layer tar
    hashing to the config's diff_id, in order."""
    with tarfile.open(path) as tar:
        manifest_file = tar.extractfile("manifest.json")
        assert manifest_file is not None
        (entry,) = json.load(manifest_file)
        config = tar.extractfile(entry["Config"])
        assert config is not None and config.read() == image.config
        diff_ids = []
        for name in entry["Layers"]:
            member = tar.extractfile(name)
            assert member is not None
            digest = hashlib.sha256()
            while chunk := member.read(1 << 20):
                digest.update(chunk)
            diff_ids.append("sha256:" + digest.hexdigest())
    assert diff_ids == image.diff_ids

def member_bytes(path: Path, name: str) -> bytes:
    with tarfile.open(path) as archive:
        member = archive.extractfile(name)
        assert member is not None, name
        return member.read()


def member_json(path: Path, name: str) -> Any:
    return json.loads(member_bytes(path, name))


def members(path: Path) -> dict[str, bytes]:
    """Every regular file of the archive with its content."""
    out: dict[str, bytes] = {}
    with tarfile.open(path) as archive:
        for member in archive:
            if member.isfile():
                data = archive.extractfile(member)
                assert data is not None
                out[member.name] = data.read()
    return out


def one_line_error(fetched: Fetched, status: int | None = None) -> str:
    """The service's error body: `<status> <reason>` on exactly one line."""
    text = fetched.text
    assert fetched.error is None, fetched.describe()
    if status is not None:
        assert fetched.status == status, fetched.describe()
    assert text.endswith("\n") and text.count("\n") == 1, fetched.describe()
    assert text.startswith(f"{fetched.status} "), fetched.describe()
    return text


def load_and_run(
    docker_host: str, archive: Path, repo_tag: str, image: Image, *, marker: str | None = None
) -> DockerRun:
    """docker load + docker run; the marker line proves the right file system ran. Checks
    RepoTags, the layers and that the config travelled byte for byte (image ID)."""
    want = marker or image.marker
    assert want is not None
    run = docker_load_and_run(docker_host, archive, repo_tag, marker=want)
    assert run.repo_tags == [repo_tag]
    assert run.layers == image.diff_ids
    assert run.image_id == image.config_digest
    return run
