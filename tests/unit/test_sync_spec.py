"""SYNC_FILE (passthrough.sync.spec): every mistake is one line naming the entry, and
each entry's tag selection (exact tags, globs, regex, semver, latest N)."""

from __future__ import annotations

from pathlib import Path

import pytest

from passthrough.config import Settings
from passthrough.config.parse import upstreams
from passthrough.oci.platforms import Platform
from passthrough.sync.spec import Entry, SyncFileError, load_sync_file, parse_sync_file

SETTINGS = Settings(
    upstreams=upstreams("UPSTREAMS", "lab=http://10.1.2.3:5000,ghcr=https://ghcr.io")
)

AVAILABLE = ["1.0", "1.1", "1.24.9", "1.25", "1.25.3", "1.26.1", "2.0", "2.1", "2.1-rc1",
             "2.x-beta", "latest", "nightly-2026-12-01"]  # fmt: skip


def entry(body: str) -> Entry:
    (found,) = parse_sync_file("images:\n" + body, SETTINGS).entries
    return found


def test_the_issue_example_parses_as_written() -> None:
    found = entry(
        """
  - upstream: lab
    repository: team/app
    tags: ["1.0", "2.*"]
    semver: ">=1.25 <2"
    latest: 3
    platforms: [linux/amd64, linux/arm64]
"""
    )
    assert found.upstream == "lab" and found.repository == "team/app"
    assert found.exact_tags == ("1.0",)
    assert found.platforms == (Platform("linux", "amd64"), Platform("linux", "arm64"))
    # 1.0 is exact: always kept. Of the matches (2.0, 2.1, 2.1-rc1, 2.x-beta by the glob;
    # 1.25, 1.25.3, 1.26.1 by the range) the three highest versions.
    assert found.select(AVAILABLE) == ["1.0", "2.1", "2.0", "1.26.1"]


def test_globs_regex_and_semver_add_up() -> None:
    found = entry(
        """
  - repository: app
    tags: ["1.?", "nightly-*"]
    regex: '^2\\.1(-rc[0-9]+)?$'
    semver: "~1.25"
"""
    )
    assert found.upstream is None
    assert found.select(AVAILABLE) == [
        "1.0", "1.1", "1.25", "1.25.3", "2.1", "2.1-rc1", "nightly-2026-12-01",
    ]  # fmt: skip


def test_a_glob_class_and_a_negated_one() -> None:
    assert entry('  - repository: app\n    tags: ["2.[01]"]\n').select(AVAILABLE) == ["2.0", "2.1"]
    negated = entry('  - repository: app\n    tags: ["1.[!0]"]\n')
    assert negated.select(AVAILABLE) == ["1.1"]


def test_latest_keeps_the_highest_versions_and_drops_what_is_no_version() -> None:
    found = entry('  - repository: app\n    tags: ["*"]\n    latest: 2\n')
    assert found.select(AVAILABLE) == ["2.1", "2.0"]
    assert entry('  - repository: app\n    semver: "<1.25"\n    latest: 10\n').select(
        AVAILABLE
    ) == ["1.24.9", "1.1", "1.0"]


def test_exact_tags_need_no_tag_list() -> None:
    found = entry('  - repository: app\n    tags: ["1.0", latest]\n')
    assert not found.needs_tag_list
    assert found.select([]) == ["1.0", "latest"]


def test_a_repository_glob_matches_one_component_per_star() -> None:
    found = entry('  - upstream: ghcr\n    repository: "team/*"\n    tags: [v1]\n')
    assert found.repository_is_glob
    names = ["team/app", "team/api", "team/deep/app", "other/app"]
    assert [n for n in names if found.matches_repository(n)] == ["team/app", "team/api"]
    deep = entry('  - repository: "team/**"\n    tags: [v1]\n')
    assert [n for n in names if deep.matches_repository(n)] == names[:3]


def test_a_registry_host_is_an_upstream_too() -> None:
    assert entry(
        "  - upstream: registry.example:5000\n    repository: a\n    tags: [v1]\n"
    ).upstream


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("  - repository: app\n    tag: [v1]\n", "entry 1 (app): unknown key 'tag'"),
        ("  - repository: app\n    tags: ['1.[0']\n", "entry 1 (app): bad glob '1.[0'"),
        ("  - repository: app\n    tags: ['1/*']\n", "entry 1 (app): bad glob '1/*'"),
        ("  - repository: app\n    tags: ['a b']\n", "entry 1 (app): bad tag 'a b'"),
        ("  - repository: app\n    regex: '(1'\n", "entry 1 (app): bad regex '(1'"),
        ("  - repository: app\n    semver: '>=1.x.y'\n", "entry 1 (app): bad semver"),
        ("  - repository: app\n    semver: '>=1'\n    latest: 0\n", "entry 1 (app): latest"),
        ("  - repository: app\n    semver: '>=1'\n    latest: yes\n", "entry 1 (app): latest"),
        (
            "  - upstream: nope\n    repository: app\n    tags: [v1]\n",
            "entry 1 (app): unknown upstream alias 'nope' (UPSTREAMS has: lab, ghcr)",
        ),
        ("  - repository: App\n    tags: [v1]\n", "entry 1 (App): bad repository"),
        ("  - repository: app\n", "entry 1 (app): name the tags"),
        ("  - tags: [v1]\n", "entry 1: repository is missing"),
        ("  - just-a-string\n", "entry 1 is not a mapping"),
        (
            "  - repository: app\n    tags: [v1]\n    platforms: [amd64]\n",
            "entry 1 (app): bad platform",
        ),
        (
            "  - repository: a\n    tags: [v1]\n  - repository: b\n    tags: ['[']\n",
            "entry 2 (b): bad glob",
        ),
    ],
)
def test_a_bad_entry_is_one_line_naming_it(body: str, message: str) -> None:
    with pytest.raises(SyncFileError) as caught:
        parse_sync_file("images:\n" + body, SETTINGS, "sync.yaml")
    text = str(caught.value)
    assert "\n" not in text
    assert text.startswith("sync.yaml: ")
    assert message in text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("images: [\n", "not valid YAML at line"),
        ("[]\n", "one key, images"),
        ("images: []\n", "non-empty list"),
        ("images:\n  - repository: a\n    tags: [v1]\nextra: 1\n", "one key, images"),
    ],
)
def test_a_bad_file_is_one_line(text: str, message: str) -> None:
    with pytest.raises(SyncFileError, match=message):
        parse_sync_file(text, SETTINGS, "sync.yaml")


def test_a_hosted_repository_is_no_entry() -> None:
    hosted = Settings(hosted_repositories=("team/*",))
    with pytest.raises(SyncFileError, match=r"entry 1 \(team/app\): team/app is a hosted"):
        parse_sync_file("images:\n  - repository: team/app\n    tags: [v1]\n", hosted)


def test_an_unreadable_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(SyncFileError, match=r"cannot read the sync file .*missing\.yaml"):
        load_sync_file(str(tmp_path / "missing.yaml"), SETTINGS)
