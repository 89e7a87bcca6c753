"""The /v2 proxy's tee end to end (the shared rig is tests/e2e/v2proxy/rig.py): blobs
streamed to the client while stored, one upstream GET however many clients, followers
reading the growing file, a wrong digest never committed and its transfer aborted, a
client leaving or a worker dying mid-fetch, upstream cut mid-blob; filesystem and S3."""

from __future__ import annotations

import http.client
import os
import signal
import threading
from collections.abc import Callable

import requests
import urllib3

from tests.e2e.test_cache import HoldingFront, read_then_reset, worker_pids
from tests.e2e.v2proxy.rig import (
    CONCURRENT,
    Answer,
    Layers,
    ServerFactory,
    StoreView,
    _session,
    at_once,
    blob,
    pushed,
)
from tests.support.fronts import FaultFront
from tests.support.helpers import digest as digest_of
from tests.support.helpers import wait_until
from tests.support.images import (
    build_image,
)
from tests.support.registry import RegistryServer
from tests.support.server import PassthroughServer

# --- the tee: stream while storing, one upstream GET, verify before commit ------------------


def test_a_miss_streams_to_the_client_and_followers_read_the_growing_file(
    passthrough_server: ServerFactory,
    registry_anon: RegistryServer,
    layers: Layers,
    view: Callable[[PassthroughServer], StoreView],
) -> None:
    """Upstream holds the blob after 4 MiB: the first client gets those bytes before
    upstream finishes (streamed, not stored then forwarded), and so does a second client
    that comes while the fetch is held (it reads the growing file from the start)."""
    big = layers.big
    data = big.read()
    name = pushed(registry_anon, build_image([big]))
    with HoldingFront(registry_anon, big.digest, after=4 << 20) as front:
        server = passthrough_server({"REGISTRY_URL": front.url})
        url = f"{server.url}/v2/{name}/blobs/{big.digest}"
        heads: list[bytes] = []
        rests: list[bytes] = []
        got_head = [threading.Event(), threading.Event()]
        errors: list[BaseException] = []

        def client(i: int) -> None:
            try:
                with _session() as session, session.get(url, stream=True, timeout=120) as r:
                    assert r.status_code == 200, r.status_code
                    assert r.headers["Content-Length"] == str(len(data))
                    heads.append(r.raw.read(1 << 20))
                    got_head[i].set()
                    rests.append(heads[-1] + r.raw.read())
            except BaseException as exc:
                errors.append(exc)
                got_head[i].set()

        leader = threading.Thread(target=client, args=(0,))
        leader.start()
        wait_until(front.reached.is_set, 30, "the upstream fetch to reach the hold")
        assert got_head[0].wait(30), "the first client got nothing while upstream was held"
        follower = threading.Thread(target=client, args=(1,))
        follower.start()
        assert got_head[1].wait(30), "a second client got nothing while the fetch was held"
        assert not errors, errors
        assert heads == [data[: 1 << 20]] * 2
        # Nothing is committed before the whole blob is there and verified.
        assert view(server).blob(big.digest) is None
        front.release()
        leader.join(120)
        follower.join(120)
        assert not errors, errors
        assert [digest_of(r) for r in rests] == [big.digest] * 2
        assert front.count("GET", big.digest) == 1
        wait_until(lambda: view(server).blob(big.digest) is not None, 30, "the commit")
        assert view(server).blob(big.digest) == data


def test_concurrent_misses_of_one_blob_make_one_upstream_get(
    serve: Callable[..., PassthroughServer],
    fault_front: FaultFront,
    layers: Layers,
    view: Callable[[PassthroughServer], StoreView],
) -> None:
    big = layers.big
    name = pushed(fault_front.registry, build_image([big]))
    server = serve(workers=2, threads=8)
    answers = at_once(CONCURRENT, lambda _: blob(server, name, big.digest))
    for got in answers:
        assert got.status == 200 and got.error is None, got.describe()
        assert digest_of(got.body) == big.digest
    assert fault_front.count("GET", big.digest) == 1
    # The last byte goes out once the blob is verified; the commit (an upload to S3)
    # may end a moment later.
    wait_until(lambda: view(server).blob(big.digest) == big.read(), 30, "the commit")
    wait_until(lambda: view(server).partials() == [], 20, "no unfinished write left")


