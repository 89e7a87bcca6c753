"""The lock files (requirements/*.txt, made by requirements/refresh.sh) agree with
setup.cfg and pyproject.toml: every declared requirement is pinned with == in the right
lock, at a version the declared specifier allows, every pin carries a hash, and the two
locks pin a shared package at the same version. Reads files only."""

from __future__ import annotations

import configparser
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
RUNTIME = REPO / "requirements" / "runtime.txt"
TEST = REPO / "requirements" / "test.txt"
REFRESH = "bash requirements/refresh.sh"


@dataclass(frozen=True)
class Pin:
    name: str
    version: str
    hashes: tuple[str, ...]
    line: str


def _cfg_requirements(value: str) -> list[Requirement]:
    """A setup.cfg list value: one requirement a line; blank and # lines skipped."""
    lines = (line.strip() for line in value.splitlines())
    return [Requirement(line) for line in lines if line and not line.startswith("#")]


def _declared() -> tuple[list[Requirement], list[Requirement], list[Requirement]]:
    """(install_requires, the test extra, build-system requires)."""
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(REPO / "setup.cfg", encoding="utf-8")
    runtime = _cfg_requirements(cfg["options"]["install_requires"])
    test = _cfg_requirements(cfg["options.extras_require"]["test"])
    with (REPO / "pyproject.toml").open("rb") as f:
        build = [Requirement(r) for r in tomllib.load(f)["build-system"]["requires"]]
    return runtime, test, build


def _logical_lines(text: str) -> list[str]:
    """The requirement lines of a pip requirements file: comments dropped, `\\`
    continuations joined."""
    out: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            current += line[:-1].strip() + " "
            continue
        current += line
        out.append(current.strip())
        current = ""
    if current.strip():
        out.append(current.strip())
    return out


def _pins(path: Path) -> dict[str, Pin]:
    pins: dict[str, Pin] = {}
    for line in _logical_lines(path.read_text(encoding="utf-8")):
        assert not line.startswith("-"), f"{path.name}: option line {line!r}"
        spec, *hashes = (part.strip() for part in line.split("--hash="))
        requirement = Requirement(spec)
        specifiers = list(requirement.specifier)
        assert len(specifiers) == 1 and specifiers[0].operator == "==", (
            f"{path.name}: {spec!r} is not pinned with =="
        )
        assert hashes, f"{path.name}: {requirement.name} has no --hash"
        assert all(h.startswith("sha256:") and len(h) == 71 for h in hashes), (
            f"{path.name}: {requirement.name}: malformed hash in {hashes}"
        )
        name = canonicalize_name(requirement.name)
        assert name not in pins, f"{path.name}: {name} pinned twice"
        pins[name] = Pin(name, specifiers[0].version, tuple(hashes), line)
    assert pins, f"{path.name}: no pins"
    return pins


def _check_declared(path: Path, declared: list[Requirement]) -> None:
    pins = _pins(path)
    for requirement in declared:
        name = canonicalize_name(requirement.name)
        assert name in pins, (
            f"{requirement} (declared) is not pinned in {path.name}: run {REFRESH}"
        )
        version = pins[name].version
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{path.name} pins {name}=={version}, which {requirement} does not allow: "
            f"run {REFRESH}"
        )


def test_runtime_lock_pins_install_requires_and_the_build_system() -> None:
    runtime, _, build = _declared()
    _check_declared(RUNTIME, runtime + build)


def test_test_lock_pins_install_requires_the_test_extra_and_the_build_system() -> None:
    runtime, test, build = _declared()
    _check_declared(TEST, runtime + test + build)


def test_the_locks_agree_on_every_shared_package() -> None:
    runtime, test = _pins(RUNTIME), _pins(TEST)
    # test.txt is the superset: runtime.txt is resolved under it as constraints.
    assert set(runtime) <= set(test), f"only in runtime.txt: {sorted(set(runtime) - set(test))}"
    differ = {n: (runtime[n].version, test[n].version) for n in runtime
              if runtime[n].version != test[n].version}
    assert not differ, f"runtime.txt vs test.txt versions: {differ}"


def test_the_runtime_lock_holds_no_test_tool() -> None:
    # A runtime.txt that pinned the test tools would put them in the image.
    runtime = _pins(RUNTIME)
    for name in ("pytest", "mypy", "ruff", "selenium", "hypothesis"):
        assert name not in runtime, f"{name} in runtime.txt"


def test_the_project_itself_is_not_in_a_lock() -> None:
    # It is installed from the checkout (`pip install --no-deps --no-build-isolation`).
    for path in (RUNTIME, TEST):
        assert "passthrough" not in _pins(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a==1 \\\n    --hash=sha256:" + "0" * 64 + "\n    # via b\n",
         ["a==1 --hash=sha256:" + "0" * 64]),
        ("# header\n\nb==2 ; sys_platform == 'win32' \\\n  --hash=x \\\n  --hash=y\n",
         ["b==2 ; sys_platform == 'win32' --hash=x --hash=y"]),
    ],
)
def test_logical_lines(text: str, expected: list[str]) -> None:
    assert _logical_lines(text) == expected
