"""Property-based tests (hypothesis) of the filename and reference parsers: any input
either parses into a reference that satisfies the grammar, or is a BadRequest with a
one-line, control-free message; never another exception."""

from __future__ import annotations

import string
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from passthrough.errors import BadRequest
from passthrough.oci.reference import (
    PATH_COMPONENT_RE,
    TAG_RE,
    ImageReference,
    parse_filename,
    parse_reference_path,
)
from passthrough.upstream.auth import parse_challenges

component = st.from_regex(r"[a-z0-9]+(?:[.-][a-z0-9]+){0,2}", fullmatch=True).filter(
    lambda c: len(c) <= 30
)
tag = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9.-]{0,20}", fullmatch=True)
any_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=300)
pathish = st.text(alphabet=string.ascii_letters + string.digits + "_-.:@/%\r\n\0 ", max_size=200)


def check_outcome(parse: Callable[[str], ImageReference], text: str) -> ImageReference | None:
    try:
        ref = parse(text)
    except BadRequest as exc:
        assert exc.status == 400
        assert "\n" not in exc.message and "\r" not in exc.message and "\0" not in exc.message
        return None
    for part in ref.repository.split("/"):
        assert PATH_COMPONENT_RE.fullmatch(part)
    assert ref.tag is None or TAG_RE.fullmatch(ref.tag)
    return ref


@settings(max_examples=400)
@given(st.one_of(any_text, pathish))
def test_parse_filename_total(text):
    check_outcome(parse_filename, text)


@settings(max_examples=400)
@given(st.one_of(any_text, pathish))
def test_parse_reference_path_total(text):
    check_outcome(parse_reference_path, text)


@given(st.lists(component, min_size=1, max_size=4), tag)
def test_filename_round_trip(components, tag_value):
    filename = "__".join(components) + "_" + tag_value + ".tar"
    ref = parse_filename(filename)
    assert ref == ImageReference("/".join(components), tag=tag_value)


@given(st.lists(component, min_size=1, max_size=4), tag, st.booleans())
def test_reference_round_trip(components, tag_value, with_digest):
    repository = "/".join(components)
    digest = "sha256:" + "ab" * 32
    text = f"{repository}:{tag_value}" + (f"@{digest}" if with_digest else "") + ".tar"
    ref = parse_reference_path(text)
    assert ref.repository == repository and ref.tag == tag_value
    assert ref.digest == (digest if with_digest else None)


@settings(max_examples=400)
@given(any_text)
def test_challenge_parser_never_raises(text):
    for challenge in parse_challenges(text):
        assert challenge.scheme == challenge.scheme.lower()
