"""``passthrough gc`` on a real filesystem store populated through the hosted API (the
Flask test client, settings built by hand): what it marks, what it sweeps, the grace
period, upload sessions, cached content, eviction of pinned blobs, a run interrupted
after every possible number of deletes, and the command's lines and exit codes."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from passthrough import create_app
from passthrough.cli import main
from passthrough.config import load_settings
from passthrough.registry import gc as gc_module
from passthrough.registry import hosted as hosted_module
from passthrough.registry.gc import Collector, Summary, human_bytes, parse_duration
from passthrough.store.flight import Held
from passthrough.store.layout import content_key
from tests.support.helpers import digest
from tests.support.stores import filesystem_store, stored_bytes

CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"


class Rig:
    """A hosted area on a directory, the Flask client that pushes into it, and gc runs
    over a ContentStore of its own on the same directory (as the command has)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        settings = load_settings({"CACHE_DIR": str(root)}, env_file="/nonexistent")
        settings = replace(settings, hosted_repositories=("team/*",))
        self.client: FlaskClient = create_app({"SETTINGS": settings}).test_client()
        self.store = filesystem_store(root, 0)

    # -- pushing -----------------------------------------------------------------------

    def blob(self, name: str, data: bytes) -> str:
        response = self.client.post(f"/v2/{name}/blobs/uploads/?digest={digest(data)}", data=data)
        assert response.status_code == 201, response.data
        return digest(data)

    def manifest(self, name: str, reference: str, body: bytes, media_type: str) -> str:
        response = self.client.put(
            f"/v2/{name}/manifests/{reference}", data=body, headers={"Content-Type": media_type}
        )
        assert response.status_code == 201, response.data
        return digest(body)

    def image(
        self, name: str, tag: str | None, marker: str, *, shared: bytes | None = None, **extra: Any
    ) -> tuple[str, list[str]]:
        """An image (config, a layer of its own, optionally a shared one); its manifest
        digest and its blob digests."""
        config = json.dumps({"marker": marker}).encode()
        layers = [f"layer-{marker}".encode()] + ([shared] if shared else [])
        for data in (config, *layers):
            self.blob(name, data)
        body = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": MANIFEST_TYPE,
                "config": {"mediaType": CONFIG_TYPE, "digest": digest(config), "size": len(config)},
                "layers": [
                    {"mediaType": LAYER_TYPE, "digest": digest(x), "size": len(x)} for x in layers
                ],
                **extra,
            }
        ).encode()
        manifest = self.manifest(name, tag or digest(body), body, MANIFEST_TYPE)
        return manifest, [digest(config), *(digest(x) for x in layers)]

    def untag(self, name: str, tag: str) -> None:
        assert self.client.delete(f"/v2/{name}/manifests/{tag}").status_code == 202

    # -- looking -----------------------------------------------------------------------

    def gc(self, *, delete: bool, grace: float = 0.0, **kwargs: Any) -> tuple[list[str], Summary]:
        lines: list[str] = []
        summary = Collector(self.store, grace=grace, out=lines.append, **kwargs).run(delete=delete)
        return lines, summary

    def stored(self, kind: str, value: str) -> bool:
        return self.store.backend.size(content_key(kind, value)) is not None

    def pinned(self, kind: str, value: str) -> bool:
        return "pins/" + content_key(kind, value) in {"pins/" + k for k in self.store.pinned()}

    def snapshot(self) -> set[str]:
        """Every file of the store but locks and temporary files."""
        return {
            p.relative_to(self.root).as_posix()
            for p in self.root.rglob("*")
            if p.is_file() and p.parts[len(self.root.parts)] not in ("locks", "tmp")
        }

    def pulls(self, name: str, tag: str) -> None:
        """The tag pulls whole: the manifest, every child, every blob, digests checked."""
        response = self.client.get(f"/v2/{name}/manifests/{tag}")
        assert response.status_code == 200, (name, tag, response.data)
        self._pull_document(name, response.data)

    def _pull_document(self, name: str, body: bytes) -> None:
        document = json.loads(body)
        for child in document.get("manifests", []):
            got = self.client.get(f"/v2/{name}/manifests/{child['digest']}")
            assert got.status_code == 200 and digest(got.data) == child["digest"]
            self._pull_document(name, got.data)
        for entry in [document.get("config"), *document.get("layers", [])]:
            if entry is None:
                continue
            got = self.client.get(f"/v2/{name}/blobs/{entry['digest']}")
            assert got.status_code == 200, (name, entry["digest"], got.data)
            assert digest(got.data) == entry["digest"]


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path / "cache")


