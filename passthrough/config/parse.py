"""The value parsers of the settings table (:mod:`passthrough.config.table`): each turns
one variable's text into its value or raises :class:`ConfigError` naming the variable,
so a bad deployment stops at start-up instead of failing on the first download.

A parser is called as ``parse(variable, text)`` with the text stripped and never empty
(an unset or empty variable takes the table's default without a parser call). The
readers of the files some variables name (REGISTRY_AUTH_FILE, UPSTREAM_CA_FILE) and of
the environment itself (a `.env` file under the real environment) live here too.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from dotenv import dotenv_values

from passthrough.oci.endpoint import DOCKER_HUB_ALIASES, DOCKER_HUB_URL, RegistryEndpoint
from passthrough.oci.platforms import Platform
from passthrough.oci.reference import PATH_COMPONENT_RE

CLIENT_AUTH_MODES = ("optional", "required", "off")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")
OTLP_PROTOCOLS = ("grpc", "http/protobuf")
STORES = ("filesystem", "s3", "off")
PROXY_MODES = ("transparent", "authenticated")

_HOST_RE = re.compile(
    r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)(?::\d{1,5})?$"
)
_ALIAS_RE = re.compile(r"^[a-z0-9]+(?:[._-][a-z0-9]+)*$")

#: ``parse(variable, text)``: the value of a variable that is set.
Parser = Callable[[str, str], Any]


class ConfigError(ValueError):
    """Settings are missing or malformed; each problem names its variables. The
    message is every problem, joined by "; " (start-up stops with one line)."""

    def __init__(self, *problems: str) -> None:
        super().__init__("; ".join(problems))
        self.problems: tuple[str, ...] = problems


# -- plain values ----------------------------------------------------------------------------


def text(name: str, raw: str) -> str:
    """Any text, as given."""
    return raw


def number(minimum: float) -> Parser:
    def parse(name: str, raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {raw!r}") from None
        if value < minimum:
            raise ConfigError(f"{name} must be at least {minimum:g}, got {raw!r}")
        return value

    return parse


def integer(minimum: int, maximum: int | None = None) -> Parser:
    def parse(name: str, raw: str) -> int:
        if not re.fullmatch(r"\d+", raw):
            raise ConfigError(f"{name} must be a whole number, got {raw!r}")
        value = int(raw)
        if value < minimum:
            raise ConfigError(f"{name} must be at least {minimum}, got {raw!r}")
        if maximum is not None and value > maximum:
            raise ConfigError(f"{name} must be at most {maximum}, got {raw!r}")
        return value

    return parse


_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def size(name: str, raw: str) -> int:
    """A byte count: 1073741824, 500M, 20GiB, 1.5G (binary units)."""
    match = _SIZE_RE.match(raw)
    if not match:
        raise ConfigError(f"{name} must be a size such as 20G or 500MiB, got {raw!r}")
    unit = (match.group(2) or "").lower()[:1]
    value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise ConfigError(f"{name} must be more than zero")
    return value


def size_or_off(name: str, raw: str) -> int:
    """A size, or 0 for no limit at all."""
    return 0 if raw == "0" else size(name, raw)


@dataclass(frozen=True)
class RateCaps:
    """UPSTREAM_MAX_RATE: bytes per second read from upstreams by the whole pod (0: no
    cap) and, per ``UPSTREAMS`` alias (``default`` for REGISTRY_URL), a cap of its own."""

    pod: int = 0
    per_alias: tuple[tuple[str, int], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.pod or self.per_alias)


def rate_caps(name: str, raw: str) -> RateCaps:
    """``10M`` (the pod), ``10M,lab=2M`` (and the alias lab), ``lab=2M`` (lab alone); a
    rate is a size per second, binary units (``4M`` is 4 MiB/s); ``0`` is no cap."""
    pod = 0
    per_alias: dict[str, int] = {}
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        alias, equals, value = item.rpartition("=")
        alias = alias.strip().lower()
        shown = f"{name} ({alias})" if equals else name
        rate = size_or_off(shown, value.strip().removesuffix("/s"))
        if not equals:
            pod = rate
        elif not _ALIAS_RE.fullmatch(alias) or alias in per_alias:
            raise ConfigError(f"{name}: {alias!r} is not an alias given once (alias=rate)")
        elif rate:
            per_alias[alias] = rate
    return RateCaps(pod, tuple(per_alias.items()))


def boolean(name: str, raw: str) -> bool:
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def choice(options: tuple[str, ...], *, upper: bool = False, echo_raw: bool = False) -> Parser:
    """One of ``options``, compared lower-cased (upper-cased with ``upper``); the message
    shows the value compared, or the text as given with ``echo_raw``."""

    def parse(name: str, raw: str) -> str:
        value = raw.upper() if upper else raw.lower()
        if value not in options:
            shown = raw if echo_raw else value
            raise ConfigError(f"{name} must be one of {', '.join(options)}, got {shown!r}")
        return value

    return parse


# -- addresses -------------------------------------------------------------------------------


def normalize_registry(value: str, *, variable: str = "REGISTRY_URL") -> RegistryEndpoint:
    """Turn `docker.io`, `host:5000` or `http://host:5000/` into an endpoint.

    Every Docker Hub alias means the same registry; a value without a scheme is https.
    """
    raw = value.strip()
    if not raw:
        raise ConfigError(f"{variable} is empty")
    if "://" not in raw:
        raw = "https://" + raw
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"{variable} must use http or https, not {parts.scheme!r}")
    if parts.username or parts.password:
        raise ConfigError(f"{variable} must not carry credentials; use REGISTRY_USERNAME/PASSWORD")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"{variable} must be scheme://host[:port] with no path")
    host = parts.netloc.lower()
    if not _HOST_RE.match(host):
        raise ConfigError(f"{variable} has an invalid host {parts.netloc!r}")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"{variable} has an invalid port") from None
    if port == 0 or parts.netloc.endswith(":"):
        raise ConfigError(f"{variable} has an invalid port")
    if host in DOCKER_HUB_ALIASES:
        return RegistryEndpoint(DOCKER_HUB_URL, "docker.io")
    return RegistryEndpoint(f"{parts.scheme}://{host}", host)


def registry(name: str, raw: str) -> RegistryEndpoint:
    return normalize_registry(raw, variable=name)


def registry_name(name: str, raw: str) -> str:
    if not _HOST_RE.match(raw):
        raise ConfigError(f"{name} must be a host name such as registry.example.com:5000")
    return raw.lower()


def credential_user(name: str, raw: str) -> str:
    if ":" in raw:
        raise ConfigError(f"{name} must not contain ':'")
    return raw


def namespace(name: str, raw: str) -> str:
    value = raw.strip("/")
    if not all(PATH_COMPONENT_RE.fullmatch(c) for c in value.split("/")):
        raise ConfigError(f"{name} must be lowercase path components such as 'team' or 'org/team'")
    return value


def http_url(name: str, raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{name} must be an http(s) URL")
    return raw


def public_url(name: str, raw: str) -> str:
    """How clients reach the service: an http(s) URL, a path at most."""
    http_url(name, raw)
    parts = urlsplit(raw)
    if parts.query or parts.fragment or parts.username:
        raise ConfigError(f"{name} must be scheme://host[:port][/path], nothing more")
    return raw.rstrip("/")


def endpoint_url(name: str, raw: str) -> str:
    """An S3-compatible service: http(s)://host[:port], no credentials."""
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name} must be http(s)://host[:port], got {raw!r}")
    if parts.username or parts.password:
        raise ConfigError(f"{name} must not carry credentials; use AWS_ACCESS_KEY_ID")
    return raw.rstrip("/")


