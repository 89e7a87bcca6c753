"""The Dockerfile, checked statically: no base image can be pulled here, so the file is
parsed (a deliberately small parser) and its promises are asserted one by one."""

from __future__ import annotations

import configparser
import json
import posixpath
import re
import shlex
from dataclasses import dataclass, field

import pytest

from passthrough.config import ServerSettings
from tests.deploy import REPO, is_dockerignored

DOCKERFILE = REPO / "Dockerfile"
SLIM_PYTHON = re.compile(r"python:3\.1[12]-slim(?:-[a-z]+)?")


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case, e.g. "COPY"
    args: str  # everything after the keyword, continuation lines joined
    line: int  # where the instruction starts


@dataclass
class Stage:
    base: str  # the FROM image, build args expanded
    name: str | None
    from_flags: list[str]
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse(text: str) -> list[Instruction]:
    """Instructions of a Dockerfile: `\\` continues a line, `#` lines are comments (also
    inside a continued instruction, as Docker treats them)."""
    instructions: list[Instruction] = []
    pending = ""
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def expand(value: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m[1] or m[2], m[0]), value)


def stages(instructions: list[Instruction]) -> list[Stage]:
    """Split into build stages; ARGs declared before the first FROM expand in FROM lines."""
    global_args: dict[str, str] = {}
    result: list[Stage] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            words = ins.args.split()
            flags = [w for w in words if w.startswith("--")]
            rest = [w for w in words if not w.startswith("--")]
            name = rest[2] if len(rest) == 3 and rest[1].upper() == "AS" else None
            result.append(Stage(expand(rest[0], global_args), name, flags))
        elif not result:
            assert ins.keyword == "ARG", f"line {ins.line}: only ARG may precede FROM"
            key, _, default = ins.args.partition("=")
            global_args[key.strip()] = default.strip()
        else:
            result[-1].instructions.append(ins)
    return result


def exec_form(args: str) -> list[str] | None:
    """The JSON array of an exec-form instruction, or None for shell form."""
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        return None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in stage.all("ENV"):
        words = shlex.split(ins.args)
        if "=" not in words[0]:  # legacy `ENV KEY value`
            env[words[0]] = " ".join(words[1:])
            continue
        for word in words:
            key, _, value = word.partition("=")
            env[key] = expand(value, env)
    return env


def copy_args(ins: Instruction) -> tuple[list[str], list[str], str]:
    """(flags, sources, destination) of a COPY or ADD."""
    words = exec_form(ins.args) or shlex.split(ins.args)
    flags = [w for w in words if w.startswith("--")]
    paths = [w for w in words if not w.startswith("--")]
    return flags, paths[:-1], paths[-1]


@pytest.fixture(scope="module")
def dockerfile() -> list[Stage]:
    return stages(parse(DOCKERFILE.read_text(encoding="utf-8")))


@pytest.fixture(scope="module")
def runtime(dockerfile: list[Stage]) -> Stage:
    return dockerfile[-1]


def test_parser_joins_continuations_and_skips_comments() -> None:
    text = (
        "# syntax=docker/dockerfile:1\n"
        "ARG V=3.11\n"
        "FROM python:${V}-slim AS b\n"
        "RUN a \\\n"
        "    # a comment inside the continuation\n"
        "    && b\n"
        "\n"
        'CMD ["x", "y"]\n'
    )
    result = stages(parse(text))
    assert len(result) == 1
    assert (result[0].base, result[0].name) == ("python:3.11-slim", "b")
    assert [(i.keyword, i.args, i.line) for i in result[0].instructions] == [
        ("RUN", "a && b", 4),
        ("CMD", '["x", "y"]', 8),
    ]
    assert exec_form('["x", "y"]') == ["x", "y"]
    assert exec_form("x y") is None


