"""A guard: no test may leave the service's default store (./passthrough-store, made
when the settings name no CACHE_DIR and no STORE) in the working directory, the
checkout. A test that wants no store says STORE=off; one that wants a store names its
own directory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from passthrough.config.rules import DEFAULT_CACHE_DIR


@pytest.fixture(autouse=True)
def no_default_store_in_the_checkout() -> Iterator[None]:
    default = Path.cwd() / DEFAULT_CACHE_DIR
    existed = default.exists()
    yield
    if not existed and default.exists():
        pytest.fail(
            f"the test made the default store {default} (delete it): set STORE=off or a CACHE_DIR"
        )