def test_durations_and_sizes() -> None:
    assert [parse_duration(x) for x in ("90s", "15m", "1h", "2d", "0s", "1h30m")] == [
        90,
        900,
        3600,
        172800,
        0,
        5400,
    ]
    for bad in ("", "1", "h", "-1h", "1w", "1.5h", "1h junk"):
        with pytest.raises(ValueError, match="is not a duration"):
            parse_duration(bad)
    assert human_bytes(1234) == "1.2 KiB" and human_bytes(12) == "12 bytes"
    assert human_bytes(int(12.3 * 2**20)) == "12.3 MiB"


def test_nothing_to_collect_when_every_push_is_tagged(rig: Rig) -> None:
    rig.image("team/app", "1.0", "a")
    before = rig.snapshot()
    lines, _ = rig.gc(delete=True)
    assert lines == ["removed 0 manifests, 0 blobs, 0 bytes; 0 uploads in progress left alone"]
    assert rig.snapshot() == before
    rig.pulls("team/app", "1.0")


def test_dry_run_lists_and_removes_nothing_then_delete_removes_exactly_that(rig: Rig) -> None:
    shared = b"shared-layer"
    kept, kept_blobs = rig.image("team/app", "1.0", "a", shared=shared)
    gone, gone_blobs = rig.image("team/app", "2.0", "b", shared=shared)
    rig.untag("team/app", "2.0")
    before = rig.snapshot()

    lines, summary = rig.gc(delete=False)
    assert rig.snapshot() == before
    own = gone_blobs[:2]  # its config and its own layer: the shared layer stays
    manifest_size = rig.store.backend.size(content_key("manifests", gone)) or 0
    expected = {
        f"would remove manifest {gone} {human_bytes(manifest_size)} (team/app)",
        *(
            f"would remove blob {d} {human_bytes(rig.store.blob_size(d) or 0)} (team/app)"
            for d in own
        ),
    }
    assert set(lines[:-1]) == expected
    assert (summary.manifests, summary.blobs) == (1, 2)
    assert lines[-1].startswith("dry run: would remove 1 manifest, 2 blobs, ")
    assert lines[-1].endswith("(--delete to act)")

    lines, summary = rig.gc(delete=True)
    assert {line.replace("would remove", "removed") for line in expected} == set(lines[:-1])
    assert lines[-1].startswith("removed 1 manifest, 2 blobs, ")
    for d in own:
        assert not rig.stored("blobs", d) and not rig.pinned("blobs", d)
        assert rig.client.head(f"/v2/team/app/blobs/{d}").status_code == 404
    assert not rig.stored("manifests", gone) and not rig.pinned("manifests", gone)
    assert rig.client.get(f"/v2/team/app/manifests/{gone}").status_code == 404
    for d in kept_blobs:
        assert rig.stored("blobs", d) and rig.pinned("blobs", d)
    assert rig.stored("manifests", kept)
    rig.pulls("team/app", "1.0")
    # Exactly that: a second run finds nothing.
    assert rig.gc(delete=True)[1].blobs == 0
    removed = before - rig.snapshot()
    assert all(gone[7:] in key or any(d[7:] in key for d in own) for key in removed)


def test_an_index_keeps_its_children_and_referrers_of_reachable_subjects_stay(rig: Rig) -> None:
    amd, amd_blobs = rig.image("team/multi", None, "amd64")
    arm, arm_blobs = rig.image("team/multi", None, "arm64")

    def descriptor(value: str) -> dict[str, Any]:
        size = rig.store.backend.size(content_key("manifests", value))
        return {"mediaType": MANIFEST_TYPE, "digest": value, "size": size}

    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": INDEX_TYPE,
            "manifests": [descriptor(amd), descriptor(arm)],
        }
    ).encode()
    index_digest = rig.manifest("team/multi", "latest", index, INDEX_TYPE)
    # A signature of the index (untagged, its subject reachable) and one of a child
    # that is about to become unreachable with the index's tag.
    signature, signature_blobs = rig.image(
        "team/multi", None, "sig", subject=descriptor(index_digest)
    )
    lines, _ = rig.gc(delete=True)
    assert lines[0].startswith("removed 0 manifests, 0 blobs")
    rig.pulls("team/multi", "latest")
    rig.pulls("team/multi", signature)
    listed = json.loads(rig.client.get(f"/v2/team/multi/referrers/{index_digest}").data)
    assert [m["digest"] for m in listed["manifests"]] == [signature]

    rig.untag("team/multi", "latest")
    lines, summary = rig.gc(delete=True)
    assert (summary.manifests, summary.blobs) == (4, 6)
    for value in (amd, arm, index_digest, signature):
        assert not rig.stored("manifests", value)
    for value in amd_blobs + arm_blobs + signature_blobs:
        assert not rig.stored("blobs", value)
    # The referrer entry went with its manifest.
    assert not list(rig.store.backend.list("hosted/team/multi/_referrers/"))
    assert not list(rig.store.backend.list("pins/"))