def test_multi_stage_build_on_the_same_slim_python(dockerfile: list[Stage]) -> None:
    assert len(dockerfile) >= 2, "a builder stage and a runtime stage"
    builder, runtime = dockerfile[0], dockerfile[-1]
    assert builder.name == "builder"
    for stage in (builder, runtime):
        assert SLIM_PYTHON.fullmatch(stage.base), f"{stage.base} is not python:3.11/3.12-slim"
    # The venv's interpreter links to the base image's python: both must be the same.
    assert runtime.base == builder.base
    # Multi-arch: every stage builds for the target platform, none is pinned.
    assert not any(stage.from_flags for stage in dockerfile), "no --platform on FROM"


def test_builder_makes_a_venv_that_the_runtime_copies(dockerfile: list[Stage]) -> None:
    builder, runtime = dockerfile[0], dockerfile[-1]
    runs = " ".join(i.args for i in builder.all("RUN"))
    venv = re.search(r"python3? -m venv (\S+)", runs)
    assert venv, "the builder creates a virtualenv"
    assert "pip install" in runs
    copies = [copy_args(i) for i in runtime.all("COPY")]
    assert any(
        f"--from={builder.name}" in flags and sources == [venv[1]] and dest == venv[1]
        for flags, sources, dest in copies
    ), "the runtime copies the builder's venv to the same path"
    assert env_of(runtime)["PATH"].startswith(f"{venv[1]}/bin:")
    # Nothing is installed in the runtime stage: what runs is what the builder made.
    assert not any("pip install" in i.args for i in runtime.all("RUN"))


def test_runtime_environment(runtime: Stage) -> None:
    env = env_of(runtime)
    assert env.get("PYTHONUNBUFFERED") == "1"
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"


def test_the_store_is_on_a_volume_by_default(runtime: Stage) -> None:
    """The image runs the whole door: a filesystem store on a VOLUME the image's user
    owns (the service's own default, under the read-only WORKDIR, would not do)."""
    cache_dir = env_of(runtime).get("CACHE_DIR")
    assert cache_dir, "the image names its store directory"
    volumes = [v for ins in runtime.all("VOLUME") for v in exec_form(ins.args) or []]
    assert cache_dir in volumes, "the store's directory is a volume"
    made = " ".join(i.args for i in runtime.all("RUN"))
    assert f"chown 10001:10001 {cache_dir}" in made, "owned by the image's user"


def test_runs_as_a_numeric_non_root_user(runtime: Stage) -> None:
    users = runtime.all("USER")
    assert users, "the runtime stage sets USER"
    last = users[-1]
    match = re.fullmatch(r"(\d+)(?::(\d+))?", last.args)
    assert match, f"USER {last.args!r} must be numeric (runAsNonRoot cannot check names)"
    assert int(match[1]) != 0 and match[2] is not None and int(match[2]) != 0
    # Nothing after USER switches back or needs root.
    after = [i for i in runtime.instructions if i.line > last.line]
    assert not any(i.keyword in ("USER", "RUN") for i in after)


def test_exposes_the_port_gunicorn_binds(runtime: Stage) -> None:
    exposed = {p.split("/")[0] for i in runtime.all("EXPOSE") for p in i.args.split()}
    conf = (REPO / "gunicorn.conf.py").read_text(encoding="utf-8")
    assert re.search(r"^bind = \[_server\.bind\]$", conf, re.M), "gunicorn.conf.py binds BIND"
    default = ServerSettings()
    assert {default.bind.rpartition(":")[2]} == {str(default.port)} == {"8080"}
    # ...and the probe port (HEALTH_BIND), which gunicorn.conf.py binds as well.
    assert exposed == {"8080", str(default.health_port)} == {"8080", "8081"}


