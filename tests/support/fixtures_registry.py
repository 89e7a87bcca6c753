"""pytest fixtures of the rig's registries, token issuer, fronts and server.

tests/conftest.py star-imports this module. Processes (registries) are session-scoped
since every test can share them (tests use their own repository names); the fronts are
in-process threads that start in a millisecond, so each test gets fresh ones with
zeroed counters and no leftover fault plan.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.support.fixtures_matrix import StoreEnv
from tests.support.fronts import FaultFront, RedirectFront
from tests.support.registry import BASIC_USERS, TOKEN_GRANTS, TOKEN_USERS, RegistryServer
from tests.support.server import PassthroughServer
from tests.support.token_issuer import TokenIssuer

__all__ = [
    "fault_front",
    "fault_front_token",
    "passthrough_server",
    "redirect_front_anon",
    "redirect_front_token",
    "registry_anon",
    "registry_basic",
    "registry_token",
    "token_issuer",
    "token_issuer_session",
]

PassthroughFactory = Callable[..., PassthroughServer]


@pytest.fixture(scope="session")
def token_issuer_session() -> Iterator[TokenIssuer]:
    """The issuer registry_token trusts, with TOKEN_USERS and TOKEN_GRANTS. Prefer
    `token_issuer` in tests: it is this one, reset."""
    issuer = TokenIssuer()
    for username, password in TOKEN_USERS.items():
        issuer.add_user(username, password)
    for user, pattern, actions in TOKEN_GRANTS:
        issuer.grant(user, pattern, list(actions))
    issuer.start()
    try:
        yield issuer
    finally:
        issuer.stop()


@pytest.fixture
def token_issuer(token_issuer_session: TokenIssuer) -> Iterator[TokenIssuer]:
    """The session's issuer with an empty request log and default answer options."""
    token_issuer_session.reset()
    yield token_issuer_session
    token_issuer_session.reset()


@pytest.fixture(scope="session")
def registry_anon() -> Iterator[RegistryServer]:
    """A registry without authentication: anyone may pull and push."""
    with RegistryServer("anonymous") as registry:
        yield registry


@pytest.fixture(scope="session")
def registry_basic() -> Iterator[RegistryServer]:
    """A registry with htpasswd Basic auth for BASIC_USERS (every user may do anything)."""
    with RegistryServer("basic", users=BASIC_USERS) as registry:
        yield registry


@pytest.fixture(scope="session")
def registry_token(token_issuer_session: TokenIssuer) -> Iterator[RegistryServer]:
    """A registry with Bearer auth from `token_issuer_session`; see TOKEN_GRANTS."""
    with RegistryServer("token", token_issuer=token_issuer_session) as registry:
        yield registry


@pytest.fixture
def redirect_front_anon(registry_anon: RegistryServer) -> Iterator[RedirectFront]:
    """A RedirectFront over registry_anon (blob host on 127.0.0.2)."""
    with RedirectFront(registry_anon) as front:
        yield front


@pytest.fixture
def redirect_front_token(registry_token: RegistryServer) -> Iterator[RedirectFront]:
    """A RedirectFront over registry_token: the blob GET is authorized by token first."""
    with RedirectFront(registry_token) as front:
        yield front


@pytest.fixture
def fault_front(registry_anon: RegistryServer) -> Iterator[FaultFront]:
    """A FaultFront over registry_anon."""
    with FaultFront(registry_anon) as front:
        yield front


@pytest.fixture
def fault_front_token(registry_token: RegistryServer) -> Iterator[FaultFront]:
    """A FaultFront over registry_token."""
    with FaultFront(registry_token) as front:
        yield front


@pytest.fixture
def passthrough_server(
    tmp_path_factory: pytest.TempPathFactory, store_env: StoreEnv
) -> Iterator[PassthroughFactory]:
    """A factory: `passthrough_server(env, workers=1, threads=8, ...)` starts the
    project's gunicorn server with `env` over a scrubbed environment (on the module's
    store, see fixtures_matrix: none unless the module says); every server it
    started is stopped at the end of the test. Their logs are printed then (pytest shows
    them for failed tests only) and kept under pytest's temp dir."""
    started: list[PassthroughServer] = []

    def start(env: Mapping[str, str] | None = None, **kw: Any) -> PassthroughServer:
        kw.setdefault("tmp_root", Path(tmp_path_factory.mktemp("passthrough")))
        server = PassthroughServer(store_env(env or {}), **kw)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()
        print(f"--- passthrough server {server.url} log (last 40 lines) ---")
        print("\n".join(server.log_text().splitlines()[-40:]))
