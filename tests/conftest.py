"""Shared fixtures: the real test rig (registries, token issuer, fronts, dockerd,
loaders, the server under gunicorn, SeaweedFS as S3, redis-server). Tests that use it
are marked ``rig`` and run in the full tier; `bash tests/run.sh fast` runs the rest in
seconds."""

from __future__ import annotations

import pytest

from tests.support.fixtures_loaders import *  # noqa: F403
from tests.support.fixtures_matrix import *  # noqa: F403
from tests.support.fixtures_registry import *  # noqa: F403
from tests.support.fixtures_store import *  # noqa: F403

RIG_FIXTURES = {
    "token_issuer_session", "token_issuer", "registry_anon", "registry_basic", "registry_token",
    "redirect_front_anon", "redirect_front_token", "fault_front", "fault_front_token",
    "passthrough_server", "docker_engine", "docker_host", "docker_mirror", "seaweed", "s3_bucket",
    "redis_server",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Anything that starts a real process belongs to the full tier, marked or not.
    for item in items:
        if RIG_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.rig)