def redis_url(name: str, raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("redis", "rediss", "unix") or not (parts.hostname or parts.path):
        # The value may hold a password: never echo it.
        raise ConfigError(f"{name} must be redis://[:password@]host[:port][/db]")
    return raw


def s3_bucket(name: str, raw: str) -> str:
    if not re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", raw):
        raise ConfigError(f"{name} {raw!r} is not a valid bucket name")
    return raw


def s3_prefix(name: str, raw: str) -> str:
    if raw.startswith("/") or ".." in raw.split("/"):
        raise ConfigError(f"{name} {raw!r} must be a relative key prefix")
    return raw if raw.endswith("/") else raw + "/"


def secret_key(name: str, raw: str) -> str:
    if len(raw) < 16:
        raise ConfigError(f"{name} must be at least 16 characters")
    return raw


def platform(name: str, raw: str) -> str:
    try:
        return str(Platform.parse(raw))
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def tls_names(name: str, raw: str) -> tuple[str, ...]:
    """Host names and addresses, comma- or space-separated, lower-cased."""
    names = tuple(n.strip().lower() for n in raw.replace(" ", ",").split(",") if n.strip())
    for tls_name in names:
        if not re.fullmatch(r"[a-z0-9.*:-]+", tls_name):
            raise ConfigError(f"{name} has an invalid name {tls_name!r}")
    return names or ("localhost", "127.0.0.1")


# -- paths -----------------------------------------------------------------------------------


def directory(name: str, raw: str) -> str:
    """A directory that exists."""
    if not os.path.isdir(raw):
        raise ConfigError(f"{name} {raw!r} is not a directory")
    return raw


def writable_directory(name: str, raw: str) -> str:
    """A directory, created if missing, that this process can write to."""
    try:
        os.makedirs(raw, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{name} {raw!r} cannot be created: {exc.strerror}") from None
    if not os.access(raw, os.W_OK):
        raise ConfigError(f"{name} {raw!r} is not writable")
    return raw


def existing_file(name: str, raw: str) -> str:
    if not os.path.isfile(raw):
        raise ConfigError(f"{name} {raw!r} is not a file")
    return raw


def ca_file(name: str, raw: str) -> str:
    """A PEM file of CA certificates, checked loadable; the value is its path."""
    read_ca_file(raw, name)
    return raw


def auth_file(name: str, raw: str) -> dict[str, tuple[str, str]]:
    """The credentials of a docker config.json, by host."""
    return read_auth_file(raw)


# -- lists -----------------------------------------------------------------------------------


def parse_allowlist(text: str | None) -> tuple[str, ...]:
    """Comma- or space-separated host patterns, lower-cased."""
    if not text:
        return ()
    return tuple(p.strip().lower() for p in text.replace(",", " ").split() if p.strip())


def allowlist(name: str, raw: str) -> tuple[str, ...]:
    patterns = parse_allowlist(raw)
    for pattern in patterns:
        if not re.fullmatch(r"[a-z0-9.*?\[\]:-]+", pattern):
            raise ConfigError(f"{name} has an invalid host pattern {pattern!r}")
    return patterns


def offline_upstreams(name: str, raw: str) -> tuple[str, ...]:
    """OFFLINE_UPSTREAMS: aliases, ``default`` or registry hosts (``host[:port]``)."""
    names = parse_allowlist(raw)
    for entry in names:
        if not re.fullmatch(r"[a-z0-9.-]+(:[0-9]+)?", entry):
            raise ConfigError(
                f"{name}: {entry!r} is neither an UPSTREAMS alias, default, nor a registry host"
            )
    return names


def parse_networks(text: str | None, name: str = "TRUSTED_PROXIES") -> tuple[str, ...]:
    """Comma- or space-separated addresses and CIDR networks, normalised
    (``10.0.0.0/8``, ``fd00::/8``, ``192.0.2.7`` → ``192.0.2.7/32``)."""
    networks: list[str] = []
    for item in (text or "").replace(",", " ").split():
        try:
            networks.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise ConfigError(f"{name} has {item!r}, which is not an address or network") from None
    return tuple(networks)


def networks(name: str, raw: str) -> tuple[str, ...]:
    return parse_networks(raw, name)


def upstreams(name: str, raw: str) -> tuple[tuple[str, RegistryEndpoint], ...]:
    return parse_upstreams(raw)


def hosted_patterns(name: str, raw: str) -> tuple[str, ...]:
    return parse_hosted_patterns(raw)


def parse_upstreams(text: str | None) -> tuple[tuple[str, RegistryEndpoint], ...]:
    """UPSTREAMS: ``alias=url`` pairs, comma-separated (``hub=https://registry-1.docker.io,
    lab=http://10.1.2.3:5000``)."""
    found: list[tuple[str, RegistryEndpoint]] = []
    seen: set[str] = set()
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        alias, equals, url = item.partition("=")
        alias = alias.strip().lower()
        if not equals or not url.strip():
            raise ConfigError(f"UPSTREAMS: {item!r} is not alias=url")
        if not _ALIAS_RE.fullmatch(alias) or alias == "v2":
            raise ConfigError(
                f"UPSTREAMS: alias {alias!r} must be a lowercase name such as hub or ghcr"
            )
        if alias in seen:
            raise ConfigError(f"UPSTREAMS: alias {alias!r} is given twice")
        seen.add(alias)
        found.append((alias, normalize_registry(url, variable=f"UPSTREAMS ({alias})")))
    return tuple(found)


_PATTERN_COMPONENT_RE = re.compile(r"^(?:\*\*|\*|[a-z0-9*]+(?:(?:[._]|__|[-]+)[a-z0-9*]+)*)$")


def parse_hosted_patterns(text: str | None) -> tuple[str, ...]:
    """HOSTED_REPOSITORIES: comma-separated globs over repository names, ``*`` one path
    component (or part of one), ``**`` any number of components (``team/*``,
    ``apps/**``)."""
    patterns: list[str] = []
    for item in (text or "").replace(" ", ",").split(","):
        pattern = item.strip().strip("/")
        if not pattern:
            continue
        components = pattern.split("/")
        if not all(_PATTERN_COMPONENT_RE.fullmatch(c) for c in components):
            raise ConfigError(
                f"HOSTED_REPOSITORIES: {pattern!r} is not a pattern such as team/* or apps/**"
            )
        patterns.append(pattern)
    return tuple(patterns)


def auth_file_host(key: str) -> str:
    """A config.json ``auths`` key as a host: ``https://index.docker.io/v1/`` and every
    Docker Hub alias mean docker.io."""
    text = key.strip().lower()
    if "://" in text:
        text = urlsplit(text).netloc
    text = text.split("/", 1)[0]
    return "docker.io" if text in DOCKER_HUB_ALIASES else text


def read_auth_file(path: str) -> dict[str, tuple[str, str]]:
    """REGISTRY_AUTH_FILE in the docker ``config.json`` / podman ``auth.json`` format:
    ``{"auths": {"ghcr.io": {"auth": "<base64 user:password>"}}}`` (or ``username`` and
    ``password``). Errors name the file and the entry, never a secret."""
    import base64
    import binascii
    import json

    try:
        with open(path, encoding="utf-8") as handle:
            document = json.load(handle)
    except OSError as exc:
        raise ConfigError(f"REGISTRY_AUTH_FILE {path!r} cannot be read: {exc.strerror}") from None
    except ValueError:
        raise ConfigError(f"REGISTRY_AUTH_FILE {path!r} is not JSON") from None
    auths = document.get("auths") if isinstance(document, dict) else None
    if not isinstance(auths, dict):
        raise ConfigError(f'REGISTRY_AUTH_FILE {path!r} has no "auths" object')
    found: dict[str, tuple[str, str]] = {}
    for key, entry in auths.items():
        host = auth_file_host(str(key))
        if not isinstance(entry, dict) or not _HOST_RE.match(host):
            raise ConfigError(f"REGISTRY_AUTH_FILE: the entry {str(key)[:80]!r} is malformed")
        username, password = entry.get("username"), entry.get("password")
        if isinstance(entry.get("auth"), str) and entry["auth"]:
            try:
                decoded = base64.b64decode(entry["auth"], validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                raise ConfigError(
                    f"REGISTRY_AUTH_FILE: the auth of {host!r} is not base64 of user:password"
                ) from None
            username, _, password = decoded.partition(":")
        if not isinstance(username, str) or not isinstance(password, str) or not username:
            raise ConfigError(f"REGISTRY_AUTH_FILE: the entry for {host!r} has no credentials")
        found[host] = (username, password)
    return found


#: One PEM certificate block; anything else in a CA file (comments, keys) is ignored.
_PEM_CERTIFICATE_RE = re.compile(
    r"-----BEGIN CERTIFICATE-----\r?\n[A-Za-z0-9+/=\r\n]+?-----END CERTIFICATE-----"
)


def read_ca_file(path: str, variable: str = "UPSTREAM_CA_FILE") -> str:
    """The PEM certificates of a CA file, one block a line apart, checked loadable by
    OpenSSL (what verification will use) so a bad file stops start-up, not every pull."""
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            # A CA file is a few KiB; a path to something huge is not read whole.
            text = handle.read(16 << 20)
    except OSError as exc:
        raise ConfigError(f"{variable} {path!r} cannot be read: {exc.strerror}") from None
    blocks = _PEM_CERTIFICATE_RE.findall(text)
    if not blocks:
        raise ConfigError(f"{variable} {path!r} holds no PEM certificate")
    pem = "\n".join(block.replace("\r\n", "\n") for block in blocks) + "\n"
    try:
        # A bare context: only these certificates are parsed, not the system's.
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=pem)
    except (ssl.SSLError, ValueError):
        raise ConfigError(f"{variable} {path!r} holds a malformed certificate") from None
    return pem


def read_environment(
    environ: Mapping[str, str] | None = None, env_file: str | None = None
) -> dict[str, str]:
    """The effective variables: a `.env` file (ENV_FILE, default ./.env) under the real
    environment, which wins."""
    real = dict(os.environ if environ is None else environ)
    path = env_file or real.get("ENV_FILE") or ".env"
    merged: dict[str, str] = {}
    if os.path.isfile(path):
        merged.update({k: v for k, v in dotenv_values(path).items() if v is not None})
    merged.update(real)
    return merged