def test_a_blob_linked_in_two_repositories(rig: Rig) -> None:
    _, blobs = rig.image("team/app", "1.0", "a")
    mounted = rig.client.post(f"/v2/team/other/blobs/uploads/?mount={blobs[1]}&from=team/app")
    assert mounted.status_code == 201
    lines, summary = rig.gc(delete=True)
    # team/other's link goes (no tag of team/other reaches it), the bytes stay.
    assert lines[:-1] == [f"removed blob {blobs[1]} from team/other (bytes kept)"]
    assert summary.bytes == 0 and rig.stored("blobs", blobs[1]) and rig.pinned("blobs", blobs[1])
    assert rig.client.head(f"/v2/team/other/blobs/{blobs[1]}").status_code == 404
    rig.pulls("team/app", "1.0")


def test_the_grace_period_keeps_young_content(rig: Rig) -> None:
    rig.image("team/app", "1.0", "a")
    rig.untag("team/app", "1.0")
    rig.blob("team/app", b"a blob whose manifest is not pushed yet")
    before = rig.snapshot()
    assert rig.gc(delete=True, grace=3600)[1].blobs == 0
    assert rig.snapshot() == before
    # Two hours later it is old enough.
    later = time.time() + 7200
    _, summary = rig.gc(delete=True, grace=3600, now=lambda: later)
    assert (summary.manifests, summary.blobs) == (1, 3)


class _TwoHoursAgo:
    """Stands in for the time module of the hosted area: what it writes is old."""

    at = time.time() - 7200

    @classmethod
    def time(cls) -> float:
        return cls.at


def test_a_dry_run_does_not_make_the_next_run_keep_what_it_listed(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hosted_module, "time", _TwoHoursAgo)
    rig.image("team/app", "1.0", "a")
    rig.untag("team/app", "1.0")
    monkeypatch.undo()
    for path in [*(rig.root / "pins").rglob("*"), *(rig.root / "hosted").rglob("*")]:
        if path.is_file():
            os.utime(path, (_TwoHoursAgo.at, _TwoHoursAgo.at))
    # The dry run reads the records (on disk that moves their atime); the run after it,
    # with the default grace, still finds them old.
    _, dry = rig.gc(delete=False, grace=3600)
    assert (dry.manifests, dry.blobs) == (1, 2)
    _, done = rig.gc(delete=True, grace=3600)
    assert (done.manifests, done.blobs, done.bytes) == (1, 2, dry.bytes)


def test_uploads_in_progress_are_left_alone_and_idle_ones_expire(rig: Rig) -> None:
    started = rig.client.post("/v2/team/app/blobs/uploads/")
    location = started.headers["Location"]
    assert rig.client.patch(location, data=b"half a layer").status_code == 202
    lines, summary = rig.gc(delete=True)
    assert summary.uploads_in_progress == 1
    assert lines[-1].endswith("1 upload in progress left alone")
    assert rig.client.get(location).headers["Range"] == f"0-{len(b'half a layer') - 1}"
    # A day and more later, the session is abandoned: listed by the dry run, expired.
    later = time.time() + 2 * 86400
    lines, summary = rig.gc(delete=False, now=lambda: later)
    assert lines[0].startswith("would expire upload ") and "(team/app)" in lines[0]
    assert rig.client.get(location).status_code == 204
    lines, summary = rig.gc(delete=True, now=lambda: later)
    assert lines[0].startswith("expired upload ") and summary.uploads_expired == 1
    assert rig.client.get(location).status_code == 404
    done = rig.client.put(f"{location}?digest={digest(b'x')}", data=b"x")
    assert done.status_code == 404