def test_healthcheck_runs_passthrough_healthcheck(runtime: Stage) -> None:
    checks = runtime.all("HEALTHCHECK")
    assert len(checks) == 1
    options, _, command = checks[0].args.partition("CMD ")
    assert all(o.startswith("--") for o in options.split())
    argv = exec_form(command.strip())
    assert argv is not None, "HEALTHCHECK CMD in exec form"
    assert argv[:2] == ["passthrough", "healthcheck"]
    # The command is the package's console script with that subcommand.
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    scripts = cfg["options.entry_points"]["console_scripts"]
    assert re.search(r"^passthrough\s*=", scripts, re.M)
    cli = (REPO / "passthrough" / "cli.py").read_text(encoding="utf-8")
    assert re.search(r"add_parser\(\s*[\"']healthcheck[\"']", cli)
    steps = " ".join(i.args for i in runtime.instructions)
    assert not re.search(r"\b(curl|wget)\b", steps), "the image has no curl; none is needed"


def test_cmd_starts_gunicorn_with_its_config_in_exec_form(runtime: Stage) -> None:
    cmds = runtime.all("CMD")
    assert cmds, "the runtime stage has a CMD"
    assert exec_form(cmds[-1].args) == ["gunicorn", "-c", "gunicorn.conf.py"]
    for entrypoint in runtime.all("ENTRYPOINT"):
        assert exec_form(entrypoint.args) is not None
    # gunicorn.conf.py is copied into the working directory the CMD runs in.
    workdir = runtime.all("WORKDIR")[-1].args
    copied = {
        (src, dest)
        for flags, sources, dest in map(copy_args, runtime.all("COPY"))
        for src in sources
        if not flags
    }
    targets = {
        posixpath.normpath(posixpath.join(workdir, dest))
        for src, dest in copied
        if src == "gunicorn.conf.py"
    }
    assert targets & {workdir, f"{workdir}/gunicorn.conf.py"}


def test_copy_sources_exist_and_are_in_the_build_context(dockerfile: list[Stage]) -> None:
    sources: list[str] = []
    for stage in dockerfile:
        assert not stage.all("ADD"), "COPY, not ADD: no remote downloads or auto-extraction"
        for ins in stage.all("COPY"):
            flags, paths, _ = copy_args(ins)
            if not any(f.startswith("--from=") for f in flags):
                sources.extend(paths)
    assert {"pyproject.toml", "setup.cfg", "passthrough", "gunicorn.conf.py"} <= set(sources)
    for source in sources:
        path = REPO / source
        assert path.exists(), f"COPY {source}: not in the repository"
        assert not is_dockerignored(source), f"COPY {source}: excluded by .dockerignore"
        files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
        files = [f for f in files if "__pycache__" not in f.parts and f.suffix != ".pyc"]
        assert files, f"COPY {source}: nothing to copy"
        for file in files:
            relative = file.relative_to(REPO).as_posix()
            assert not is_dockerignored(relative), f"{relative} is needed but dockerignored"


@pytest.mark.parametrize(
    "path",
    [
        ".git/HEAD",
        ".venv/bin/python",
        ".env",
        ".env.production",
        "tests/unit/test_config.py",
        "passthrough/__pycache__/cli.cpython-311.pyc",
        "passthrough/cli.pyc",
        ".mypy_cache/3.11/x.json",
        ".pytest_cache/v/cache/nodeids",
        ".ruff_cache/content",
        "benchmarks/run.py",
        "helm/passthrough/values.yaml",
        "passthrough.egg-info/PKG-INFO",
    ],
)
def test_dockerignore_excludes(path: str) -> None:
    assert is_dockerignored(path)


def test_dockerignore_matcher_follows_docker_rules() -> None:
    # Sanity of the matcher the tests above rely on.
    assert not is_dockerignored("passthrough/cli.py")
    assert not is_dockerignored("setup.cfg")
    assert is_dockerignored("passthrough/routes/__pycache__/x.pyc")  # **/ at any depth


def test_no_architecture_specific_steps(dockerfile: list[Stage]) -> None:
    for stage in dockerfile:
        for ins in stage.instructions:
            assert not re.search(r"amd64|x86_64|aarch64|arm64|armv7", ins.args, re.I), (
                f"line {ins.line}: architecture-specific {ins.keyword}"
            )
            assert "http://" not in ins.args and "https://" not in ins.args, (
                f"line {ins.line}: downloads outside pip"
            )
