"""The `passthrough` console command: `healthcheck` for containers without curl,
`check-config` to validate the environment before a deploy, `gc` to remove what no
tag of the hosted area reaches (:mod:`passthrough.registry.gc`), `import` to put the
images of an archive into the hosted area (:mod:`passthrough.cli_import`), `sync` to
fill the store from SYNC_FILE (:mod:`passthrough.cli_sync`), and `export` to write
several images into one archive (:mod:`passthrough.cli_export`).

Each command checks the settings it uses: check-config all the server needs, gc the
content store's (it issues no token, so PUBLIC_URL and TOKEN_SECRET are not its
business), healthcheck only the port and whether the server speaks TLS."""

from __future__ import annotations

import argparse
import ssl
import sys
import urllib.request

from passthrough import cli_export, cli_sync

#: gc's --grace when none is given (a push takes far less; replicas without Redis rely on it).
GC_GRACE = "1h"


def tls_enabled(environ: dict[str, str] | None = None) -> bool:
    """Whether the local server speaks TLS (TLS_SELF_SIGNED, or TLS_CERT_FILE); read as
    the server reads them, the environment over .env."""
    from passthrough.config import read_environment, read_variable
    from passthrough.config.table import BY_NAME

    env = read_environment(environ)
    # Only whether a certificate is named: the server checks the file itself.
    return (
        bool(read_variable("TLS_SELF_SIGNED", env)) or BY_NAME["TLS_CERT_FILE"].raw(env) is not None
    )


def default_health_url(environ: dict[str, str] | None = None) -> str:
    """/health on the probe port (HEALTH_BIND), or on PORT when there is none."""
    from passthrough.config import load_server_settings

    server = load_server_settings(environ)
    scheme = "https" if tls_enabled(environ) else "http"
    return f"{scheme}://127.0.0.1:{server.health_port or server.port}/health"


def healthcheck(url: str, timeout: float) -> int:
    """Exit 0 when /health answers 200, 1 otherwise (Docker HEALTHCHECK semantics).

    Over https the certificate is not checked: this probes the server's liveness from
    inside its own container, where the certificate names the host clients use (not
    127.0.0.1) and its CA may be trusted nowhere here."""
    context = None
    if url.startswith("https://"):
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:  # noqa: S310 - loopback URL we build
            return 0 if response.status == 200 else 1
    except OSError as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1


def check_config() -> int:
    """Exit 0 with the start-up summary when the settings hold; 2 with every problem
    found (each bad variable, each broken combination), one a line, otherwise."""
    from passthrough.config import ConfigError, load_settings, settings_problems
    from passthrough.config.summary import summary_lines
    from passthrough.store import check_store

    found = settings_problems()
    if not found:
        try:
            settings = load_settings()
            check_store(settings)
        except ConfigError as exc:
            found = list(exc.problems)
    if found:
        noun = "problem" if len(found) == 1 else "problems"
        print(f"configuration error: {len(found)} {noun}", file=sys.stderr)
        for problem in found:
            print(f"  - {problem}", file=sys.stderr)
        return 2
    print(f"ok: registry {settings.registry.url} ({settings.registry.name})")
    for line in summary_lines(settings):
        print(f"  {line}")
    return 0


def gc(*, delete: bool, grace: str) -> int:
    """Exit 0 after a run (dry or not), 2 with one line on stderr when it cannot run."""
    from passthrough.config import STORE, ConfigError, load_settings
    from passthrough.errors import PassthroughError
    from passthrough.registry.gc import Collector, parse_duration
    from passthrough.store import open_store

    try:
        seconds = parse_duration(grace)
        settings = load_settings(concerns={STORE})
        store = open_store(settings)
        if store is None:
            raise ConfigError("gc needs the content store: set CACHE_DIR, or STORE=s3")
        try:
            Collector(store, grace=seconds, out=lambda line: print(line, flush=True)).run(
                delete=delete
            )
        finally:
            store.backend.close()
    except (ValueError, PassthroughError, OSError) as exc:  # ConfigError is a ValueError
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"passthrough gc: {message}", file=sys.stderr)
        return 2
    return 0


def _healthcheck_command(url: str | None, timeout: float) -> int:
    """healthcheck with its URL; 1 with one line when PORT or TLS_SELF_SIGNED is bad."""
    from passthrough.config import ConfigError

    try:
        return healthcheck(url or default_health_url(), timeout)
    except ConfigError as exc:
        print(f"unhealthy: configuration error: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="passthrough")
    commands = parser.add_subparsers(dest="command", required=True)
    health = commands.add_parser("healthcheck", help="probe /health of the local server")
    health.add_argument(
        "--url",
        default=None,
        help="health URL (default: http://127.0.0.1:$PORT/health, https with TLS_SELF_SIGNED "
        "or TLS_CERT_FILE; PORT defaults to 8080)",
    )
    health.add_argument("--timeout", type=float, default=3.0)
    commands.add_parser("check-config", help="validate the environment and .env, then exit")
    collect = commands.add_parser(
        "gc",
        help="remove hosted blobs and manifests that no tag reaches (a dry run unless --delete)",
    )
    collect.add_argument("--delete", action="store_true", help="remove them (default: only list)")
    collect.add_argument(
        "--grace",
        default=GC_GRACE,
        help="leave alone what was pushed more recently than this (90s, 15m, 1h, 2d, 0s; "
        f"default {GC_GRACE})",
    )
    from passthrough import cli_ls
    from passthrough.cli_import import add_import_parser, import_command

    # The commands with a module of their own: its parser, then its run.
    add_import_parser(commands)
    cli_sync.add_parser(commands)
    cli_export.add_parser(commands)
    cli_ls.add_parser(commands)
    runs = {
        "import": import_command,
        "sync": cli_sync.run,
        "export": cli_export.run,
        "ls": cli_ls.run,
    }
    args = parser.parse_args(argv)
    if args.command in runs:
        return runs[args.command](args)
    if args.command == "healthcheck":
        return _healthcheck_command(args.url, args.timeout)
    if args.command == "gc":
        return gc(delete=args.delete, grace=args.grace)
    return check_config()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