def test_cached_content_is_never_deleted(rig: Rig) -> None:
    # What the proxy keeps: a manifest and its blobs, never pinned.
    cached_layer, cached_config = b"cached layer", b'{"cached": true}'
    cached_manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": {"mediaType": CONFIG_TYPE, "digest": digest(cached_config), "size": 16},
            "layers": [{"mediaType": LAYER_TYPE, "digest": digest(cached_layer), "size": 12}],
        }
    ).encode()
    rig.store.put_document("blobs", digest(cached_config), cached_config)
    rig.store.put_document("blobs", digest(cached_layer), cached_layer)
    rig.store.put_document("manifests", digest(cached_manifest), cached_manifest)
    rig.store.put_document("blobs", digest(b"a lone cached blob"), b"a lone cached blob")
    # A hosted image that shares the cached layer, then loses its tag.
    _, blobs = rig.image("team/app", "1.0", "a", shared=cached_layer)
    rig.untag("team/app", "1.0")
    lines, summary = rig.gc(delete=True)
    assert (
        f"unpinned blob {digest(cached_layer)} 12 bytes (team/app): also cached, "
        "left to the cache's eviction"
    ) in lines
    assert summary.to_cache == 1 and "1 left to the cache's eviction" in lines[-1]
    assert not rig.pinned("blobs", digest(cached_layer))
    for data in (cached_layer, cached_config, b"a lone cached blob"):
        assert rig.stored("blobs", digest(data))
    assert rig.stored("manifests", digest(cached_manifest))
    # The hosted image's own blobs went.
    assert not rig.stored("blobs", blobs[0]) and not rig.stored("blobs", blobs[1])


def test_eviction_never_takes_a_pinned_hosted_blob(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "cache")
    _, blobs = rig.image("team/app", "1.0", "a", shared=b"h" * 4000)
    for number in range(10):
        data = bytes([number]) * 2000
        rig.store.put_document("blobs", digest(data), data)
    small = filesystem_store(tmp_path / "cache", 5000)
    assert small.evict_if_needed() > 0
    for value in blobs:
        assert rig.stored("blobs", value)
    assert stored_bytes(small) < 10 * 2000
    rig.pulls("team/app", "1.0")


def build_garbage(rig: Rig) -> None:
    """Tagged images (one in an index, one signed), and as much unreachable content of
    every kind."""
    rig.image("team/app", "1.0", "keep", shared=b"common")
    rig.image("team/app", "old", "drop", shared=b"common")
    rig.untag("team/app", "old")
    child, _ = rig.image("team/multi", None, "child")
    size = rig.store.backend.size(content_key("manifests", child))
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": INDEX_TYPE,
            "manifests": [{"mediaType": MANIFEST_TYPE, "digest": child, "size": size}],
        }
    ).encode()
    subject = rig.manifest("team/multi", "v1", index, INDEX_TYPE)
    rig.image(
        "team/multi",
        None,
        "signature",
        subject={"mediaType": INDEX_TYPE, "digest": subject, "size": len(index)},
    )
    orphan, _ = rig.image("team/multi", None, "orphan")
    rig.image(
        "team/multi",
        None,
        "orphan-signature",
        subject={"mediaType": MANIFEST_TYPE, "digest": orphan, "size": 1},
    )
    rig.blob("team/multi", b"a blob nothing names")


TAGS = [("team/app", "1.0"), ("team/multi", "v1")]


def test_interrupted_after_any_number_of_deletes_every_tag_still_pulls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = Rig(tmp_path / "reference")
    build_garbage(reference)
    reference.gc(delete=True)
    wanted = reference.snapshot()

    deletes = 0
    count_original: Callable[[Collector, str, Held], None] = Collector._delete

    def counting(self: Collector, key: str, held: Held) -> None:
        nonlocal deletes
        deletes += 1
        count_original(self, key, held)

    monkeypatch.setattr(Collector, "_delete", counting)
    build_garbage(Rig(tmp_path / "template"))
    shutil.copytree(tmp_path / "template", tmp_path / "probe")
    probe = Rig(tmp_path / "probe")
    probe.gc(delete=True)
    total = deletes
    assert total > 20
    monkeypatch.setattr(Collector, "_delete", count_original)

    for stop in range(1, total):
        # Each stop starts from a copy of the store the probe began with (built once,
        # pushed through the API): the same content, without pushing it again each time.
        shutil.copytree(tmp_path / "template", tmp_path / f"stop{stop}")
        rig = Rig(tmp_path / f"stop{stop}")
        done = 0

        def interrupted(self: Collector, key: str, held: Held, stop: int = stop) -> None:
            nonlocal done
            if done == stop:
                raise KeyboardInterrupt  # as a kill: nothing after this delete runs
            done += 1
            self.backend.delete(key)

        monkeypatch.setattr(Collector, "_delete", interrupted)
        with pytest.raises(KeyboardInterrupt):
            rig.gc(delete=True)
        monkeypatch.setattr(Collector, "_delete", count_original)
        for name, tag in TAGS:
            rig.pulls(name, tag)
        rig.gc(delete=True)  # the next run finishes the work
        assert _normalised(rig.snapshot(), rig) == _normalised(wanted, reference), stop
        for name, tag in TAGS:
            rig.pulls(name, tag)