def test_a_blob_whose_bytes_are_wrong_is_never_committed_and_its_transfer_aborts(
    serve: Callable[..., PassthroughServer],
    fault_front: FaultFront,
    layers: Layers,
    view: Callable[[PassthroughServer], StoreView],
) -> None:
    big = layers.big
    data = big.read()
    name = pushed(fault_front.registry, build_image([big]))
    server = serve()
    # One flipped byte in the middle: same length, wrong digest. Three clients read the
    # whole blob and one its last 100 bytes, all during that one fetch (or just after
    # it failed).
    fault_front.inject(big.digest, kind="corrupt", cut_after=len(data) // 2)
    wanted = [None, None, None, "bytes=-100"]

    def one(i: int) -> Answer:
        byte_range = wanted[i]
        headers = {"Range": byte_range} if byte_range else {}
        return blob(server, name, big.digest, headers=headers)

    aborted = refetched = 0
    for byte_range, bad in zip(wanted, at_once(len(wanted), one), strict=True):
        if bad.status >= 500:
            continue  # came after the fetch failed: told so, before any byte
        assert bad.status == (206 if byte_range else 200), bad.describe()
        expected = data[-100:] if byte_range else data
        if bad.error is None:
            # A clean end is only right with the right bytes: a reader that came once
            # the failed fetch let go of the blob and fetched it again (good this time).
            assert bad.body == expected, (
                f"a corrupt blob ended cleanly ({len(bad.body)} bytes, Range {byte_range}): "
                "the client cannot tell it from a good one"
            )
            refetched += 1
        else:
            assert bad.body != expected
            aborted += 1
    # A fast fetch may fail before anyone attached (then all came late): that it
    # aborts every reader attached to it is the next test's.
    assert aborted + refetched >= 1 or fault_front.faults[0].fired == 1
    assert fault_front.faults[0].fired == 1
    assert fault_front.count("GET", big.digest) == 1 + (1 if refetched else 0)
    wait_until(lambda: view(server).partials() == [], 20, "the aborted write to be removed")
    stored = view(server).blob(big.digest)
    assert stored is None or stored == data, "a blob with a wrong digest was committed"
    if not refetched:
        assert stored is None

    good = blob(server, name, big.digest)
    assert good.status == 200 and good.error is None, good.describe()
    assert digest_of(good.body) == big.digest
    assert fault_front.count("GET", big.digest) == 2
    wait_until(lambda: view(server).blob(big.digest) is not None, 30, "the good commit")
    assert view(server).blob(big.digest) == data


def test_every_reader_attached_to_a_corrupt_fetch_is_aborted(
    passthrough_server: ServerFactory,
    registry_anon: RegistryServer,
    layers: Layers,
    view: Callable[[PassthroughServer], StoreView],
) -> None:
    """Upstream holds the corrupt blob after 4 MiB until three readers have each read
    1 MiB of the growing file: all three follow that fetch, and all three must see
    their transfer break when the digest turns out wrong."""
    big = layers.big
    data = big.read()
    name = pushed(registry_anon, build_image([big]))
    with HoldingFront(registry_anon, big.digest, after=4 << 20) as front:
        front.inject(big.digest, kind="corrupt", cut_after=len(data) // 2)
        server = passthrough_server({"REGISTRY_URL": front.url}, workers=2, threads=8)
        url = f"{server.url}/v2/{name}/blobs/{big.digest}"
        attached = [threading.Event() for _ in range(3)]
        outcomes: list[str | None] = [None] * 3

        def read(i: int) -> None:
            received = b""
            try:
                with _session() as session, session.get(url, stream=True, timeout=120) as r:
                    received = r.raw.read(1 << 20)
                    attached[i].set()
                    received += r.raw.read()
                    ended_cleanly = len(received) == len(data)
                    outcomes[i] = "clean" if ended_cleanly else "short"
                    if ended_cleanly:
                        outcomes[i] = "clean-good" if received == data else "clean-corrupt"
            except (
                requests.RequestException,
                urllib3.exceptions.HTTPError,
                http.client.HTTPException,
                OSError,
            ):
                outcomes[i] = "broken"
            finally:
                attached[i].set()

        readers = [threading.Thread(target=read, args=(i,)) for i in range(3)]
        for reader in readers:
            reader.start()
        for event in attached:
            assert event.wait(60), "a reader got nothing from the growing file"
        front.release()
        for reader in readers:
            reader.join(120)
        assert outcomes.count("clean-corrupt") == 0, outcomes
        assert set(outcomes) <= {"broken", "short"}, outcomes
        assert front.count("GET", big.digest) == 1
        wait_until(lambda: view(server).partials() == [], 20, "the aborted write to be removed")
        assert view(server).blob(big.digest) is None


def test_a_client_that_leaves_a_miss_does_not_stop_the_fetch(
    passthrough_server: ServerFactory,
    registry_anon: RegistryServer,
    layers: Layers,
    view: Callable[[PassthroughServer], StoreView],
) -> None:
    big = layers.big
    name = pushed(registry_anon, build_image([big]))
    with HoldingFront(registry_anon, big.digest, after=6 << 20) as front:
        server = passthrough_server({"REGISTRY_URL": front.url})
        read_then_reset(f"{server.url}/v2/{name}/blobs/{big.digest}", 2 << 20)
        wait_until(front.reached.is_set, 30, "the fetch to reach the hold")
        front.release()
        wait_until(lambda: view(server).blob(big.digest) is not None, 60, "the commit")
        got = blob(server, name, big.digest)
        assert got.status == 200 and digest_of(got.body) == big.digest, got.describe()
        assert front.count("GET", big.digest) == 1
        wait_until(lambda: view(server).partials() == [], 20, "no unfinished write left")


def test_readers_of_a_fetch_whose_worker_dies_abort_or_get_the_whole_blob(
    passthrough_server: ServerFactory,
    registry_anon: RegistryServer,
    layers: Layers,
    view: Callable[[PassthroughServer], StoreView],
) -> None:
    """SIGKILL the worker that fetches (its pid is in the growing file's name) while
    four clients read the miss: none may hang or end cleanly with wrong bytes, and the
    next request fetches again and is whole."""
    big = layers.big
    data = big.read()
    name = pushed(registry_anon, build_image([big]))
    with HoldingFront(registry_anon, big.digest, after=4 << 20) as front:
        server = passthrough_server({"REGISTRY_URL": front.url}, workers=2, threads=8)
        wait_until(lambda: len(worker_pids(server)) == 2, 30, "two workers")
        results: list[Answer | BaseException | None] = [None] * 4

        def read(i: int) -> None:
            try:
                results[i] = blob(server, name, big.digest)
            except requests.RequestException as exc:
                results[i] = exc  # the connection died before the headers: an abort

        readers = [threading.Thread(target=read, args=(i,)) for i in range(len(results))]
        for reader in readers:
            reader.start()
        wait_until(front.reached.is_set, 30, "the fetch to reach the hold")
        wait_until(lambda: bool(view(server).growing()), 30, "the growing file")
        fetcher = int(view(server).growing()[0].name.split(".")[1])
        assert fetcher in worker_pids(server), "the growing file names no worker"
        os.kill(fetcher, signal.SIGKILL)
        front.release()
        for reader in readers:
            reader.join(180)
        for got in results:
            assert got is not None, "a reader hung after the fetching worker died"
            if isinstance(got, BaseException):
                continue
            if got.status == 200 and got.error is None:
                assert digest_of(got.body) == big.digest, "a dead fetch ended cleanly"
            else:
                assert got.error is not None or got.status >= 500, got.describe()
        stored = view(server).blob(big.digest)
        assert stored is None or stored == data
        again = blob(server, name, big.digest)
        assert again.status == 200 and again.error is None, again.describe()
        assert digest_of(again.body) == big.digest
        wait_until(lambda: view(server).blob(big.digest) == data, 30, "the commit")


def test_upstream_cut_mid_blob_leaves_nothing_partial(
    serve: Callable[..., PassthroughServer],
    fault_front: FaultFront,
    layers: Layers,
    view: Callable[[PassthroughServer], StoreView],
) -> None:
    big = layers.big
    data = big.read()
    name = pushed(fault_front.registry, build_image([big]))
    server = serve()
    fault_front.inject(big.digest, kind="cut", cut_after=3 << 20)
    first = blob(server, name, big.digest)
    if first.error is None and first.status == 200:
        # The proxy resumed upstream: then the client got the whole, right blob.
        assert digest_of(first.body) == big.digest, "a cut transfer ended cleanly"
    else:
        assert first.status in (200, 502, 503), first.describe()
    wait_until(lambda: view(server).partials() == [], 20, "the cut write to be removed")
    stored = view(server).blob(big.digest)
    assert stored is None or stored == data, "a partial blob was committed"

    second = blob(server, name, big.digest)
    assert second.status == 200 and second.error is None, second.describe()
    assert digest_of(second.body) == big.digest
    assert view(server).blob(big.digest) == data
