"""pytest fixtures of the rig's stores: SeaweedFS as S3, and redis-server.

tests/conftest.py star-imports this module. Both processes are session-scoped; tests
share them through names of their own (`s3_bucket` makes a fresh bucket per test). A
test that stops one must start it again; the per-test fixtures restart a stopped one
anyway so a failed test cannot take the service away from the next.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.redis_server import RedisServer
from tests.support.seaweed import SeaweedS3

__all__ = ["redis_server", "s3_bucket", "seaweed"]


@pytest.fixture(scope="session")
def seaweed() -> Iterator[SeaweedS3]:
    """SeaweedFS with its S3 gateway at `seaweed.endpoint_url` (access_key, secret_key,
    region; client() gives a boto3 client). Data lives until the session ends."""
    with SeaweedS3() as server:
        yield server


@pytest.fixture
def s3_bucket(seaweed: SeaweedS3) -> Iterator[str]:
    """The name of a fresh, empty bucket on `seaweed`; deleted with its objects after."""
    seaweed.ensure_running()
    name = seaweed.create_bucket()
    yield name
    seaweed.ensure_running()
    seaweed.delete_bucket(name)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """redis-server on `redis_server.url` (redis://127.0.0.1:PORT/0), no persistence."""
    with RedisServer() as server:
        yield server