def _normalised(files: set[str], rig: Rig) -> set[str]:
    # Upload sessions and the inventory's pull records (written by the pulls that check
    # each stop) are not gc's to keep or remove.
    return {f for f in files if not f.startswith(("uploads/", "pulls/"))}


def test_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("STORE", "CACHE_DIR", "S3_BUCKET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("STORE", "off")
    assert main(["gc"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gc needs the content store" in err
    monkeypatch.delenv("STORE")
    rig = Rig(tmp_path / "cache")
    rig.image("team/app", "1.0", "a")
    rig.untag("team/app", "1.0")
    monkeypatch.setenv("CACHE_DIR", str(tmp_path / "cache"))
    assert main(["gc", "--grace", "soon"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--grace 'soon' is not a duration" in err
    assert main(["gc"]) == 0  # the default grace: an hour, nothing is old enough
    assert capsys.readouterr().out.startswith("dry run: would remove 0 manifests, 0 blobs")
    assert main(["gc", "--grace", "0s"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4 and all(line.startswith("would remove ") for line in out[:3])
    assert main(["gc", "--grace", "0s", "--delete"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("removed 1 manifest, 2 blobs, ")
    assert not list(rig.store.backend.list("pins/"))


def test_a_tag_pushed_after_the_first_plan_keeps_what_it_reaches(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gc plans without the lock, then lists and marks again under it before deleting:
    a push that lands in between (here: the untagged manifest tagged again, by a client,
    right after the first plan) keeps its image whole."""
    manifest, blobs = rig.image("team/app", "1.0", "a")
    body = rig.client.get(f"/v2/team/app/manifests/{manifest}").data
    rig.untag("team/app", "1.0")
    original = Collector.plan
    plans: list[int] = []

    def plan_then_push(self: Collector, listing: gc_module.Listing) -> list[gc_module.Step]:
        steps = original(self, listing)
        plans.append(len(steps))
        if len(plans) == 1:
            rig.manifest("team/app", "again", body, MANIFEST_TYPE)
        return steps

    monkeypatch.setattr(Collector, "plan", plan_then_push)
    lines, summary = rig.gc(delete=True)
    assert plans[0] == 6  # the record, the two links, the manifest and two blobs
    assert plans[1] == 0 and (summary.manifests, summary.blobs) == (0, 0), lines
    rig.pulls("team/app", "again")
    assert all(rig.pinned("blobs", b) for b in blobs)


def test_a_push_waits_while_gc_holds_the_lock(rig: Rig) -> None:
    """The lock itself: a manifest PUT does not check its references while gc holds the
    lock exclusive, and completes once it is released."""
    config, layer = b'{"marker": "wait"}', b"layer-wait"
    rig.blob("team/app", config)
    rig.blob("team/app", layer)
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": {"mediaType": CONFIG_TYPE, "digest": digest(config), "size": len(config)},
            "layers": [{"mediaType": LAYER_TYPE, "digest": digest(layer), "size": len(layer)}],
        }
    ).encode()
    finished = threading.Event()

    def push() -> None:
        rig.manifest("team/app", "1.0", body, MANIFEST_TYPE)
        finished.set()

    with rig.store.flight.gc_lock(exclusive=True):
        thread = threading.Thread(target=push)
        thread.start()
        # Never set while the lock is held, however long this waits.
        assert not finished.wait(0.5)
        assert rig.client.get("/v2/team/app/manifests/1.0").status_code == 404
    thread.join(timeout=30)
    assert finished.is_set()
    rig.pulls("team/app", "1.0")
