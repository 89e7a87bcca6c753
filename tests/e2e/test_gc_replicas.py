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
from pathlib import Path

from tests.e2e.test_gc import gc_command, hosted_env, pulls, push_while_gc_runs
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
        churn = push_while_gc_runs(
            [first.url, second.url],
            "rep",
            2 * PUSHERS_PER_REPLICA,
            IMAGES_PER_PUSHER,
            lambda: run_gc_on_its_host(env, gc_host, "--delete", "--grace", "0s"),
        )

        # Three hosts' lock files, three different files: only Redis was shared.
        held = [*lock_files(first.tmpdir), *lock_files(second.tmpdir), *lock_files(gc_host)]
        assert len(held) == 3 and len({p.resolve() for p in held}) == 3, held

        final = run_gc_on_its_host(env, gc_host, "--delete", "--grace", "0s")
        assert final.returncode == 0, final.stderr
        for (name, tag), manifest in sorted(churn.completed.items()):
            for replica in replicas:
                pulls(replica.url, name, tag)
                pulls(replica.url, name, manifest)
        again = run_gc_on_its_host(env, gc_host, "--delete", "--grace", "0s")
        assert again.stdout.startswith("removed 0 manifests, 0 blobs, 0 bytes"), again.stdout
        # Every lease was given back.
        assert not list(redis_server.client().scan_iter(match="passthrough:*:gc:*"))
        print(
            f"gc runs {len(churn.runs)}, blobs removed meanwhile {churn.blobs_removed}, "
            f"pushes retried {churn.retried}"
        )
