"""A fleet's downloads of one tag share the upstream HEAD in flight (export/resolve.py):
one identity, one tag, one request at a time; never a client's own credentials, never a
failure. A stand-in client: the HEAD's timing is what is tested, not HTTP."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import pytest

from passthrough.errors import UpstreamUnreachable
from passthrough.export.resolve import head_manifest
from passthrough.oci.endpoint import RegistryEndpoint
from passthrough.upstream.auth import Credentials
from passthrough.upstream.client import ManifestHead, RegistryClient
from passthrough.upstream.target import AuthKind, Target

DIGEST = "sha256:" + "a" * 64
REGISTRY = RegistryEndpoint("http://registry.test:5000", "registry.test:5000")


class SlowHead:
    """A client whose HEAD waits for `gate`, counting the HEADs sent (by everyone)."""

    def __init__(
        self, target: Target, gate: threading.Event, sent: list[str], fail: bool = False
    ) -> None:
        self.target, self.repository = target, "team/app"
        self.gate, self.sent, self.fail = gate, sent, fail

    def head_manifest(self, reference: str, accept: str, what: str) -> ManifestHead:
        self.sent.append(reference)
        self.gate.wait(5)
        if self.fail:
            raise UpstreamUnreachable("registry.test: connection refused")
        return ManifestHead(DIGEST, 100, "application/vnd.oci.image.manifest.v1+json")


def head(client: SlowHead) -> str | None:
    return head_manifest(cast(RegistryClient, client), "v1", "manifest of team/app:v1")


def heads_at_once(clients: list[SlowHead], gate: threading.Event) -> list[Any]:
    with ThreadPoolExecutor(len(clients)) as pool:
        futures = [pool.submit(head, c) for c in clients]
        threading.Timer(0.3, gate.set).start()
        return [f.exception() or f.result() for f in futures]


def test_one_head_for_a_fleet_of_one_identity() -> None:
    gate, sent = threading.Event(), list[str]()
    target = Target(REGISTRY, "environment", AuthKind.ANONYMOUS)
    results = heads_at_once([SlowHead(target, gate, sent) for _ in range(8)], gate)
    assert results == [DIGEST] * 8
    assert sent == ["v1"]
    # Once it ended, the next asks again: an answer is never kept past its request.
    assert head(SlowHead(target, gate, sent)) == DIGEST
    assert sent == ["v1", "v1"]


@pytest.mark.parametrize("source", ["client", "environment"])
def test_credentials_share_only_with_the_same_credentials_of_the_service(source: str) -> None:
    gate, sent = threading.Event(), list[str]()
    mine = Target(REGISTRY, "url", AuthKind.CREDENTIALS, Credentials("alice", "a"), source)
    theirs = Target(REGISTRY, "url", AuthKind.CREDENTIALS, Credentials("bob", "b"), source)
    clients = [SlowHead(t, gate, sent) for t in (mine, mine, theirs)]
    assert heads_at_once(clients, gate) == [DIGEST] * 3
    assert len(sent) == (3 if source == "client" else 2)


def test_a_failed_head_is_not_shared() -> None:
    gate, sent = threading.Event(), list[str]()
    target = Target(REGISTRY, "environment", AuthKind.ANONYMOUS)
    failing, other = SlowHead(target, gate, sent, fail=True), SlowHead(target, gate, sent)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(head, failing)
        while not sent:  # the failing HEAD leads
            threading.Event().wait(0.01)
        second = pool.submit(head, other)
        threading.Timer(0.3, gate.set).start()
        assert isinstance(first.exception(), UpstreamUnreachable)
        assert second.result() == DIGEST  # asked for itself
    assert len(sent) == 2
