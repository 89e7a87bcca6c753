"""pytest fixtures for the loader side of the rig: a private dockerd and image factories.

The lead's conftest does `from tests.support.fixtures_loaders import *`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.docker_engine import DockerEngine
from tests.support.images import Image, runnable_image
from tests.support.relay import TcpRelay

__all__ = ["busybox_marker_image", "docker_engine", "docker_host", "docker_mirror"]


@pytest.fixture(scope="session")
def docker_mirror() -> Iterator[TcpRelay]:
    """The session dockerd's registry mirror: a relay on a port held from before dockerd
    starts; a test attaches its own passthrough server (`docker_mirror.attached(...)`).
    Unattached it refuses connections, so docker.io pulls fail as they would without it."""
    with TcpRelay() as relay:
        yield relay


@pytest.fixture(scope="session")
def docker_engine(docker_mirror: TcpRelay) -> Iterator[DockerEngine]:
    """A started DockerEngine (own containerd + dockerd, vfs) whose registry mirror is
    `docker_mirror`; stopped and deleted after."""
    engine = DockerEngine(registry_mirrors=[docker_mirror.url])
    try:
        engine.start()
        yield engine
    finally:
        engine.stop()


@pytest.fixture(scope="session")
def docker_host(docker_engine: DockerEngine) -> str:
    """DOCKER_HOST (unix://...) of the session's DockerEngine."""
    return docker_engine.host


@pytest.fixture
def busybox_marker_image() -> Callable[..., Image]:
    """Factory: make(marker=None, **runnable_image kwargs) -> Image.

    Without a marker, a unique one (`marker-<hex>`) is used, so images made by
    different tests never share a config digest; image.marker holds it.
    """

    def make(marker: str | None = None, **kwargs: Any) -> Image:
        return runnable_image(marker or f"marker-{uuid.uuid4().hex[:12]}", **kwargs)

    return make
