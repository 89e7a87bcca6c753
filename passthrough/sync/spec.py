"""SYNC_FILE: which images ``passthrough sync`` keeps in the store, parsed and checked
before anything is fetched, and the tag selection each entry makes.

::

    images:
      - upstream: lab              # an UPSTREAMS alias or a registry host; omitted: REGISTRY_URL
        repository: team/app       # or a glob (team/*, team/**) read from the upstream's _catalog
        tags: ["1.0", "2.*"]       # exact tags and globs (* ? [a-z])
        regex: '^1\\.2[0-9]$'      # optional: tags this regular expression matches
        semver: ">=1.25 <2"        # optional: tags that are versions in this range
        latest: 3                  # optional: only the N highest versions among the matches
        platforms: [linux/amd64, linux/arm64]   # optional; default every platform of an index

An entry's matches are the union of its ``tags`` globs, its ``regex`` and its
``semver`` range; ``latest: N`` then keeps the N highest versions among them
(:mod:`passthrough.sync.semver`). Exact tags are always kept, without reading the tag
list. Anything the file gets wrong (an unknown key, a bad glob, regex or range, an
unknown alias, a hosted repository) is one :class:`SyncFileError` naming the entry.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import yaml

from passthrough.config import Settings
from passthrough.oci.platforms import Platform
from passthrough.oci.reference import PATH_COMPONENT_RE, TAG_RE
from passthrough.registry.routing import is_hosted, looks_like_host, matches_pattern
from passthrough.sync.semver import Range, parse_range, parse_version

ENTRY_KEYS = ("upstream", "repository", "tags", "regex", "semver", "latest", "platforms")
_GLOB_CHARS = frozenset("*?[")
_TAG_CHARS_RE = re.compile(r"[A-Za-z0-9_.-]")


class SyncFileError(ValueError):
    """The sync file cannot be used: one line naming the entry and what is wrong."""


@dataclass(frozen=True)
class Entry:
    """One checked entry of the file."""

    number: int
    #: The UPSTREAMS alias or registry host; None for REGISTRY_URL.
    upstream: str | None
    repository: str
    exact_tags: tuple[str, ...] = ()
    tag_globs: tuple[re.Pattern[str], ...] = ()
    regex: re.Pattern[str] | None = None
    semver: Range | None = None
    latest: int | None = None
    #: None: every platform of an index.
    platforms: tuple[Platform, ...] | None = None

    @property
    def label(self) -> str:
        where = f"{self.upstream}/" if self.upstream else ""
        return f"entry {self.number} ({where}{self.repository})"

    @property
    def repository_is_glob(self) -> bool:
        return "*" in self.repository

    @property
    def needs_tag_list(self) -> bool:
        return bool(self.tag_globs or self.regex or self.semver)

    def matches_repository(self, name: str) -> bool:
        return matches_pattern(self.repository, name)

    def select(self, available: Iterable[str]) -> list[str]:
        """The tags this entry picks among ``available`` (the upstream's tag list), in
        order: the exact ones, then the matches (the highest version first)."""
        matched = sorted({t for t in available if self._matches(t)} - set(self.exact_tags))
        if self.latest is not None:
            versions = [(parse_version(t), t) for t in matched]
            ranked = sorted(((v, t) for v, t in versions if v is not None), reverse=True)
            matched = [t for _, t in ranked[: self.latest]]
        return [*self.exact_tags, *matched]

    def _matches(self, tag: str) -> bool:
        if any(glob.fullmatch(tag) for glob in self.tag_globs):
            return True
        if self.regex is not None and self.regex.search(tag):
            return True
        return self.semver is not None and self.semver.matches_tag(tag)


@dataclass(frozen=True)
class SyncFile:
    source: str
    entries: tuple[Entry, ...]


def load_sync_file(path: str, settings: Settings) -> SyncFile:
    """Read and check the file at ``path``; SyncFileError for anything wrong."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise SyncFileError(f"cannot read the sync file {path}: {exc.strerror or exc}") from None
    return parse_sync_file(text, settings, path)


def parse_sync_file(text: str, settings: Settings, source: str = "SYNC_FILE") -> SyncFile:
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise SyncFileError(f"{source}: not valid YAML{where}") from None
    if not isinstance(document, dict) or set(document) != {"images"}:
        raise SyncFileError(f"{source}: the file must be a mapping with one key, images")
    images = document["images"]
    if not isinstance(images, list) or not images:
        raise SyncFileError(f"{source}: images must be a non-empty list of entries")
    entries = tuple(_entry(number, raw, settings, source) for number, raw in enumerate(images, 1))
    return SyncFile(source, entries)


def _entry(number: int, raw: Any, settings: Settings, source: str) -> Entry:
    if not isinstance(raw, dict):
        raise SyncFileError(f"{source}: entry {number} is not a mapping")
    repository = raw.get("repository")
    label = f"{source}: entry {number}" + (
        f" ({repository})" if isinstance(repository, str) else ""
    )

    def fail(reason: str) -> SyncFileError:
        return SyncFileError(f"{label}: {reason}")

    unknown = sorted(str(k) for k in raw if k not in ENTRY_KEYS)
    if unknown:
        raise fail(f"unknown key {unknown[0]!r} (known: {', '.join(ENTRY_KEYS)})")
    if not isinstance(repository, str) or not repository:
        raise fail("repository is missing")
    _check_repository(repository, fail)
    upstream = _upstream(raw.get("upstream"), settings, fail)
    name = f"{upstream}/{repository}" if upstream else repository
    if "*" not in repository and is_hosted(settings, name):
        raise fail(f"{name} is a hosted repository (HOSTED_REPOSITORIES): sync fills the cache")
    exact, globs = _tags(raw.get("tags"), fail)
    regex = _regex(raw.get("regex"), fail)
    semver = _semver(raw.get("semver"), fail)
    latest = raw.get("latest")
    if latest is not None and (
        not isinstance(latest, int) or isinstance(latest, bool) or latest < 1
    ):
        raise fail("latest must be a whole number of 1 or more")
    if not (exact or globs or regex or semver):
        raise fail("name the tags: tags, regex or semver")
    platforms = _platforms(raw.get("platforms"), fail)
    return Entry(number, upstream, repository, exact, globs, regex, semver, latest, platforms)


def _check_repository(repository: str, fail: Any) -> None:
    for component in repository.split("/"):
        if component == "**":
            continue
        if not PATH_COMPONENT_RE.fullmatch(component.replace("*", "a")):
            raise fail(
                f"bad repository {repository!r}: lowercase path components, "
                "with * (part of one) and ** (any depth) as globs"
            )


def _upstream(value: Any, settings: Settings, fail: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise fail("upstream must be an UPSTREAMS alias or a registry host")
    if value in dict(settings.upstreams) or looks_like_host(value):
        return value
    aliases = ", ".join(alias for alias, _ in settings.upstreams) or "none"
    raise fail(f"unknown upstream alias {value!r} (UPSTREAMS has: {aliases})")


def _tags(value: Any, fail: Any) -> tuple[tuple[str, ...], tuple[re.Pattern[str], ...]]:
    if value is None:
        return (), ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, str | int | float) for t in value):
        raise fail("tags must be a list of tags and globs")
    exact: list[str] = []
    globs: list[re.Pattern[str]] = []
    for item in value:
        tag = str(item)
        if _GLOB_CHARS & set(tag):
            globs.append(glob_regex(tag, fail))
        elif TAG_RE.fullmatch(tag):
            exact.append(tag)
        else:
            raise fail(f"bad tag {tag!r}: letters, digits, _ . - (and * ? [..] in globs)")
    return tuple(dict.fromkeys(exact)), tuple(globs)


