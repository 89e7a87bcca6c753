"""The store a test's servers run on, for test modules that run their matrix on each.

`store_env(env)` returns `env` with the settings of the module's store added (the
test's own settings win). By default there is no store (each download spools its layers
into anonymous temp files); a module that overrides `store_kind` with params runs every
test once per store:

    @pytest.fixture(scope="module", params=["temp", "s3"])
    def store_kind(request): return request.param

"filesystem" is a CACHE_DIR of its own per server (the /v2 API needs a store, so its
modules run on "filesystem" and "s3"). Each server gets a key prefix of its own in one
bucket, so servers never see each other's entries unless a test gives them the same
prefix on purpose.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping

import pytest

from tests.support.seaweed import SeaweedS3

__all__ = ["StoreEnv", "s3_env", "store_env", "store_kind"]

StoreEnv = Callable[[Mapping[str, str]], dict[str, str]]


def s3_env(seaweed: SeaweedS3, bucket: str, prefix: str | None = None) -> dict[str, str]:
    """The settings of a server whose store is `bucket` on `seaweed`."""
    return {
        "STORE": "s3",
        "S3_BUCKET": bucket,
        "S3_PREFIX": prefix if prefix is not None else f"{uuid.uuid4().hex[:12]}/",
        "S3_ENDPOINT_URL": seaweed.endpoint_url,
        "AWS_ACCESS_KEY_ID": seaweed.access_key,
        "AWS_SECRET_ACCESS_KEY": seaweed.secret_key,
        "AWS_REGION": seaweed.region,
    }


@pytest.fixture(scope="session")
def store_kind() -> str:
    return "temp"


@pytest.fixture(scope="module")
def store_env(request: pytest.FixtureRequest, store_kind: str) -> StoreEnv:
    if store_kind == "temp":
        return dict
    if store_kind == "filesystem":
        factory: pytest.TempPathFactory = request.getfixturevalue("tmp_path_factory")

        def with_cache(env: Mapping[str, str]) -> dict[str, str]:
            return {"CACHE_DIR": str(factory.mktemp("cache")), **env}

        return with_cache
    if store_kind == "s3":
        seaweed: SeaweedS3 = request.getfixturevalue("seaweed")
        seaweed.ensure_running()
        bucket = seaweed.create_bucket()

        def with_s3(env: Mapping[str, str]) -> dict[str, str]:
            return {**s3_env(seaweed, bucket), **env}

        return with_s3
    raise ValueError(f"unknown store kind {store_kind!r}")
