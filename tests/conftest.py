"""Shared fixtures: the real test rig (registries, token issuer, fronts, dockerd,
loaders, the server under gunicorn, SeaweedFS as S3, redis-server). Tests that use it
are marked ``rig`` and run in the full tier; `bash tests/run.sh fast` runs the rest in
about a minute, and starts no process (tests/support/no_process.py fails a test that does)."""

from __future__ import annotations

from collections.abc import Generator

import pytest

from tests.support.default_store import no_default_store_in_the_checkout  # noqa: F401
from tests.support.fixtures_loaders import *  # noqa: F403
from tests.support.fixtures_matrix import *  # noqa: F403
from tests.support.fixtures_registry import *  # noqa: F403
from tests.support.fixtures_store import *  # noqa: F403
from tests.support.no_process import no_process
from tests.support.server import log_errors, running_servers

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


def _outside_the_rig(item: pytest.Item) -> bool:
    return item.get_closest_marker("rig") is None


def _watched(item: pytest.Item) -> Generator[None, object, object]:
    # Outside the rig nothing may start a process, in its fixtures either.
    if not _outside_the_rig(item):
        return (yield)
    with no_process():
        return (yield)


pytest_runtest_setup = pytest.hookimpl(wrapper=True)(_watched)
pytest_runtest_call = pytest.hookimpl(wrapper=True)(_watched)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(
    item: pytest.Item, nextitem: pytest.Item | None
) -> Generator[None, object, object]:
    # The last test's teardown (nextitem None) also ends the session's fixtures, the
    # rig's processes among them when the whole suite runs: stopping those is no test's
    # doing, so only the teardowns before it are watched.
    if not _outside_the_rig(item) or nextitem is None:
        return (yield)
    with no_process():
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    # A failing test's report carries the errors its servers logged (the failure a
    # client saw as a 500 is a traceback there), since CI shows only the report.
    report = yield
    if report.failed:
        for server in running_servers():
            errors = log_errors(server.log_text())
            if errors:
                report.sections.append((f"errors logged by {server!r}", "\n".join(errors)))
    return report
