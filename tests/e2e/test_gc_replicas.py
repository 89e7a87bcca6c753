"""``passthrough gc`` on a host of its own while two replicas take pushes, all on one
S3 store (SeaweedFS) with Redis: only Redis is shared between the three, as with the
Helm chart's CronJob pod beside the server's pods.

Each replica is a gunicorn master with its own TMPDIR, and the gc process gets one of
its own too: the S3 store's lock files live under it (``S3Backend.work_dir``, under
TEMP_DIR or TMPDIR), so the three ``flock`` locks of the push lock are three different
files and only the readers-writer lock in Redis keeps gc's deletes and the pushes'
checks apart. gc runs in a loop with ``--grace 0s`` (no grace period to hide behind)
while threads push to both replicas: every push that completed pulls whole from
either replica, and a last gc run leaves it so.
"""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import requests

from tests.e2e.test_gc import Pusher, gc_command, hosted_env, layer_bytes, pulls
from tests.support.fixtures_matrix import s3_env
from tests.support.redis_server import RedisServer
from tests.support.seaweed import SeaweedS3
from tests.support.server import PassthroughServer, scrubbed_environment

PUSHERS_PER_REPLICA = 2
IMAGES_PER_PUSHER = 10


def run_gc_on_its_host(
    env: dict[str, str], tmpdir: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    """gc with the replicas' store settings and a TMPDIR (so a lock dir) of its own."""
    gc_env = scrubbed_environment()
    gc_env.update(env)
    gc_env.update({"TMPDIR": str(tmpdir), "ENV_FILE": str(tmpdir / "no-such.env")})
    return subprocess.run(
        gc_command(*args), env=gc_env, capture_output=True, text=True, timeout=120, check=False
    )


def lock_files(tmpdir: Path) -> list[Path]:
    return sorted(tmpdir.glob("passthrough-s3-*/locks/hosted-gc.lock"))


def test_gc_on_its_own_host_while_two_replicas_take_pushes(
    seaweed: SeaweedS3, s3_bucket: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    redis_server.ensure_running()
    env = {
        **s3_env(seaweed, s3_bucket),
        **hosted_env(tmp_path),
        "REDIS_URL": redis_server.url,
    }
    gc_host = tmp_path / "gc-host"
    gc_host.mkdir()
    with PassthroughServer(env) as first, PassthroughServer(env) as second:
        replicas = (first, second)
        completed: dict[tuple[str, str], str] = {}
        lock = threading.Lock()
        stop = threading.Event()
        failures: list[BaseException] = []
        retried = [0]

        def pusher(number: int) -> None:
            push = Pusher(replicas[number % 2].url)
            name = f"team/rep{number}"
            shared = layer_bytes(f"rep-shared-{number}", 16 * 1024)
            try:
                for i in range(IMAGES_PER_PUSHER):
                    for attempt in range(6):
                        try:
                            manifest = push.image(name, f"v{i}", f"rep-{number}-{i}", shared)
                            break
                        except requests.HTTPError as exc:
                            # gc (under the lock) removed a blob of this push between its
                            # upload and the manifest: the push failed, the client retries.
                            assert exc.response is not None
                            codes = [e["code"] for e in exc.response.json()["errors"]]
                            assert codes in (["MANIFEST_BLOB_UNKNOWN"], ["BLOB_UNKNOWN"]), codes
                            with lock:
                                retried[0] += 1
                            if attempt == 5:
                                raise
                    with lock:
                        completed[(name, f"v{i}")] = manifest
                    if i % 2:
                        push.untag(name, f"v{i - 1}")  # garbage made while gc runs
                        with lock:
                            del completed[(name, f"v{i - 1}")]
            except BaseException as exc:  # reported by the main thread
                failures.append(exc)

        runs: list[subprocess.CompletedProcess[str]] = []

        def collector() -> None:
            while not stop.is_set():
                runs.append(run_gc_on_its_host(env, gc_host, "--delete", "--grace", "0s"))

        count = 2 * PUSHERS_PER_REPLICA
        threads = [threading.Thread(target=pusher, args=(n,)) for n in range(count)]
        gc_thread = threading.Thread(target=collector)
        gc_thread.start()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        stop.set()
        gc_thread.join(timeout=300)
        assert not failures, failures
        assert runs and all(run.returncode == 0 for run in runs), [r.stderr for r in runs]
        assert len(runs) >= 2, "gc should have run several times while pushes ran"

        # Three hosts' lock files, three different files: only Redis was shared.
        held = [*lock_files(first.tmpdir), *lock_files(second.tmpdir), *lock_files(gc_host)]
        assert len(held) == 3 and len({p.resolve() for p in held}) == 3, held

        final = run_gc_on_its_host(env, gc_host, "--delete", "--grace", "0s")
        assert final.returncode == 0, final.stderr
        assert len(completed) == count * IMAGES_PER_PUSHER // 2
        for (name, tag), manifest in sorted(completed.items()):
            for replica in replicas:
                pulls(replica.url, name, tag)
                pulls(replica.url, name, manifest)
        again = run_gc_on_its_host(env, gc_host, "--delete", "--grace", "0s")
        assert again.stdout.startswith("removed 0 manifests, 0 blobs, 0 bytes"), again.stdout
        # Every lease was given back.
        assert not list(redis_server.client().scan_iter(match="passthrough:*:gc:*"))
        removed = sum(
            1 for r in runs for line in r.stdout.splitlines() if line.startswith("removed blob")
        )
        print(f"gc runs {len(runs)}, blobs removed meanwhile {removed}, retried {retried[0]}")
