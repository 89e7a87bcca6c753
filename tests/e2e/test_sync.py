"""`passthrough sync` and `/api/v1/sync` end to end, against the rig registry behind a
counting FaultFront: what a SYNC_FILE selects (a tag glob, a regex, a semver range,
latest N, two of an index's three platforms, a repository glob read from `_catalog`)
comes over the upstream link once per blob and nothing else does; a second run fetches
nothing; `--dry-run` fetches nothing; a bad file is one line and no request. The API
starts one run at a time (409 for a second) and lists the runs, the CLI's too, for
admins only. Then the upstream is stopped and the module's server serves the synced
images from its store: docker pull (dockerd's mirror) and ctr pull (a hosts.toml
mirror) through /v2 (PROXY_SERVE_STALE), and the tar route by tag (SERVE_STALE).

Two replicas' worth of `passthrough sync` on one S3 store with Redis, started at once,
fetch each blob once between them.

The module's server has users (HTPASSWD_FILE, ACCESS_FILE with an admin group), so its
/v2 asks for tokens: docker and ctr pull anonymously through the token service.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import secrets
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.e2e.helpers import check_archive, push
from tests.e2e.test_v2_clients import ctr_hosts_dir, docker_pull_and_run
from tests.support.docker_engine import RUNC, DockerEngine
from tests.support.fixtures_matrix import s3_env
from tests.support.fronts import BLOB_PATH, FaultFront
from tests.support.htpasswd import bcrypt_line
from tests.support.images import (
    File,
    Image,
    Index,
    ManifestKind,
    build_image,
    build_index,
    make_layer,
    runnable_image,
    tar_layer,
)
from tests.support.procs import LOOPBACK, free_port
from tests.support.redis_server import RedisServer
from tests.support.registry import RegistryServer
from tests.support.relay import TcpRelay
from tests.support.seaweed import SeaweedS3
from tests.support.server import PassthroughServer, scrubbed_environment

pytestmark = pytest.mark.rig

ALIAS = "lab"
SECRET = "e2e secret of the sync module's server"
ADMIN = ("alice", "alice-pw")
NOT_ADMIN = ("bob", "bob-pw")
ACCESS = """\
groups:
  admin: [alice]
rules:
  - repositories: ["hosted/*"]
    pull: ["*"]
