"""Version tags and semver ranges, as ``semver: ">=1.25 <2"`` in SYNC_FILE selects them.

A tag is a *version* when it is ``[v]MAJOR[.MINOR[.PATCH]]`` (``1``, ``1.25``,
``v1.25.3``): missing parts count as 0, so ``1.25`` and ``1.25.0`` are the same
version. A tag with anything more (``1.25.3-alpine``, ``1.25-rc1``, ``1.2.3.4``) is a
variant or a pre-release, not a version: no range matches it (select those with
``tags`` globs instead). This is the rule Docker Hub's official images follow, where the
suffix names a base image, not a pre-release.

A range is node-semver's grammar, the subset registries' tags need: comparators
separated by spaces must all hold, ``||`` separates alternatives. A comparator is an
operator (``>=``, ``>``, ``<=``, ``<``, ``=``, ``~``, ``^``, or none) and a partial
version whose missing or ``x``/``*`` parts are wildcards: ``1.25`` alone is
``>=1.25.0 <1.26.0``, ``~1.25.3`` is ``>=1.25.3 <1.26.0``, ``^1.25`` is ``>=1.25.0 <2.0.0``
(``^0.3`` stays below ``0.4``), ``>1.25`` is ``>=1.26.0``, ``<=1.25`` is ``<1.26.0``.
A range that says anything else is refused with the reason (ValueError).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass

Version = tuple[int, int, int]

_TAG_RE = re.compile(r"v?(0|[1-9]\d*)(?:\.(0|[1-9]\d*))?(?:\.(0|[1-9]\d*))?")
_COMPARATOR_RE = re.compile(r"(>=|<=|>|<|=|~|\^)?v?(\d+|[xX*])(?:\.(\d+|[xX*]))?(?:\.(\d+|[xX*]))?")
_OPS: dict[str, Callable[[Version, Version], bool]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
}
#: Far above any real version: the open end of a range.
_TOP: Version = (1 << 62, 0, 0)


def parse_version(tag: str) -> Version | None:
    """The version a tag stands for, or None when it is no version (see the module)."""
    found = _TAG_RE.fullmatch(tag)
    if found is None:
        return None
    major, minor, patch = found.groups()
    return (int(major), int(minor or 0), int(patch or 0))


@dataclass(frozen=True)
class Bound:
    """One simple comparator on full versions: ``op`` is >=, >, <= or <."""

    op: str
    version: Version

    def holds(self, version: Version) -> bool:
        return _OPS[self.op](version, self.version)


@dataclass(frozen=True)
class Range:
    """A parsed range: alternatives, each a list of bounds that must all hold."""

    text: str
    alternatives: tuple[tuple[Bound, ...], ...]

    def matches(self, version: Version | None) -> bool:
        if version is None:
            return False
        return any(all(b.holds(version) for b in bounds) for bounds in self.alternatives)

    def matches_tag(self, tag: str) -> bool:
        return self.matches(parse_version(tag))


def parse_range(text: str) -> Range:
    """A range (see the module); ValueError naming what is wrong."""
    if not text.strip():
        raise ValueError("the semver range is empty")
    alternatives = []
    for alternative in text.split("||"):
        words = _words(alternative)
        if not words:
            raise ValueError(f"empty alternative in semver range {text!r}")
        bounds: list[Bound] = []
        for word in words:
            bounds.extend(_comparator(word, text))
        alternatives.append(tuple(bounds))
    return Range(text, tuple(alternatives))


def _words(alternative: str) -> list[str]:
    """The comparators of one alternative; an operator written apart from its version
    (``>= 1.25``) is joined to it."""
    words: list[str] = []
    for word in alternative.split():
        if words and words[-1] in (">=", "<=", ">", "<", "=", "~", "^"):
            words[-1] += word
        else:
            words.append(word)
    return words


def _comparator(word: str, text: str) -> list[Bound]:
    found = _COMPARATOR_RE.fullmatch(word)
    if found is None:
        raise ValueError(f"{word!r} in semver range {text!r} is no comparator (such as >=1.25)")
    op, *parts = found.groups()
    numbers: list[int] = []
    for part in parts:
        if part is None or part in "xX*":
            break
        numbers.append(int(part))
    given = len(numbers)
    floor: Version = (*numbers, 0, 0, 0)[:3]  # type: ignore[assignment]
    ceiling = _next(numbers)  # the first version past the partial one
    return _bounds(op or "=", floor, ceiling, numbers, given)


def _next(numbers: list[int]) -> Version:
    """The lowest version above every version the partial ``numbers`` stands for."""
    if not numbers:
        return _TOP
    bumped = [*numbers[:-1], numbers[-1] + 1]
    return (*bumped, 0, 0, 0)[:3]  # type: ignore[return-value]


def _bounds(
    op: str, floor: Version, ceiling: Version, numbers: list[int], given: int
) -> list[Bound]:
    if op == "=":
        return (
            [Bound(">=", floor), Bound("<", ceiling)]
            if given < 3
            else [
                Bound(">=", floor),
                Bound("<=", floor),
            ]
        )
    if op == ">=":
        return [Bound(">=", floor)]
    if op == ">":
        return [Bound(">=", ceiling)] if given < 3 else [Bound(">", floor)]
    if op == "<":
        return [Bound("<", floor)] if given else [Bound("<", (0, 0, 0))]
    if op == "<=":
        return [Bound("<", ceiling)] if given < 3 else [Bound("<=", floor)]
    if op == "~":
        # ~1.25.3 and ~1.25: the minor is fixed; ~1: the major.
        return [Bound(">=", floor), Bound("<", _next(numbers[: max(1, min(given, 2))]))]
    # ^: the first non-zero part given is fixed (^0.3.1 < 0.4.0, ^1.2 < 2.0.0).
    fixed = next((i for i, n in enumerate(numbers) if n != 0), given - 1)
    return [Bound(">=", floor), Bound("<", _next(numbers[: max(1, fixed + 1)]))]
