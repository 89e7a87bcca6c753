"""Static checks of the deployment files (Dockerfile, compose.yaml, Helm chart).

Shared facts for the three test modules: where the repository is, which environment
variables a deployment must expose, and what the application itself reads.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Every setting a deployment exposes: .env.example documents each one and the Helm
# chart can set each one from values.yaml.
ENV_VARS: tuple[str, ...] = (
    "REGISTRY_URL",
    "REGISTRY_AUTH_URL",
    "REGISTRY_SERVICE",
    "REGISTRY_NAME",
    "REGISTRY_USERNAME",
    "REGISTRY_PASSWORD",
    "REGISTRY_BEARER_TOKEN",
    "REGISTRY_CLIENT_AUTH",
    "REGISTRY_DEFAULT_NAMESPACE",
    "REGISTRY_ALLOWLIST",
    "REGISTRY_ALLOW_LINK_LOCAL",
    "LOG_LEVEL",
    "LOG_FORMAT",
    "UPSTREAM_CONNECT_TIMEOUT",
    "UPSTREAM_READ_TIMEOUT",
    "LAYER_CONCURRENCY",
    "UPSTREAM_RETRIES",
    "UPSTREAM_RETRY_AFTER_MAX",
    "DOWNLOAD_DEADLINE",
    "TEMP_DIR",
    "CACHE_DIR",
    "CACHE_MAX_BYTES",
    "STORE",
    "S3_BUCKET",
    "S3_PREFIX",
    "S3_ENDPOINT_URL",
    "S3_LIFECYCLE_DAYS",
    "AWS_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "REDIS_URL",
    "REDIS_LOCK_LEASE",
    "MAX_IMAGE_BYTES",
    "MAX_LAYERS",
    "MAX_CONCURRENT_DOWNLOADS",
    "CLIENT_IDLE_TIMEOUT",
    "DEFAULT_PLATFORM",
    "SERVE_STALE",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_SERVICE_NAME",
    "WEB_CONCURRENCY",
    "GUNICORN_THREADS",
    "GRACEFUL_TIMEOUT",
    "BIND",
    "PORT",
    "UPSTREAMS",
    "REGISTRY_AUTH_FILE",
    "PROXY_MODE",
    "PUBLIC_URL",
    "TOKEN_SECRET",
    "TOKEN_TTL",
    "TAG_TTL",
    "PROXY_SERVE_STALE",
    "S3_REDIRECT",
    "TLS_CERT_FILE",
    "TLS_KEY_FILE",
    "TLS_SELF_SIGNED",
    "TLS_NAMES",
    "HOSTED_REPOSITORIES",
    "HTPASSWD_FILE",
    "ACCESS_FILE",
    "HOSTED_ANONYMOUS_PULL",
    "HOSTED_MANIFEST_MAX_BYTES",
    "TRUSTED_PROXIES",
    "UPSTREAM_CA_FILE",
)

# Credentials: only ever from a Secret in Kubernetes, never a literal value.
SECRET_VARS: tuple[str, ...] = ("REGISTRY_USERNAME", "REGISTRY_PASSWORD", "REGISTRY_BEARER_TOKEN")

# The S3 store's access keys: from an existing Secret (or the AWS chain: instance role,
# IRSA), never a literal value. REDIS_URL comes from a Secret when it holds a password.
S3_SECRET_VARS: tuple[str, ...] = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")

# The /v2 API's token key: from a Secret in Kubernetes (given, existing or generated),
# never a literal value anywhere.
V2_SECRET_VARS: tuple[str, ...] = ("TOKEN_SECRET",)

# Aliases the application accepts for a variable above; documented next to it.
ALIASES: dict[str, str] = {"REGISTRY_TOKEN": "REGISTRY_BEARER_TOKEN"}

# Names the code reads: `os.environ.get("X")`, `os.getenv("X")`, `os.environ["X"]`,
# `env.get("X")` and the config helpers' `(env, "X", ...)`.
_ENV_READ = re.compile(
    r"""(?:(?:environ|env)\.get\(|getenv\(|environ\[|\(\s*env\s*,\s*)\s*["']([A-Z][A-Z0-9_]+)["']"""
)


def env_vars_read_by_app() -> set[str]:
    """Environment variables the service's own code reads (the package and gunicorn.conf.py)."""
    sources = [REPO / "gunicorn.conf.py", *sorted((REPO / "passthrough").rglob("*.py"))]
    names: set[str] = set()
    for source in sources:
        names.update(_ENV_READ.findall(source.read_text(encoding="utf-8")))
    return names


def graceful_timeout_default() -> int:
    """gunicorn's graceful_timeout when GRACEFUL_TIMEOUT is unset, read from gunicorn.conf.py:
    the constant default of the `os.environ.get(...)` call assigned to `graceful_timeout`."""
    tree = ast.parse((REPO / "gunicorn.conf.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "graceful_timeout" for t in node.targets
        ):
            defaults = [
                str(call.args[1].value)
                for call in ast.walk(node.value)
                if isinstance(call, ast.Call)
                and len(call.args) == 2
                and isinstance(call.args[1], ast.Constant)
            ]
            if defaults:
                return int(defaults[0])
            if isinstance(node.value, ast.Constant):
                return int(str(node.value.value))
    raise AssertionError("gunicorn.conf.py assigns no readable graceful_timeout")


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