"""


# --- images -----------------------------------------------------------------------------


def small(
    marker: str,
    *,
    kind: ManifestKind = "docker",
    architecture: str = "amd64",
    variant: str | None = None,
) -> Image:
    """An image of one tiny layer of its own (its blobs are nobody else's)."""
    layer = make_layer(tar_layer([File("id", marker.encode())]), "gzip", kind=kind)
    return build_image(
        [layer], kind=kind, architecture=architecture, variant=variant, marker=marker
    )


def sized(marker: str, size: int) -> Image:
    """An image of one layer of `size` random bytes (which gzip cannot shrink)."""
    data = File("data", secrets.token_bytes(size))
    layer = make_layer(tar_layer([File("id", marker.encode()), data]), "gzip")
    return build_image([layer], marker=marker)


@dataclass
class Content:
    """What the module pushed, by tag (`app`), and the rest."""

    prefix: str
    app: dict[str, Image]
    multi: Index
    team: dict[str, Image]
    other: Image
    api: Image

    @property
    def amd64(self) -> Image:
        return self.multi.image_for("linux", "amd64")

    @property
    def arm64(self) -> Image:
        return self.multi.image_for("linux", "arm64", "v8")

    @property
    def s390x(self) -> Image:
        return self.multi.image_for("linux", "s390x")


APP_TAGS = ("1.0", "1.24.0", "1.25.0", "1.25.3", "1.26.1", "2.0.0", "2.1.0", "latest", "nightly-1")
#: What the module's SYNC_FILE selects of `app`: nightly-* (glob), ^1\.0$ (regex),
#: >=1.25 <2 (semver), and the 2 highest of >=1 (latest: 2).
APP_SYNCED = ("nightly-1", "1.0", "1.25.0", "1.25.3", "1.26.1", "2.1.0", "2.0.0")


@pytest.fixture(scope="module")
def content(registry_anon: RegistryServer) -> Content:
    prefix = f"acc/sync{secrets.token_hex(4)}"
    app = {
        tag: runnable_image(f"sync-{prefix}-{tag}") if tag == "1.26.1" else small(f"{prefix}:{tag}")
        for tag in APP_TAGS
    }
    for tag, image in app.items():
        push(registry_anon, f"{prefix}/app", tag, image)
    multi = build_index(
        [
            runnable_image(f"sync-{prefix}-multi", kind="oci"),
            small(f"{prefix} arm64", kind="oci", architecture="arm64", variant="v8"),
            small(f"{prefix} s390x", kind="oci", architecture="s390x"),
        ],
        kind="oci",
    )
    push(registry_anon, f"{prefix}/multi", "1.0", multi)
    team = {name: small(f"{prefix} team {name}") for name in ("a", "b")}
    for name, image in team.items():
        push(registry_anon, f"{prefix}/team/{name}", "v1", image)
    other = small(f"{prefix} other")
    push(registry_anon, f"{prefix}/other/c", "v1", other)
    api = small(f"{prefix} api")
    push(registry_anon, f"{prefix}/api", "1.0", api)
    return Content(prefix, app, multi, team, other, api)


def sync_file(prefix: str) -> str:
    return f"""\
images:
  - repository: {prefix}/app
    tags: ["nightly-*"]
  - repository: {prefix}/app
    regex: '^1\\.0$'
  - repository: {prefix}/app
    semver: ">=1.25 <2"
  - repository: {prefix}/app
    semver: ">=1"
    latest: 2
  - upstream: {ALIAS}
    repository: {prefix}/multi
    tags: ["1.0"]
    platforms: [linux/amd64, linux/arm64]
  - repository: "{prefix}/team/*"
    tags: [v1]
"""


def expected_images(content: Content) -> set[str]:
    p = content.prefix
    return {
        *(f"{p}/app:{tag}" for tag in APP_SYNCED),
        f"{ALIAS}/{p}/multi:1.0",
        f"{p}/team/a:v1",
        f"{p}/team/b:v1",
    }


def synced_images(content: Content) -> list[Image]:
    return [
        *(content.app[tag] for tag in APP_SYNCED),
        content.amd64,
        content.arm64,
        *content.team.values(),
    ]


def not_synced_images(content: Content) -> list[Image]:
    return [content.app["1.24.0"], content.app["latest"], content.s390x, content.other]


# --- the module's server ----------------------------------------------------------------


@pytest.fixture(scope="module")
def front(registry_anon: RegistryServer) -> Iterator[FaultFront]:
    with FaultFront(registry_anon) as front:
        yield front


@dataclass
class Rig:
    server: PassthroughServer
    env: dict[str, str]
    root: Path


@pytest.fixture(scope="module")
def rig(
    tmp_path_factory: pytest.TempPathFactory, front: FaultFront, content: Content
) -> Iterator[Rig]:
    root = tmp_path_factory.mktemp("sync")
    (root / "htpasswd").write_text(
        "".join(bcrypt_line(user, password) + "\n" for user, password in (ADMIN, NOT_ADMIN))
    )
    (root / "access.yaml").write_text(ACCESS)
    # The API's file names one image of its own.
    (root / "api.yaml").write_text(
        f"images:\n  - repository: {content.prefix}/api\n    tags: ['1.0']\n"
    )
    public_port = free_port()
    env = {
        "REGISTRY_URL": front.url,
        "UPSTREAMS": f"{ALIAS}={front.url}",
        "CACHE_DIR": str(root / "cache"),
        "SERVE_STALE": "true",
        "PROXY_SERVE_STALE": "true",
        "SYNC_FILE": str(root / "api.yaml"),
        "HTPASSWD_FILE": str(root / "htpasswd"),
        "ACCESS_FILE": str(root / "access.yaml"),
        "PUBLIC_URL": f"http://{LOOPBACK}:{public_port}",
        "TOKEN_SECRET": SECRET,
        # A retried blob GET waits this long at most (the API test's slow run).
        "UPSTREAM_RETRY_AFTER_MAX": "3",
    }
    server = PassthroughServer(
        env, workers=2, tmp_root=root, extra_args=("--bind", f"{LOOPBACK}:{public_port}")
    )
    server.start()
    try:
        yield Rig(server, env, root)
    finally:
        server.stop()
        print(f"--- passthrough server {server.url}: warnings, errors and failed requests ---")
        for line in server.log_text().splitlines():
            if not re.match(r'\S+ "[A-Z]+ [^"]*" [23]\d\d ', line):
                print(line)


def sync_command(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("passthrough")), "sync", *args]


