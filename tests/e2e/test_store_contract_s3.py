"""The store backend contract (tests/support/store_contract.py) on the S3 backend, a
fresh SeaweedFS bucket per test under a key prefix: the full tier's run of the suite
that the fast tier runs on the filesystem."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.fixtures_matrix import s3_env
from tests.support.seaweed import SeaweedS3
from tests.support.store_contract import *  # noqa: F403 - the suite, collected here
from tests.support.stores import BackendKit, s3_kit

pytestmark = pytest.mark.rig


@pytest.fixture(params=[s3_kit], ids=["s3"])
def kit(
    request: pytest.FixtureRequest,
    seaweed: SeaweedS3,
    s3_bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[BackendKit]:
    env = s3_env(seaweed, s3_bucket)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, env[name])  # the AWS chain reads them, as in a pod
    factory: Callable[..., BackendKit] = request.param
    made = factory(seaweed.endpoint_url, seaweed.region, s3_bucket, env["S3_PREFIX"], tmp_path)
    yield made
    made.backend.close()
