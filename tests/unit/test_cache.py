"""The content-addressed cache and the warm path: hits, Content-Length, ETag, Range,
HEAD, corruption, eviction and ?layers=gzip (registry simulated with responses)."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile

import pytest
import responses

from passthrough import create_app
from tests.support.helpers import digest
from tests.support.stores import filesystem_store, stored_bytes
from tests.unit.test_app import REG, FakeImage, tar_of


@pytest.fixture
def cache_dir(tmp_path):
    return tmp_path / "cache"


@pytest.fixture
def app(tmp_path, cache_dir):
    return create_app(
        {
            "REGISTRY_URL": REG,
            "ENV_FILE": "/nonexistent",
            "TEMP_DIR": str(tmp_path),
            "CACHE_DIR": str(cache_dir),
            "CACHE_MAX_BYTES": "64M",
        }
    )


def blob_gets(image: FakeImage) -> int:
    wanted = {digest(b) for b in image.blobs}
    return sum(
        1
        for c in responses.calls
        if c.request.method == "GET" and any(d in str(c.request.url) for d in wanted)
    )


def big_image() -> FakeImage:
    return FakeImage(
        "team/api",
        "v1",
        [tar_of("a.bin", bytes(range(256)) * 4000), tar_of("b.bin", b"b" * 300_000)],
    )


@responses.activate
def test_warm_download_uses_the_cache_and_knows_its_size(app):
    image = big_image()
    image.register(responses)
    client = app.test_client()
    cold = client.get("/docker/team__api_v1.tar")
    assert cold.status_code == 200
    assert "Content-Length" not in cold.headers  # cold: layer sizes unknown yet
    assert len(cold.data) > 600_000
    assert blob_gets(image) == 2
    warm = client.get("/docker/team__api_v1.tar")
    assert warm.data == cold.data
    assert blob_gets(image) == 2, "a warm download must not fetch blobs again"
    assert warm.headers["Content-Length"] == str(len(cold.data))
    assert warm.headers["Accept-Ranges"] == "bytes"
    assert warm.headers["ETag"] == f'"{digest(image.manifest)[7:]}-docker-tar"'
    # Tags still resolve upstream every time, by HEAD, with the request's credentials.
    assert any(
        c.request.method == "HEAD" and "/manifests/v1" in str(c.request.url)
        for c in responses.calls
    )


@responses.activate
def test_range_resumes_to_the_same_bytes_and_head_matches(app):
    image = big_image()
    image.register(responses)
    client = app.test_client()
    full = client.get("/docker/team__api_v1.tar").data
    for header, expected in [
        ("bytes=1000-", full[1000:]),
        ("bytes=0-99", full[:100]),
        ("bytes=-512", full[-512:]),
        (f"bytes={len(full) - 3000}-{len(full) + 50}", full[-3000:]),
        ("bytes=5000-400000", full[5000:400001]),
    ]:
        part = client.get("/docker/team__api_v1.tar", headers={"Range": header})
        assert part.status_code == 206, header
        assert part.data == expected, header
        assert part.headers["Content-Length"] == str(len(expected))
        assert part.headers["Content-Range"].endswith(f"/{len(full)}")
    head = client.head("/docker/team__api_v1.tar")
    assert head.status_code == 200 and head.data == b""
    assert head.headers["Content-Length"] == str(len(full))
    stale = client.get(
        "/docker/team__api_v1.tar", headers={"Range": "bytes=10-", "If-Range": '"x"'}
    )
    assert stale.status_code == 200 and stale.data == full
    beyond = client.get("/docker/team__api_v1.tar", headers={"Range": f"bytes={len(full)}-"})
    assert beyond.status_code == 416
    assert beyond.headers["Content-Range"] == f"bytes */{len(full)}"


@responses.activate
def test_corrupted_cache_entry_is_detected_and_refetched(app, cache_dir):
    image = big_image()
    image.register(responses)
    client = app.test_client()
    full = client.get("/docker/team__api_v1.tar").data
    layer_file = next((cache_dir / "layers" / "sha256").iterdir())
    data = bytearray(layer_file.read_bytes())
    data[700] ^= 0xFF
    layer_file.write_bytes(bytes(data))
    # The compressed blobs are corrupt too, so the layer must come from upstream again.
    for blob_file in (cache_dir / "blobs" / "sha256").iterdir():
        blob_file.write_bytes(b"garbage")
    gets_before = blob_gets(image)
    again = client.get("/docker/team__api_v1.tar")
    assert again.status_code == 200 and again.data == full
    assert app.extensions["passthrough"].store.stats.corrupt >= 1
    assert blob_gets(image) == gets_before + 1


@responses.activate
def test_gzip_layers_keep_the_registry_blobs_with_exact_length_cold(app):
    image = big_image()
    image.register(responses)
    response = app.test_client().get("/docker/team__api_v1.tar?layers=gzip")
    assert response.status_code == 200
    assert response.headers["Content-Length"] == str(len(response.data))
    with tarfile.open(fileobj=io.BytesIO(response.data)) as archive:
        manifest = json.loads(archive.extractfile("manifest.json").read())  # type: ignore[union-attr]
        blobs = [
            archive.extractfile(name).read()  # type: ignore[union-attr]
            for name in manifest[0]["Layers"]
        ]
    assert blobs == image.blobs
    assert [gzip.decompress(b) for b in blobs] == image.tars
    assert app.test_client().get("/docker/team__api_v1.tar?layers=zip").status_code == 400


def four_entries(tmp_path, ages):
    """A store of 3000 bytes holding four 1000-byte blobs last used `ages` seconds ago."""
    cache = filesystem_store(tmp_path / "c", max_bytes=3000)
    names = []
    for index in range(4):
        data = bytes([index]) * 1000
        cache.put_document("blobs", digest(data), data)
        names.append(digest(data))
    for age, name in zip(ages, names, strict=True):
        path = next((tmp_path / "c" / "blobs" / "sha256").glob(name[7:] + "-*"))
        os.utime(path, (1_000_000 - age, 1_000_000 - age))
    return cache, names


def test_eviction_is_least_recently_used(tmp_path):
    # Entry 0 was used last; entry 1 is the least recently used.
    cache, names = four_entries(tmp_path, (10, 40, 30, 20))
    assert cache.evict_if_needed() == 2
    assert stored_bytes(cache) == 2000
    assert cache.get_document("blobs", names[0]) is not None
    assert cache.get_document("blobs", names[3]) is not None
    assert cache.get_document("blobs", names[1]) is None
    assert cache.get_document("blobs", names[2]) is None


@responses.activate
def test_sealed_entries_are_trusted_and_a_broken_seal_is_hashed_again(app, cache_dir, monkeypatch):
    import passthrough.store.filesystem as cache_module

    image = big_image()
    image.register(responses)
    client = app.test_client()
    full = client.get("/docker/team__api_v1.tar").data
    hashed: list[int] = []
    real = cache_module._hash_handle

    def counting(handle):
        hashed.append(1)
        return real(handle)

    monkeypatch.setattr(cache_module, "_hash_handle", counting)
    # A fresh process (a new ContentStore) trusts the seal written at commit.
    fresh = create_app(
        {"REGISTRY_URL": REG, "ENV_FILE": "/nonexistent", "CACHE_DIR": str(cache_dir)}
    )
    assert fresh.test_client().get("/docker/team__api_v1.tar").data == full
    assert hashed == []
    # Touching the content breaks the seal: the entry is hashed before use.
    layer_file = next((cache_dir / "layers" / "sha256").iterdir())
    layer_file.write_bytes(layer_file.read_bytes())
    assert fresh.test_client().get("/docker/team__api_v1.tar").data == full
    assert len(hashed) == 1


@responses.activate
def test_a_lost_layer_is_rebuilt_from_its_cached_blob_without_upstream(app, cache_dir):
    image = big_image()
    image.register(responses)
    client = app.test_client()
    full = client.get("/docker/team__api_v1.tar").data
    gets = blob_gets(image)
    for layer_file in (cache_dir / "layers" / "sha256").iterdir():
        layer_file.unlink()
    assert client.get("/docker/team__api_v1.tar").data == full
    assert blob_gets(image) == gets, "inflated from the cached blobs, not fetched again"


def _stale_app(tmp_path, cache_dir, serve_stale: str):
    return create_app(
        {
            "REGISTRY_URL": REG,
            "ENV_FILE": "/nonexistent",
            "TEMP_DIR": str(tmp_path),
            "CACHE_DIR": str(cache_dir),
            "SERVE_STALE": serve_stale,
            "UPSTREAM_RETRIES": "0",
        }
    )


@pytest.mark.parametrize("serve_stale", ["true", "false"])
def test_serve_stale_uses_the_last_known_digest_while_the_registry_is_down(
    tmp_path, cache_dir, serve_stale
):
    import base64

    import requests

    image = big_image()
    app = _stale_app(tmp_path, cache_dir, serve_stale)
    client = app.test_client()
    with responses.RequestsMock(assert_all_requests_are_fired=False) as up:
        image.register(up)
        full = client.get("/docker/team__api_v1.tar").data
    with responses.RequestsMock(assert_all_requests_are_fired=False) as down:
        down.add(responses.HEAD, f"{REG}/v2/team/api/manifests/v1", body=requests.ConnectionError())
        down.add(responses.GET, f"{REG}/v2/team/api/manifests/v1", body=requests.ConnectionError())
        stale = client.get("/docker/team__api_v1.tar")
        if serve_stale == "true":
            assert stale.status_code == 200 and stale.data == full
            # Never for a client's own credentials: their access cannot be proven offline.
            auth = "Basic " + base64.b64encode(b"alice:secret").decode()
            refused = client.get("/docker/team__api_v1.tar", headers={"Authorization": auth})
            assert refused.status_code == 502
        else:
            assert stale.status_code == 502


@pytest.mark.rig  # starts a Python process: the full tier
def test_a_live_writers_sealed_part_survives_another_store_opening(tmp_path, monkeypatch):
    """A commit seals the part (mtime years back) just before its rename: a store
    opened in that instant by another process (gc, a new worker) must leave it alone,
    and still remove the parts of a dead writer and those untouched for a day."""
    import subprocess
    import sys

    from passthrough.store import content

    root = tmp_path / "store"
    filesystem_store(root, 0)
    staging = root / "tmp"
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        sealed = staging / f"put-1.{writer.pid}.aaaaaa.part"
        sealed.write_bytes(b"manifest")
        os.utime(sealed, ns=(0, 946_684_800 * 1_000_000_000))  # what commit_file does
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        orphan = staging / f"put-2.{dead.pid}.bbbbbb.part"
        orphan.write_bytes(b"left behind")

        filesystem_store(root, 0)
        assert sealed.exists()
        assert not orphan.exists()

        # A day later (by the inode's change time) a live pid does not keep it.
        monkeypatch.setattr(content, "STALE_PART_SECONDS", -1)
        filesystem_store(root, 0)
        assert not sealed.exists()
    finally:
        writer.kill()
        writer.wait()
