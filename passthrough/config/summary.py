"""What is in force: the few lines the server logs once at start-up (and
``passthrough check-config`` prints) so an operator sees which registry, upstreams,
store and cap, /v2, hosted area, authentication and TLS the settings add up to.

Built from validated :class:`~passthrough.config.Settings` only, and never from a
secret: passwords, tokens, TOKEN_SECRET and REDIS_URL (which may carry a password) are
said to be set, never shown; URLs are shown without any user information.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from passthrough.config.table import Settings

_BINARY_UNITS = (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))


def summary_lines(settings: Settings) -> list[str]:
    """One line per concern: ``name: what is in force``."""
    return [
        f"registry: {_registry(settings)}",
        f"upstreams: {_upstreams(settings)}",
        f"store: {_store(settings)}",
        f"/v2: {_v2(settings)}",
        f"hosted: {_hosted(settings)}",
        f"auth: {_auth(settings)}",
        f"tls: {_tls(settings)}",
    ]


def summary(settings: Settings) -> str:
    """The start-up log record: a title line, then :func:`summary_lines` indented."""
    return "\n".join(
        ["passthrough settings in force:", *(f"  {s}" for s in summary_lines(settings))]
    )


def without_userinfo(url: str) -> str:
    """``url`` with any ``user:password@`` removed."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def size_text(size: int) -> str:
    """A byte count in the largest binary unit that divides it (``20 GiB``)."""
    for unit, factor in _BINARY_UNITS:
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} bytes"


def _registry(settings: Settings) -> str:
    if settings.has_env_credentials:
        identity = "the REGISTRY_USERNAME user"
    elif settings.bearer_token:
        identity = "REGISTRY_BEARER_TOKEN"
    else:
        identity = "anonymous"
    return (
        f"{without_userinfo(settings.registry.url)} ({settings.registry.name}) as {identity}; "
        f"client credentials {settings.client_auth}"
    )


def _upstreams(settings: Settings) -> str:
    aliases = [f"{alias}={without_userinfo(e.url)}" for alias, e in settings.upstreams]
    hosts = len(settings.upstream_credentials)
    credentials = f"; REGISTRY_AUTH_FILE for {hosts} host(s)" if hosts else ""
    allowed = ",".join(settings.registry_allowlist) or "any host"
    return f"{', '.join(aliases) or 'no aliases'}; allowed: {allowed}{credentials}"


def _store(settings: Settings) -> str:
    cap = size_text(settings.cache_max_bytes) if settings.cache_max_bytes else "no cap"
    if settings.store == "s3":
        endpoint = without_userinfo(settings.s3_endpoint_url or "AWS")
        prefix = f"/{settings.s3_prefix}" if settings.s3_prefix else ""
        return f"s3 {settings.s3_bucket}{prefix} at {endpoint}, {cap}{_locks(settings)}"
    if settings.store == "off":
        return "off (STORE=off: every download from upstream, no /v2 below /v2/, no hosted area)"
    return f"filesystem {settings.cache_dir}, {cap}{_locks(settings)}"


def _locks(settings: Settings) -> str:
    return "; cross-replica locks in Redis" if settings.redis_url else ""


def _v2(settings: Settings) -> str:
    if settings.store == "off":
        return "off (needs the store)"
    stale = "serves stale tags" if settings.proxy_serve_stale else "never stale"
    return f"on, {settings.proxy_mode} mode, tag TTL {settings.tag_ttl:g}s, {stale}"


def _hosted(settings: Settings) -> str:
    if not settings.hosted_repositories:
        return "none (HOSTED_REPOSITORIES unset)"
    pull = "anonymous pull" if settings.hosted_anonymous_pull else "pull needs a login"
    return f"{','.join(settings.hosted_repositories)}, {pull}"


def _auth(settings: Settings) -> str:
    if not settings.auth_enabled:
        return "off (anyone may pull)"
    parts = [f"tokens for {without_userinfo(settings.public_url or '?')}"]
    if settings.htpasswd_file:
        parts.append(f"users from {settings.htpasswd_file}")
    if settings.access_file:
        parts.append(f"rules from {settings.access_file}")
    if settings.uses_client_identity:
        parts.append("each client's own identity upstream")
    return ", ".join(parts)


def _tls(settings: Settings) -> str:
    if settings.tls_cert_file:
        return f"certificate {settings.tls_cert_file}"
    if settings.tls_self_signed:
        return f"self-signed for {','.join(settings.tls_names)} (CA at /ca.crt)"
    return "off (plain HTTP)"