def run_sync(
    env: dict[str, str], tmpdir: Path, *args: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """`passthrough sync ARGS` with `env` over a scrubbed environment and its own TMPDIR."""
    full = scrubbed_environment()
    full.update(env)
    tmpdir.mkdir(parents=True, exist_ok=True)
    full.update({"TMPDIR": str(tmpdir), "ENV_FILE": str(tmpdir / "no-such.env")})
    return subprocess.run(
        sync_command(*args), env=full, capture_output=True, text=True, timeout=timeout, check=False
    )


def json_lines(stdout: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    lines = [json.loads(line) for line in stdout.splitlines()]
    *images, last = lines
    return images, last["summary"]


def blob_gets(front: FaultFront) -> dict[str, int]:
    found: dict[str, int] = {}
    for entry in front.log:
        match = BLOB_PATH.match(entry.path)
        if entry.method == "GET" and match:
            found[match["digest"]] = found.get(match["digest"], 0) + 1
    return found


def stored_blobs(cache: Path) -> set[str]:
    directory = cache / "blobs" / "sha256"
    if not directory.is_dir():
        return set()
    return {"sha256:" + path.name.rpartition("-")[0] for path in directory.iterdir()}


# --- the CLI ------------------------------------------------------------------------------


def test_sync_fetches_what_the_file_selects_once(
    rig: Rig, front: FaultFront, content: Content, tmp_path: Path
) -> None:
    (tmp_path / "sync.yaml").write_text(sync_file(content.prefix))
    front.reset()
    done = run_sync(rig.env, tmp_path / "host", "--json", "--file", str(tmp_path / "sync.yaml"))
    assert done.returncode == 0, done.stderr
    images, summary = json_lines(done.stdout)
    assert {i["image"] for i in images} == expected_images(content)
    assert summary["failed"] == [] and summary["images"] == len(expected_images(content))
    multi = next(i for i in images if i["image"].endswith("/multi:1.0"))
    assert multi["digest"] == content.multi.digest
    assert multi["platforms"] == ["linux/amd64", "linux/arm64/v8"]

    # Every blob of what was selected, once; nothing of the rest.
    gets = blob_gets(front)
    wanted = {d for image in synced_images(content) for d in image.blobs()}
    assert gets == dict.fromkeys(wanted, 1)
    assert summary["blobs"] == len(wanted)
    sizes = {d: blob.size for image in synced_images(content) for d, blob in image.blobs().items()}
    assert summary["bytes"] == sum(sizes.values())
    assert wanted <= stored_blobs(Path(rig.env["CACHE_DIR"]))
    for image in not_synced_images(content):
        assert not set(image.blobs()) & set(gets), image.marker

    # Again: everything is there, nothing is fetched; the plain output, a line per image.
    front.reset()
    again = run_sync(rig.env, tmp_path / "host", "--file", str(tmp_path / "sync.yaml"))
    assert again.returncode == 0, again.stderr
    assert blob_gets(front) == {}
    lines = again.stdout.splitlines()
    assert len(lines) == len(expected_images(content)) + 1
    assert all(" 0 blobs, 0 B fetched" in line for line in lines[:-1]), lines
    assert lines[-1].startswith(f"synced {len(expected_images(content))} images: 0 blobs")

    # A pinned digest's tar route is served from the store: no blob GET.
    image = content.app["1.26.1"]
    ref = f"{content.prefix}/app@{image.digest}"
    response = requests.get(f"{rig.server.url}/ref/{ref}.tar", timeout=60)
    assert response.status_code == 200, response.text
    archive = tmp_path / "pinned.tar"
    archive.write_bytes(response.content)
    check_archive(archive, image)
    assert blob_gets(front) == {}


def test_dry_run_lists_and_fetches_nothing(
    rig: Rig, front: FaultFront, content: Content, tmp_path: Path
) -> None:
    (tmp_path / "dry.yaml").write_text(
        f"images:\n  - repository: {content.prefix}/app\n    tags: [latest, '1.24.*']\n"
    )
    cache = Path(rig.env["CACHE_DIR"])
    before = stored_blobs(cache)
    manifests = set((cache / "manifests" / "sha256").iterdir())
    front.reset()
    done = run_sync(rig.env, tmp_path / "host", "--dry-run", "--file", str(tmp_path / "dry.yaml"))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    image = content.app["1.24.0"]
    assert any(
        line.startswith(f"would fetch {content.prefix}/app:1.24.0 {image.digest}: 2 blobs")
        for line in lines
    ), lines
    assert lines[-1].startswith("would sync 2 images: 4 blobs")
    assert blob_gets(front) == {}
    assert stored_blobs(cache) == before
    assert set((cache / "manifests" / "sha256").iterdir()) == manifests


@pytest.mark.parametrize(
    ("entry", "named"),
    [
        ("  - repository: {p}/app\n    tags: ['1.[0']\n", "entry 1 ({p}/app): bad glob '1.[0'"),
        ("  - repository: {p}/app\n    semver: '>=1.x.y'\n", "entry 1 ({p}/app): bad semver"),
        ("  - repository: {p}/app\n    regex: '(1'\n", "entry 1 ({p}/app): bad regex"),
        ("  - repository: {p}/app\n    tag: [v1]\n", "entry 1 ({p}/app): unknown key 'tag'"),
        (
            "  - repository: {p}/app\n    tags: [v1]\n  - upstream: nowhere\n"
            "    repository: {p}/app\n    tags: [v1]\n",
            "entry 2 ({p}/app): unknown upstream alias 'nowhere'",
        ),
    ],
    ids=["glob", "semver", "regex", "key", "alias"],
)
def test_a_bad_sync_file_is_one_line_and_nothing_fetched(
    entry: str, named: str, rig: Rig, front: FaultFront, content: Content, tmp_path: Path
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("images:\n" + entry.format(p=content.prefix))
    front.reset()
    done = run_sync(rig.env, tmp_path / "host", "--file", str(path))
    assert done.returncode == 2
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"passthrough sync: {path}: ")
    assert named.format(p=content.prefix) in line
    assert front.log == []


# --- the API ------------------------------------------------------------------------------


def api(rig: Rig, method: str, auth: tuple[str, str] | None = ADMIN) -> requests.Response:
    return requests.request(method, f"{rig.server.url}/api/v1/sync", auth=auth, timeout=30)


def test_the_api_runs_one_sync_at_a_time_for_admins(
    rig: Rig, front: FaultFront, content: Content
) -> None:
    for method in ("GET", "POST"):
        anonymous = api(rig, method, None)
        assert anonymous.status_code == 401
        assert anonymous.headers["WWW-Authenticate"].startswith("Basic ")
        assert anonymous.json()["errors"][0]["code"] == "UNAUTHORIZED"
        refused = api(rig, method, NOT_ADMIN)
        assert refused.status_code == 403
        error = refused.json()["errors"][0]
        assert (error["code"], error["message"]) == (
            "DENIED",
            "user 'bob' is no admin of this door",
        )

    # The run's first blob GET is answered 429 with Retry-After: 2: it lasts seconds.
    front.reset()
    front.inject(content.api.config_digest, kind="429", retry_after=2)
    started = api(rig, "POST")
    assert started.status_code == 202, started.text
    run = started.json()["run"]
    assert run["state"] == "running" and run["trigger"] == "api"
    second = api(rig, "POST")
    assert second.status_code == 409, second.text
    assert second.json()["errors"][0]["code"] == "SYNC_RUNNING"

    deadline = time.monotonic() + 60
    while True:
        runs = api(rig, "GET").json()["runs"]
        mine = next(r for r in runs if r["id"] == run["id"])
        if mine["state"] != "running" or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert mine["state"] == "succeeded" and mine["progress"] == "1/1", mine
    assert mine["images"] == 1 and mine["bytes"] == sum(
        blob.size for blob in content.api.blobs().values()
    )
    assert blob_gets(front) == {content.api.config_digest: 2, content.api.layers[0].digest: 1}
    # The CLI's runs are listed too (the store keeps them for every replica).
    assert any(r["trigger"] == "cli" and r["state"] == "succeeded" for r in runs), runs

    metrics = requests.get(f"{rig.server.url}/metrics", timeout=30).text
    assert re.search(r'^passthrough_sync_images_total\{outcome="synced"\} [1-9]', metrics, re.M)
    assert re.search(r"^passthrough_sync_bytes_total [1-9]", metrics, re.M)

    # Finished: another run may start, and finds everything there.
    again = api(rig, "POST")
    assert again.status_code == 202, again.text


# --- offline -------------------------------------------------------------------------------


@pytest.fixture
def offline(rig: Rig, front: FaultFront) -> Iterator[Rig]:
    """The module's server with its upstream gone (the front stopped: connections refused).
    The module's last tests: the front is not started again."""
    front.stop()
    yield rig


def test_synced_images_are_served_with_the_upstream_down(
    offline: Rig,
    content: Content,
    docker_engine: DockerEngine,
    docker_mirror: TcpRelay,
    tmp_path: Path,
) -> None:
    server = offline.server
    image = content.app["1.26.1"]
    name = f"{content.prefix}/app"

    # The tar route by tag (SERVE_STALE, the record sync wrote), of an image no tar was
    # made of: the layer tar comes from the stored blob, with no upstream; and with
    # layers=gzip, the stored blob itself.
    gz = content.app["1.25.3"]
    blob = gz.layers[0].data
    assert blob is not None
    filename = name.replace("/", "__") + "_1.25.3.tar"
    for query, layer_bytes in (
        ("", gzip.decompress(blob)),
        ("?layers=gzip", blob),
    ):
        response = requests.get(f"{server.url}/docker/{filename}{query}", timeout=60)
        assert response.status_code == 200, response.text
        assert response.headers["Warning"].startswith("110 "), response.headers
        with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
            (entry,) = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
            assert tar.extractfile(entry["Config"]).read() == gz.config  # type: ignore[union-attr]
            (layer_file,) = entry["Layers"]
            assert tar.extractfile(layer_file).read() == layer_bytes  # type: ignore[union-attr]

    # docker pull through dockerd's registry mirror (/v2/<name>/manifests/1.26.1).
    with docker_mirror.attached(LOOPBACK, server.port):
        inspect = docker_pull_and_run(docker_engine, f"{name}:1.26.1", image.marker or "")
    assert inspect["Id"] == image.config_digest

    # ctr pull of both synced platforms through a hosts.toml mirror (?ns=<front host>,
    # which the alias's URL has).
    front_host = re.sub(r"^https?://", "", offline.env["REGISTRY_URL"])
    hosts = ctr_hosts_dir(tmp_path, front_host, server.url)
    namespace = f"sync-{secrets.token_hex(4)}"
    ref = f"{front_host}/{content.prefix}/multi:1.0"
    try:
        docker_engine.ctr(
            namespace, "images", "pull", "--hosts-dir", str(hosts), "--snapshotter", "native",
            "--platform", "linux/amd64", "--platform", "linux/arm64/v8", ref,
        )  # fmt: skip
        run = docker_engine.ctr(
            namespace, "run", "--rm", "--snapshotter", "native", "--runc-binary", RUNC, ref,
            f"c-{secrets.token_hex(4)}",
        )  # fmt: skip
        assert content.amd64.marker in run.stdout.splitlines(), run.stdout
    finally:
        listed = docker_engine.ctr(namespace, "images", "ls", "-q", check=False).stdout.split()
        if listed:
            docker_engine.ctr(namespace, "images", "rm", "--sync", *listed, check=False)
        docker_engine.ctr(namespace, "namespaces", "rm", namespace, check=False)
    # Served stale, as the Warning header says; no 5xx meanwhile.
    assert not re.search(r'"(GET|HEAD) /v2/[^"]*" 5\d\d ', server.log_text())


# --- two replicas ---------------------------------------------------------------------------


def test_two_replicas_on_s3_and_redis_fetch_each_blob_once(
    seaweed: SeaweedS3,
    s3_bucket: str,
    redis_server: RedisServer,
    registry_anon: RegistryServer,
    tmp_path: Path,
) -> None:
    redis_server.ensure_running()
    prefix = f"acc/syncrep{secrets.token_hex(4)}"
    # Each with a layer of 512 KiB of its own, so the two runs overlap on the wire.
    images = {f"{prefix}/r{n}": sized(f"{prefix} {n}", 512 << 10) for n in range(6)}
    for repository, image in images.items():
        push(registry_anon, repository, "1.0", image)
    (tmp_path / "sync.yaml").write_text(
        f"images:\n  - repository: '{prefix}/*'\n    tags: ['1.0']\n"
    )
    with FaultFront(registry_anon) as front:
        env = {**s3_env(seaweed, s3_bucket), "REDIS_URL": redis_server.url,
               "REGISTRY_URL": front.url}  # fmt: skip
        command = sync_command("--json", "--file", str(tmp_path / "sync.yaml"))
        processes = []
        for host in ("a", "b"):
            full = scrubbed_environment()
            full.update(env)
            (tmp_path / host).mkdir()
            full.update({"TMPDIR": str(tmp_path / host), "ENV_FILE": str(tmp_path / "none")})
            processes.append(
                subprocess.Popen(
                    command, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
                )
            )
        outputs = [process.communicate(timeout=300) for process in processes]
        for process, (_, stderr) in zip(processes, outputs, strict=True):
            assert process.returncode == 0, stderr
        summaries = [json_lines(stdout)[1] for stdout, _ in outputs]
        wanted = {d for image in images.values() for d in image.blobs()}
        assert blob_gets(front) == dict.fromkeys(wanted, 1)
    # Each accounts for every blob: brought in (by itself, or by the other while it
    # waited for the other's fetch), or found stored.
    assert all(s["images"] == len(images) for s in summaries)
    assert all(s["blobs"] + s["present"] == len(wanted) for s in summaries)
