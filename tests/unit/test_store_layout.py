"""The store's key layout (:mod:`passthrough.store.layout`): every kind of key built
then parsed gives back what built it, a key of one kind is never read as another, and
gc's listing of a store parses exactly the records the hosted area built."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from passthrough.config import load_settings
from passthrough.oci.manifest import OCI_MANIFEST
from passthrough.oci.reference import TAG_RE
from passthrough.registry.gc import list_store
from passthrough.registry.hosted import Hosted
from passthrough.store import layout
from passthrough.store.layout import HostedKey
from tests.support.stores import filesystem_store

digests = st.binary(max_size=64).map(lambda data: "sha256:" + hashlib.sha256(data).hexdigest())
kinds = st.sampled_from(layout.KINDS)
# Built from alphabets rather than regexes: as wide, and fast enough for the fast tier.
_ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"
_words = st.text(_ALNUM, min_size=1, max_size=8)
components = st.builds(
    lambda first, rest: first + "".join(sep + word for sep, word in rest),
    _words,
    st.lists(st.tuples(st.sampled_from([".", "_", "__", "-", "--"]), _words), max_size=2),
)
repositories = st.lists(components, min_size=1, max_size=4).map("/".join)
tags = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from(_ALNUM + "_" + _ALNUM.upper()),
    st.text(_ALNUM + _ALNUM.upper() + "._-", max_size=20),
)
upload_ids = st.binary(min_size=16, max_size=16).map(bytes.hex)

#: Every kind of key, as the layout builds it.
hosted_records = st.one_of(
    st.builds(HostedKey, repositories, st.just(layout.TAG), tags),
    st.builds(HostedKey, repositories, st.just(layout.MANIFEST), digests),
    st.builds(HostedKey, repositories, st.just(layout.BLOB), digests),
    st.builds(HostedKey, repositories, st.just(layout.REFERRER), digests, digests),
)
any_key = st.one_of(
    st.builds(layout.content_key, kinds, digests),
    st.builds(layout.pin_key, kinds, digests),
    st.builds(
        lambda r, n, t: layout.tag_record_key(layout.tag_id(r, n, t)),
        components,
        repositories,
        tags,
    ),
    hosted_records.map(layout.hosted_key),
    st.builds(layout.upload_state_key, upload_ids),
    st.builds(layout.upload_data_key, upload_ids),
    st.builds(layout.upload_pending_key, upload_ids, st.integers(0, 10**6)),
)


@given(kinds, digests)
def test_content_keys_round_trip(kind: str, digest: str) -> None:
    key = layout.content_key(kind, digest)
    assert key.startswith(layout.content_prefix(kind))
    assert layout.parse_content_key(key) == (kind, digest)
    assert layout.digest_of_hex(layout.hex_of(digest)) == digest


@given(kinds, digests)
def test_pin_keys_round_trip_and_name_their_content_key(kind: str, digest: str) -> None:
    key = layout.pin_key(kind, digest)
    assert key == layout.PINS + layout.content_key(kind, digest)
    assert layout.parse_pin_key(key) == (kind, digest)


@given(components, repositories, tags)
def test_tag_record_keys_round_trip(registry: str, repository: str, tag: str) -> None:
    identity = layout.tag_id(registry, repository, tag)
    assert layout.parse_tag_record_key(layout.tag_record_key(identity)) == identity


@given(hosted_records)
def test_hosted_keys_round_trip(record: HostedKey) -> None:
    assert TAG_RE.fullmatch(record.name) or record.name.startswith("sha256:")
    key = layout.hosted_key(record)
    assert key.startswith(layout.hosted_prefix(record.repository, record.section))
    assert layout.parse_hosted_key(key) == record
    if record.section == layout.REFERRER:
        assert record.subject is not None
        assert key.startswith(layout.hosted_referrers_prefix(record.repository, record.subject))


@given(upload_ids, st.integers(0, 10**6))
def test_upload_keys_round_trip(upload_id: str, generation: int) -> None:
    for key, name in [
        (layout.upload_state_key(upload_id), layout.UPLOAD_STATE),
        (layout.upload_data_key(upload_id), layout.UPLOAD_DATA),
        (layout.upload_pending_key(upload_id, generation), f"pending.{generation}"),
    ]:
        assert key.startswith(layout.upload_prefix(upload_id))
        assert layout.parse_upload_key(key) == (upload_id, name)


@given(any_key)
def test_a_key_is_read_as_its_own_kind_only(key: str) -> None:
    parsed = [
        layout.parse_content_key(key),
        layout.parse_pin_key(key),
        layout.parse_tag_record_key(key),
        layout.parse_hosted_key(key),
        layout.parse_upload_key(key),
    ]
    assert sum(p is not None for p in parsed) == 1, (key, parsed)


@given(st.text(max_size=12), st.text(alphabet="0123456789abcdef", max_size=8))
def test_staging_part_names_carry_the_pid(name: str, token: str) -> None:
    part = layout.part_name(name.replace(".", "-"), token or None)
    assert part.endswith(layout.PART_SUFFIX)
    assert layout.part_pid(part) is not None
    assert layout.part_pid(name + ".json") is None


@pytest.mark.parametrize(
    "key",
    [
        "hosted/team/app/_unknown/" + "a" * 64 + ".json",  # a section that does not exist
        "hosted/team/app/_manifests/" + "A" * 64 + ".json",  # not a lower-case hex
        "hosted/team/app/_blobs/" + "a" * 64,  # no .json
        "hosted/team/app/_tags/.json",  # no tag
        "hosted/team/app/_tags/v1/x.json",  # a tag has no slash
        "hosted/team/app/_referrers/" + "a" * 64 + ".json",  # no subject
        "hosted/_tags/v1.json",  # no repository
        "hosted/team/app/manifest.json",  # no section
        "blobs/sha256/" + "a" * 63,
        "blobs/sha512/" + "a" * 64,
        "pins/layers/sha256/xyz",
        "tags/not-a-hash.json",
        "uploads/" + "a" * 31 + "/state.json",
        "uploads/" + "a" * 32,
    ],
)
def test_what_the_layout_never_builds_is_never_parsed(key: str) -> None:
    assert layout.parse_hosted_key(key) is None
    assert layout.parse_content_key(key) is None
    assert layout.parse_pin_key(key) is None
    assert layout.parse_tag_record_key(key) is None
    assert layout.parse_upload_key(key) is None


def test_builders_refuse_what_is_no_sha256_digest() -> None:
    for digest in ("sha512:" + "a" * 64, "sha256:" + "A" * 64, "sha256:../../etc", "a" * 64):
        with pytest.raises(ValueError, match="only sha256 digests are stored"):
            layout.content_key("blobs", digest)
        with pytest.raises(ValueError):
            layout.hosted_manifest_key("team/app", digest)
    with pytest.raises(ValueError, match="unknown kind"):
        layout.content_key("hosted", "sha256:" + "a" * 64)
    with pytest.raises(ValueError):
        layout.upload_state_key("../../x")


@settings(max_examples=25, deadline=None)  # a store on disk per example
@given(st.lists(hosted_records, max_size=8), st.lists(st.tuples(kinds, digests), max_size=4))
def test_gc_lists_exactly_what_the_hosted_area_builds(
    records: list[HostedKey], pins: list[tuple[str, str]]
) -> None:
    """The records a hosted area writes (built by the layout, as hosted.py builds them),
    listed by gc from a real store: each one lands where gc looks for it."""
    import tempfile

    with tempfile.TemporaryDirectory() as root:
        store = filesystem_store(Path(root))
        for record in records:
            store.backend.put_bytes(layout.hosted_key(record), json.dumps({}).encode())
        for kind, digest in pins:
            store.pin(kind, digest)
        listing = list_store(store)
    found: set[HostedKey] = set()
    for repository, by_tag in listing.tags.items():
        found |= {HostedKey(repository, layout.TAG, tag) for tag in by_tag}
    for repository, manifests in listing.manifests.items():
        found |= {HostedKey(repository, layout.MANIFEST, digest) for digest in manifests}
    for repository, blobs in listing.blobs.items():
        found |= {HostedKey(repository, layout.BLOB, digest) for digest in blobs}
    for repository, by_subject in listing.referrers.items():
        for subject, entries in by_subject.items():
            found |= {HostedKey(repository, layout.REFERRER, d, subject) for d in entries}
    assert found == set(records)
    assert set(listing.pins) == {pin for pin in pins if pin[0] in ("blobs", "manifests")}


def test_gc_parses_every_record_the_hosted_area_writes(tmp_path: Path) -> None:
    """Through :class:`Hosted` itself: blob links, a manifest, its tag, a referrer."""
    settings = load_settings({"CACHE_DIR": str(tmp_path)}, env_file="/nonexistent")
    store = filesystem_store(tmp_path)
    hosted = Hosted(replace(settings, hosted_repositories=("team/*",)), store)
    config, layer = b'{"marker": 1}', b"layer"
    for data in (config, layer):
        store.put_document("blobs", _digest(data), data)
        for repository in ("team/app", "team/app/nested"):
            hosted.link_blob(repository, _digest(data), len(data))
    image = _manifest(config, layer)
    subject = hosted.put_manifest("team/app", "v1", image, OCI_MANIFEST).digest
    signature = _manifest(config, layer, subject=(subject, len(image)))
    hosted.put_manifest("team/app/nested", "sig", signature, OCI_MANIFEST)

    listing = list_store(store)
    written = {info.key for info in store.backend.list(layout.HOSTED)}
    parsed = {
        info.key
        for section in (listing.tags, listing.manifests, listing.blobs)
        for by_name in section.values()
        for info in by_name.values()
    } | {
        info.key
        for by_subject in listing.referrers.values()
        for entries in by_subject.values()
        for info in entries.values()
    }
    assert parsed == written and len(written) == 9
    tags = {repository: set(by_tag) for repository, by_tag in listing.tags.items()}
    assert tags == {"team/app": {"v1"}, "team/app/nested": {"sig"}}
    assert set(listing.referrers["team/app/nested"]) == {subject}
    assert set(listing.pins) == {("blobs", _digest(config)), ("blobs", _digest(layer))} | {
        ("manifests", subject),
        ("manifests", _digest(signature)),
    }
    assert hosted.repositories() == ["team/app", "team/app/nested"]
    assert hosted.tags("team/app") == ["v1"] and hosted.exists("team/app/nested")


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _manifest(config: bytes, layer: bytes, subject: tuple[str, int] | None = None) -> bytes:
    document: dict[str, object] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": _digest(config),
            "size": len(config),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": _digest(layer),
                "size": len(layer),
            }
        ],
    }
    if subject is not None:
        document["subject"] = {"mediaType": OCI_MANIFEST, "digest": subject[0], "size": subject[1]}
    return json.dumps(document).encode()
