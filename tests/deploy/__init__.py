"""Static checks of the deployment files (Dockerfile, compose.yaml, Helm chart).

Shared facts for the three test modules: where the repository is, which environment
variables a deployment must expose, and what the application itself reads.
"""

from __future__ import annotations

import re
from pathlib import Path

from passthrough.config import VARIABLES, ServerSettings

REPO = Path(__file__).resolve().parents[2]

# Every setting a deployment exposes: the settings table's variables the Helm chart sets
# from values.yaml (.env.example documents every declared one).
ENV_VARS: tuple[str, ...] = tuple(v.name for v in VARIABLES if v.not_in_chart is None)

# Credentials: only ever from a Secret in Kubernetes, never a literal value.
SECRET_VARS: tuple[str, ...] = ("REGISTRY_USERNAME", "REGISTRY_PASSWORD", "REGISTRY_BEARER_TOKEN")

# The S3 store's access keys: from an existing Secret (or the AWS chain: instance role,
# IRSA), never a literal value. REDIS_URL comes from a Secret when it holds a password.
S3_SECRET_VARS: tuple[str, ...] = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")

# The /v2 API's token key: from a Secret in Kubernetes (given, existing or generated),
# never a literal value anywhere.
V2_SECRET_VARS: tuple[str, ...] = ("TOKEN_SECRET",)

# Aliases the application accepts for a variable above; documented next to it.
ALIASES: dict[str, str] = {alias: v.name for v in VARIABLES for alias in v.aliases}

# Names the code reads: `os.environ.get("X")`, `os.getenv("X")`, `os.environ["X"]`,
# `env.get("X")` and the config helpers' `(env, "X", ...)`.
_ENV_READ = re.compile(
    r"""(?:(?:environ|env)\.get\(|getenv\(|environ\[|\(\s*env\s*,\s*)\s*["']([A-Z][A-Z0-9_]+)["']"""
)


def env_vars_read_by_app() -> set[str]:
    """Environment variables the service reads: every one its settings table declares,
    and the names its code (the package and gunicorn.conf.py) reads directly."""
    sources = [REPO / "gunicorn.conf.py", *sorted((REPO / "passthrough").rglob("*.py"))]
    names = {v.name for v in VARIABLES}
    for source in sources:
        names.update(_ENV_READ.findall(source.read_text(encoding="utf-8")))
    return names


def graceful_timeout_default() -> int:
    """gunicorn's graceful_timeout when GRACEFUL_TIMEOUT is unset (the table's default)."""
    return ServerSettings().graceful_timeout


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex over slash-separated paths (Go filepath.Match
    plus `**`, as Docker uses it)."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 1 :]:
            end = pattern.index("]", i + 1)
            body = pattern[i + 1 : end]
            out.append("[" + ("^" + body[1:] if body.startswith(("!", "^")) else body) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """(is_exception, regex) for each rule of .dockerignore, in order."""
    rules: list[tuple[bool, re.Pattern[str]]] = []
    for raw in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = line.removeprefix("!").strip().strip("/")
        rules.append((exception, _glob_regex(pattern)))
    return rules


def is_dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps a repository-relative path out of the build context.

    A rule matches a path when it matches the path or one of its parent directories; the
    last matching rule wins, so a `!` exception can bring a path back.
    """
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for exception, regex in dockerignore_rules():
        if any(regex.match(candidate) for candidate in candidates):
            ignored = not exception
    return ignored
