"""Where a registry lives: its base URL and the name it goes by in references, and
Docker Hub's several names."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
DOCKER_HUB_URL = "https://registry-1.docker.io"
DOCKER_HUB_REALM = "https://auth.docker.io/token"
DOCKER_HUB_SERVICE = "registry.docker.io"


@dataclass(frozen=True)
class RegistryEndpoint:
    """Where a registry lives: its base URL and the name it goes by in image references."""

    url: str  # scheme://host[:port], no trailing slash
    name: str  # familiar host name used in RepoTags, e.g. docker.io or host:5000

    @property
    def host(self) -> str:
        return urlsplit(self.url).netloc

    @property
    def is_docker_hub(self) -> bool:
        return self.url == DOCKER_HUB_URL
