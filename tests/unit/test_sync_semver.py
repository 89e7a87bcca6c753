"""Version tags and semver ranges (passthrough.sync.semver): the grammar's edge cases
against node-semver's meaning, and the refusals with their reason."""

from __future__ import annotations

import pytest

from passthrough.sync.semver import parse_range, parse_version


@pytest.mark.parametrize(
    ("tag", "version"),
    [
        ("1", (1, 0, 0)),
        ("1.25", (1, 25, 0)),
        ("1.25.3", (1, 25, 3)),
        ("v2.0.1", (2, 0, 1)),
        ("0.0.0", (0, 0, 0)),
        ("1.25.3-alpine", None),
        ("1.25-rc1", None),
        ("1.2.3.4", None),
        ("01.2", None),
        ("latest", None),
        ("v", None),
        ("1.", None),
    ],
)
def test_which_tags_are_versions(tag: str, version: tuple[int, int, int] | None) -> None:
    assert parse_version(tag) == version


TAGS = ["0.9", "1.0", "1.24.9", "1.25", "1.25.0", "1.25.3", "1.26.1", "2.0", "2.1.0", "v1.30",
        "1.25.3-alpine", "latest"]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (">=1.25 <2", ["1.25", "1.25.0", "1.25.3", "1.26.1", "v1.30"]),
        (">= 1.25 < 2", ["1.25", "1.25.0", "1.25.3", "1.26.1", "v1.30"]),
        ("1.25", ["1.25", "1.25.0", "1.25.3"]),
        ("=1.25.3", ["1.25.3"]),
        ("1.25.x", ["1.25", "1.25.0", "1.25.3"]),
        ("1.x", ["1.0", "1.24.9", "1.25", "1.25.0", "1.25.3", "1.26.1", "v1.30"]),
        ("*", [t for t in TAGS if t not in ("1.25.3-alpine", "latest")]),
        ("~1.25.1", ["1.25.3"]),
        ("~1.25", ["1.25", "1.25.0", "1.25.3"]),
        ("^1.25.1", ["1.25.3", "1.26.1", "v1.30"]),
        ("^0.9", ["0.9"]),
        (">1.25", ["1.26.1", "2.0", "2.1.0", "v1.30"]),
        (">1.25.0", ["1.25.3", "1.26.1", "2.0", "2.1.0", "v1.30"]),
        ("<=1.25", ["0.9", "1.0", "1.24.9", "1.25", "1.25.0", "1.25.3"]),
        ("<1.25", ["0.9", "1.0", "1.24.9"]),
        ("<1 || >=2.1", ["0.9", "2.1.0"]),
    ],
)
def test_ranges_select_the_versions_node_semver_would(text: str, expected: list[str]) -> None:
    found = parse_range(text)
    assert [t for t in TAGS if found.matches_tag(t)] == expected


def test_caret_of_zero_versions_keeps_the_first_non_zero_part() -> None:
    assert parse_range("^0.3.1").matches((0, 3, 9))
    assert not parse_range("^0.3.1").matches((0, 4, 0))
    assert parse_range("^0.0.3").matches((0, 0, 3))
    assert not parse_range("^0.0.3").matches((0, 0, 4))


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("  ", "empty"),
        (">=1.25 ||", "empty alternative"),
        (">=1.2x", "no comparator"),
        ("=>1.25", "no comparator"),
        ("1.25.3-rc1", "no comparator"),
        ("1.2.3.4", "no comparator"),
        ("latest", "no comparator"),
    ],
)
def test_bad_ranges_are_refused_with_the_reason(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_range(text)
