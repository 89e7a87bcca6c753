"""``passthrough gc`` as a real process beside a real server: killed with SIGKILL at
several points (after N deletes through the test hook, and after its first output
line) every tag still pulls whole, digests checked, and a later run finishes the job;
the same on the S3 store (SeaweedFS, pushed through the server, an upload left in
progress all along); and gc run in a loop with ``--grace 0s`` while
threads push images: every push that completed stays pullable."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from passthrough.config import load_settings
from passthrough.store import open_store
from passthrough.store.content import ContentStore
from passthrough.store.layout import content_key
from tests.support.fixtures_matrix import s3_env
from tests.support.helpers import digest
from tests.support.seaweed import SeaweedS3
from tests.support.server import REPO_ROOT, PassthroughServer, scrubbed_environment

CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
ACCEPT = ", ".join((MANIFEST_TYPE, INDEX_TYPE))
USER, PASSWORD = "gc", "gc-password"

# gc and the server run as real processes: the full tier.
pytestmark = pytest.mark.rig


def hosted_env(tmp_path: Path) -> dict[str, str]:
    """A hosted area (team/*) with one user, made with htpasswd -B."""
    htpasswd = tmp_path / "htpasswd"
    made = subprocess.run(
        ["htpasswd", "-nbB", USER, PASSWORD], capture_output=True, text=True, check=True
    )
    htpasswd.write_text(made.stdout)
    return {
        "HOSTED_REPOSITORIES": "team/*",
        "HTPASSWD_FILE": str(htpasswd),
        "PUBLIC_URL": "http://127.0.0.1",
        "TOKEN_SECRET": "gc-test-secret-0123456789",
    }


def layer_bytes(marker: str, size: int = 96 * 1024) -> bytes:
    """Deterministic, incompressible-looking bytes of a layer."""
    seed = hashlib.sha256(marker.encode()).digest()
    blocks = (hashlib.sha256(seed + i.to_bytes(4, "big")).digest() for i in range(size // 32))
    return b"".join(blocks)


def image_parts(marker: str, shared: bytes | None = None) -> tuple[list[bytes], bytes]:
    """(config and layers, manifest body) of a small image."""
    config = json.dumps({"marker": marker}).encode()
    layers = [layer_bytes(marker), *([shared] if shared else [])]
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": {"mediaType": CONFIG_TYPE, "digest": digest(config), "size": len(config)},
            "layers": [
                {"mediaType": LAYER_TYPE, "digest": digest(x), "size": len(x)} for x in layers
            ],
        }
    ).encode()
    return [config, *layers], body


class Pusher:
    """Pushes through the server's /v2 API (monolithic blob uploads, manifest PUTs)."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.http = requests.Session()
        self.http.auth = (USER, PASSWORD)

    def blob(self, name: str, data: bytes) -> None:
        response = self.http.post(
            f"{self.base}/v2/{name}/blobs/uploads/",
            params={"digest": digest(data)},
            data=data,
            timeout=60,
        )
        response.raise_for_status()

    def manifest(self, name: str, reference: str, body: bytes, media_type: str) -> str:
        response = self.http.put(
            f"{self.base}/v2/{name}/manifests/{reference}",
            data=body,
            headers={"Content-Type": media_type},
            timeout=60,
        )
        response.raise_for_status()
        return digest(body)

    def image(self, name: str, tag: str | None, marker: str, shared: bytes | None = None) -> str:
        blobs, body = image_parts(marker, shared)
        for data in blobs:
            self.blob(name, data)
        return self.manifest(name, tag or digest(body), body, MANIFEST_TYPE)

    def untag(self, name: str, tag: str) -> None:
        self.http.delete(f"{self.base}/v2/{name}/manifests/{tag}", timeout=60).raise_for_status()


def pulls(base: str, name: str, reference: str, http: requests.Session | None = None) -> None:
    """GET the manifest and, below it, every child and blob; every digest checked."""
    if http is None:
        http = requests.Session()
        http.auth = (USER, PASSWORD)
    response = http.get(
        f"{base}/v2/{name}/manifests/{reference}", headers={"Accept": ACCEPT}, timeout=30
    )
    assert response.status_code == 200, (name, reference, response.text)
    if reference.startswith("sha256:"):
        assert digest(response.content) == reference
    document = json.loads(response.content)
    for child in document.get("manifests", []):
        pulls(base, name, child["digest"], http)
    for entry in [document.get("config"), *document.get("layers", [])]:
        if entry is None:
            continue
        got = http.get(f"{base}/v2/{name}/blobs/{entry['digest']}", timeout=60)
        assert got.status_code == 200, (name, entry["digest"], got.text)
        assert digest(got.content) == entry["digest"]


def gc_command(*args: str) -> list[str]:
    script = Path(sys.executable).with_name("passthrough")
    return [str(script), "gc", *args]


def gc_env(server: PassthroughServer) -> dict[str, str]:
    """The server's settings (the same store, the same TMPDIR: the same lock files)."""
    env = scrubbed_environment()
    env.update({"TMPDIR": str(server.tmpdir), "ENV_FILE": str(server.root / "no-such.env")})
    env.update(server.overrides)
    return env


def run_gc(
    server: PassthroughServer, *args: str, kill_after: int | None = None
) -> subprocess.CompletedProcess[str]:
    """``passthrough gc``; with ``kill_after``, the command killed with SIGKILL right
    after that many deletes (tests/support/gc_killed.py)."""
    command = gc_command(*args)
    if kill_after:
        command = [sys.executable, "-m", "tests.support.gc_killed", str(kill_after), *args]
    return subprocess.run(
        command,
        env=gc_env(server),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@dataclass
class Garbage:
    """What one round pushed: tags that must pull, manifests that must go."""

    tags: list[tuple[str, str]] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)


def make_garbage(push: Pusher, round_number: int) -> Garbage:
    """Tagged images sharing a layer with untagged ones, an index, and orphans."""
    made = Garbage()
    shared = layer_bytes(f"shared-{round_number}", 32 * 1024)
    name = f"team/app{round_number}"
    push.image(name, "keep", f"keep-{round_number}", shared)
    made.tags.append((name, "keep"))
    for number in range(3):
        dropped = push.image(name, f"old{number}", f"old-{round_number}-{number}", shared)
        push.untag(name, f"old{number}")
        made.dropped.append((name, dropped))
    multi = f"team/multi{round_number}"
    children = [push.image(multi, None, f"child-{round_number}-{n}") for n in range(2)]
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": INDEX_TYPE,
            "manifests": [
                {"mediaType": MANIFEST_TYPE, "digest": child, "size": len(image_parts(m)[1])}
                for child, m in zip(
                    children, (f"child-{round_number}-{n}" for n in range(2)), strict=True
                )
            ],
        }
    ).encode()
    push.manifest(multi, "v1", index, INDEX_TYPE)
    made.tags.append((multi, "v1"))
    made.dropped.append((multi, push.image(multi, None, f"orphan-{round_number}")))
    return made


def gone(base: str, name: str, reference: str) -> bool:
    response = requests.get(
        f"{base}/v2/{name}/manifests/{reference}", auth=(USER, PASSWORD), timeout=30
    )
    return response.status_code == 404


@pytest.fixture
def fs_server(tmp_path: Path) -> Iterator[PassthroughServer]:
    env = {"CACHE_DIR": str(tmp_path / "cache"), **hosted_env(tmp_path)}
    with PassthroughServer(env, workers=2) as server:
        yield server


def test_gc_killed_at_several_points_leaves_every_tag_pullable(
    fs_server: PassthroughServer,
) -> None:
    base = fs_server.url
    push = Pusher(base)
    tags: list[tuple[str, str]] = []
    dropped: list[tuple[str, str]] = []
    dry = None
    for round_number, kill_after in enumerate((1, 2, 4, 7, 11, 16, 24)):
        made = make_garbage(push, round_number)
        tags += made.tags
        dropped += made.dropped
        if dry is None:
            dry = run_gc(fs_server, "--grace", "0s")
            assert dry.returncode == 0, dry.stderr
            assert "would remove manifest" in dry.stdout and "would remove blob" in dry.stdout
        killed = run_gc(fs_server, "--delete", "--grace", "0s", kill_after=kill_after)
        assert killed.returncode == -signal.SIGKILL, (killed.stdout, killed.stderr)
        for name, tag in tags:
            pulls(base, name, tag)
    # Killed after its first line of output, by pid.
    made = make_garbage(push, 99)
    tags += made.tags
    dropped += made.dropped
    process = subprocess.Popen(
        gc_command("--delete", "--grace", "0s"),
        env=gc_env(fs_server),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        assert first.startswith("removed "), first
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=60)
        assert process.stdout is not None and process.stderr is not None
        process.stdout.close()
        process.stderr.close()
    for name, tag in tags:
        pulls(base, name, tag)

    finished = run_gc(fs_server, "--delete", "--grace", "0s")
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.splitlines()[-1].startswith("removed ")
    for name, tag in tags:
        pulls(base, name, tag)
    for name, reference in dropped:
        assert gone(base, name, reference), (name, reference)
    again = run_gc(fs_server, "--delete", "--grace", "0s")
    assert again.stdout.startswith("removed 0 manifests, 0 blobs, 0 bytes"), again.stdout


IMAGES_PER_PUSHER = 40


@dataclass
class Churn:
    """What :func:`push_while_gc_runs` saw: the pushes that completed (and still have
    their tag), the gc runs made meanwhile, and the pushes a client had to retry."""

    completed: dict[tuple[str, str], str] = field(default_factory=dict)
    runs: list[subprocess.CompletedProcess[str]] = field(default_factory=list)
    retried: int = 0

    @property
    def blobs_removed(self) -> int:
        lines = (line for run in self.runs for line in run.stdout.splitlines())
        return sum(1 for line in lines if line.startswith("removed blob"))


def push_while_gc_runs(
    urls: list[str],
    prefix: str,
    pushers: int,
    images: int,
    gc: Callable[[], subprocess.CompletedProcess[str]],
) -> Churn:
    """``pushers`` threads (pusher n on ``urls[n % len(urls)]``) each push ``images``
    images into ``team/<prefix><n>``, untagging every other one (garbage made while gc
    runs), while ``gc`` runs in a loop; every gc run must succeed."""
    churn = Churn()
    lock = threading.Lock()
    stop = threading.Event()
    failures: list[BaseException] = []

    def push_retrying(push: Pusher, name: str, tag: str, mark: str, shared: bytes) -> str:
        for attempt in range(6):
            try:
                return push.image(name, tag, mark, shared)
            except requests.HTTPError as exc:
                # gc removed an old copy of a blob between its upload and the manifest:
                # that push did not complete; a client pushes again.
                assert exc.response is not None
                codes = [e["code"] for e in exc.response.json()["errors"]]
                assert codes in (["MANIFEST_BLOB_UNKNOWN"], ["BLOB_UNKNOWN"]), codes
                with lock:
                    churn.retried += 1
                if attempt == 5:
                    raise
        raise AssertionError("unreachable")

    def pusher(number: int) -> None:
        push = Pusher(urls[number % len(urls)])
        name = f"team/{prefix}{number}"
        shared = layer_bytes(f"{prefix}-shared-{number}", 16 * 1024)
        try:
            for i in range(images):
                manifest = push_retrying(push, name, f"v{i}", f"{prefix}-{number}-{i}", shared)
                with lock:
                    churn.completed[(name, f"v{i}")] = manifest
                if i % 2:
                    push.untag(name, f"v{i - 1}")
                    with lock:
                        del churn.completed[(name, f"v{i - 1}")]
            # On a loaded machine one gc run can outlast every push: go on making
            # garbage (pushed, then untagged) until gc has run at least twice meanwhile.
            deadline = time.monotonic() + 120
            extra = 0
            while len(churn.runs) < 2 and time.monotonic() < deadline:
                push_retrying(push, name, "scratch", f"{prefix}-{number}-x{extra}", shared)
                push.untag(name, "scratch")
                extra += 1
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    def collector() -> None:
        while not stop.is_set():
            churn.runs.append(gc())

    threads = [threading.Thread(target=pusher, args=(n,)) for n in range(pushers)]
    gc_thread = threading.Thread(target=collector)
    gc_thread.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    stop.set()
    gc_thread.join(timeout=300)
    assert not failures, failures
    assert churn.runs and all(run.returncode == 0 for run in churn.runs), [
        run.stderr for run in churn.runs
    ]
    assert len(churn.runs) >= 2, "gc should have run several times while pushes ran"
    assert len(churn.completed) == pushers * images // 2
    return churn


def test_gc_while_pushes_run(fs_server: PassthroughServer) -> None:
    base = fs_server.url
    churn = push_while_gc_runs(
        [base], "busy", 3, IMAGES_PER_PUSHER, lambda: run_gc(fs_server, "--delete", "--grace", "0s")
    )
    final = run_gc(fs_server, "--delete", "--grace", "0s")
    assert final.returncode == 0, final.stderr
    for (name, tag), manifest in sorted(churn.completed.items()):
        pulls(base, name, tag)
        pulls(base, name, manifest)
    print(
        f"gc runs {len(churn.runs)}, blobs removed meanwhile {churn.blobs_removed}, "
        f"pushes retried {churn.retried}"
    )


# -- the S3 store -------------------------------------------------------------------------


def bucket_store(env: dict[str, str], tmpdir: Path) -> ContentStore:
    """The S3 store of ``env`` opened in this process, to look into the bucket."""
    settings = load_settings({**env, "TMPDIR": str(tmpdir)}, env_file="/nonexistent")
    store = open_store(settings)
    assert store is not None
    return store


def test_gc_on_the_s3_store(
    seaweed: SeaweedS3, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {**s3_env(seaweed, s3_bucket), **hosted_env(tmp_path)}
    for name, value in env.items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)  # boto3 takes its credentials from there
    with PassthroughServer(env) as server:
        store = bucket_store(env, server.tmpdir)
        base = server.url
        push = Pusher(base)
        # An upload in progress all along: gc leaves it alone, it completes at the end.
        started = push.http.post(f"{base}/v2/team/s3wip/blobs/uploads/", timeout=60)
        assert started.status_code == 202, started.text
        location = started.headers["Location"]
        if location.startswith("/"):
            location = base + location
        partial = layer_bytes("s3-in-progress", 64 * 1024)
        patched = push.http.patch(location, data=partial[:40_000], timeout=60)
        assert patched.status_code == 202, patched.text
        shared = layer_bytes("s3-shared", 32 * 1024)
        tags: list[tuple[str, str]] = []
        dropped: list[tuple[str, str]] = []
        for round_number, kill_after in enumerate((3, 9, 0)):
            name = f"team/s3app{round_number}"
            push.image(name, "keep", f"s3-keep-{round_number}", shared)
            tags.append((name, "keep"))
            for n in range(3):
                old = push.image(name, f"old{n}", f"s3-old-{round_number}-{n}", shared)
                push.untag(name, f"old{n}")
                dropped.append((name, old))
            result = run_gc(server, "--delete", "--grace", "0s", kill_after=kill_after or None)
            if kill_after:
                assert result.returncode == -signal.SIGKILL, (result.stdout, result.stderr)
            else:
                assert result.returncode == 0, result.stderr
                assert result.stdout.splitlines()[-1].startswith("removed ")
                assert "1 upload in progress left alone" in result.stdout
            for pulled_name, tag in tags:
                pulls(base, pulled_name, tag)
        for name, reference in dropped:
            assert gone(base, name, reference)
        # Every pushed blob of the dropped images is gone from the bucket; the kept ones
        # and the shared layer are there.
        keys = {info.key for info in store.backend.list("blobs/")}
        for round_number in range(3):
            for n in range(3):
                own = image_parts(f"s3-old-{round_number}-{n}")[0]
                assert not {content_key("blobs", digest(x)) for x in own} & keys
            kept = image_parts(f"s3-keep-{round_number}")[0]
            assert {content_key("blobs", digest(x)) for x in kept} <= keys
        assert content_key("blobs", digest(shared)) in keys
        again = run_gc(server, "--delete", "--grace", "0s")
        assert again.stdout.startswith("removed 0 manifests, 0 blobs, 0 bytes"), again.stdout
        done = push.http.put(
            location, params={"digest": digest(partial)}, data=partial[40_000:], timeout=60
        )
        assert done.status_code == 201, done.text
        got = push.http.get(f"{base}/v2/team/s3wip/blobs/{digest(partial)}", timeout=60)
        assert got.status_code == 200 and got.content == partial
        store.backend.close()
