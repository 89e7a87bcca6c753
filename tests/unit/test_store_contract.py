"""The store backend contract (tests/support/store_contract.py) on the filesystem
backend: the fast tier's run of the suite that the full tier runs on S3."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.store_contract import *  # noqa: F403 - the suite, collected here
from tests.support.stores import BackendKit, filesystem_kit


@pytest.fixture(params=[filesystem_kit], ids=["filesystem"])
def kit(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BackendKit]:
    factory: Callable[[Path], BackendKit] = request.param
    made = factory(tmp_path / "store")
    yield made
    made.backend.close()