def glob_regex(glob: str, fail: Any) -> re.Pattern[str]:
    """A tag glob as a regex: ``*`` any run, ``?`` one character, ``[a-z]`` and
    ``[!a-z]`` classes of tag characters; anything else is refused."""
    out: list[str] = []
    index = 0
    while index < len(glob):
        char = glob[index]
        if char == "*":
            out.append(".*")
        elif char == "?":
            out.append(".")
        elif char == "[":
            end = glob.find("]", index + 2)
            body = glob[index + 1 : end] if end > 0 else ""
            negate = body.startswith("!")
            members = body[1:] if negate else body
            if end < 0 or not members or not re.fullmatch(r"[A-Za-z0-9_.-]+", members):
                raise fail(f"bad glob {glob!r}: a [ class is unclosed or holds no tag characters")
            out.append("[" + ("^" if negate else "") + members.replace("\\", "") + "]")
            index = end
        elif _TAG_CHARS_RE.fullmatch(char):
            out.append(re.escape(char))
        else:
            raise fail(f"bad glob {glob!r}: {char!r} is no tag character")
        index += 1
    return re.compile("".join(out))


def _regex(value: Any, fail: Any) -> re.Pattern[str] | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise fail("regex must be a regular expression")
    try:
        return re.compile(value)
    except re.error as exc:
        raise fail(f"bad regex {value!r}: {exc}") from None


def _semver(value: Any, fail: Any) -> Range | None:
    if value is None:
        return None
    if not isinstance(value, str | int | float):
        raise fail("semver must be a range such as '>=1.25 <2'")
    try:
        return parse_range(str(value))
    except ValueError as exc:
        raise fail(f"bad semver: {exc}") from None


def _platforms(value: Any, fail: Any) -> tuple[Platform, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(p, str) for p in value):
        raise fail("platforms must be a list such as [linux/amd64, linux/arm64]")
    try:
        return tuple(Platform.parse(p) for p in value)
    except ValueError as exc:
        raise fail(f"bad platform: {exc}") from None
