"""The `passthrough` console command: `healthcheck` for containers without curl, and
`check-config` to validate the environment before a deploy."""

from __future__ import annotations

import argparse
import os
import sys
import urllib.request


def healthcheck(url: str, timeout: float) -> int:
    """Exit 0 when /health answers 200, 1 otherwise (Docker HEALTHCHECK semantics)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback URL we build
            return 0 if response.status == 200 else 1
    except OSError as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1


def check_config() -> int:
    from passthrough.config import ConfigError, load_settings
    from passthrough.store import check_store

    try:
        settings = load_settings()
        check_store(settings)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    print(f"ok: registry {settings.registry.url} ({settings.registry.name})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="passthrough")
    commands = parser.add_subparsers(dest="command", required=True)
    health = commands.add_parser("healthcheck", help="probe /health of the local server")
    health.add_argument(
        "--url",
        default=f"http://127.0.0.1:{os.environ.get('PORT', '8080')}/health",
        help="health URL (default: http://127.0.0.1:$PORT/health, PORT defaults to 8080)",
    )
    health.add_argument("--timeout", type=float, default=3.0)
    commands.add_parser("check-config", help="validate the environment and .env, then exit")
    args = parser.parse_args(argv)
    if args.command == "healthcheck":
        return healthcheck(args.url, args.timeout)
    return check_config()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
