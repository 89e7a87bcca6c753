"""The inventory API, ``/api/v1`` (JSON; the shapes are the README's "Inventory API"):

- ``GET /api/v1/repositories?source=hosted|cached&q=&n=&last=``: repositories, paged;
- ``GET /api/v1/repositories/<name>/tags?n=&last=``: one repository's tags;
- ``GET /api/v1/store`` (admin): the store's usage;
- ``DELETE /api/v1/repositories/<name>/tags/<tag>`` (admin): delete a hosted tag;
- ``DELETE /api/v1/cache/<name>:<tag>`` or ``?digest=`` (admin): evict a cached image;
- ``POST /api/v1/gc`` with ``{"dry_run": true}`` (admin): gc's dry run as JSON.

Who sees what: hosted repositories by ACCESS_FILE's pull rules (:meth:`Gate.user_may`);
the cache, the store and every action only admins (:meth:`Gate.is_admin`): what
others pull is not everyone's business. Clients log in with HTTP Basic (an
HTPASSWD_FILE user) or a Bearer token of the door's token service; anonymous clients
see what anonymous may pull. Errors are JSON (:mod:`passthrough.web.errors`).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

from flask import Blueprint, Response, current_app, request

from passthrough.errors import (
    BadRequest,
    Denied,
    LoginFailed,
    NameUnknown,
    PaginationInvalid,
    StoreRequired,
    TokenRequired,
)
from passthrough.registry.access import Gate
from passthrough.registry.inventory import Inventory, RepositoryEntry
from passthrough.registry.pages import next_page_link
from passthrough.registry.pulls import CACHED, HOSTED
from passthrough.services import Services, services_of
from passthrough.upstream.auth import parse_basic_authorization

bp = Blueprint("api", __name__, url_prefix="/api/v1")

#: A page's length when ``n`` is not given, and the most one may ask for.
DEFAULT_PAGE, MAX_PAGE = 100, 1000


def _services() -> Services:
    return services_of(current_app)


def _inventory() -> Inventory:
    services = _services()
    if services.store is None:
        raise StoreRequired("the inventory lists the content store: set CACHE_DIR or STORE=s3")
    return Inventory(services.settings, services.store, services.pulls)


def _user(gate: Gate) -> str | None:
    """The passthrough user the request logged in as (None: anonymous); 401 for a
    wrong login, 429 after too many."""
    header = request.headers.get("Authorization")
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() == "basic":
        credentials = parse_basic_authorization(header)
        if credentials is None or gate.users is None:
            raise LoginFailed("this door has no users (HTPASSWD_FILE) to log in as")
        return gate.login(credentials, request.remote_addr, {})
    tokens = _services().token_service
    if scheme.lower() == "bearer" and tokens is not None:
        grant = tokens.verify(value.strip())
        return grant.user if grant.user and gate.is_user(grant.user) else None
    raise LoginFailed("log in with HTTP Basic (a passthrough user) or a Bearer token")


def _admin(gate: Gate) -> str:
    """The admin user of this request, else 401 (no login) or 403 DENIED."""
    user = _user(gate)
    if user is None:
        raise TokenRequired("this needs an admin's login (HTTP Basic)")
    if not gate.is_admin(user):
        raise Denied(f"user {user!r} is not an admin of this door")
    return user


def _json(document: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return Response(
        json.dumps(document),
        mimetype="application/json",
        headers={"Cache-Control": "no-store", **(headers or {})},
    )


def _page(
    names: list[str], path: str, **query: str
) -> tuple[list[str], str | None, dict[str, str]]:
    """A page of sorted ``names`` after ``last``, at most ``n``: (page, next, headers)."""
    raw = request.args.get("n", "")
    if raw and (not raw.isdigit() or not 1 <= int(raw) <= MAX_PAGE):
        raise PaginationInvalid(f"n must be a whole number from 1 to {MAX_PAGE}")
    count = int(raw) if raw else DEFAULT_PAGE
    last = request.args.get("last") or ""
    after = [name for name in names if name > last] if last else names
    chosen = after[:count]
    if len(after) <= count or not chosen:
        return chosen, None, {}
    kept = urlencode({k: v for k, v in query.items() if v})
    link = next_page_link(path, str(count), chosen[-1])
    if kept:
        link = link.replace('>; rel="next"', f'&{kept}>; rel="next"')
    return chosen, chosen[-1], {"Link": link}


def _visible(gate: Gate, user: str | None, entry: RepositoryEntry) -> bool:
    if entry.source == CACHED:
        return gate.is_admin(user)
    return gate.user_may(user, entry.name, "pull")


@bp.get("/repositories")
def repositories() -> Response:
    gate = _services().access()
    source = request.args.get("source") or None
    if source not in (None, HOSTED, CACHED):
        raise BadRequest("source must be hosted or cached")
    user = _admin(gate) if source == CACHED else _user(gate)
    if not gate.is_admin(user):
        source = HOSTED  # the cache is the admins' to see: not even worked out for others
    wanted = (request.args.get("q") or "").lower()
    entries = {
        e.name: e
        for e in _inventory().repositories(source)
        if wanted in e.name.lower() and _visible(gate, user, e)
    }
    query = {"source": request.args.get("source") or "", "q": request.args.get("q") or ""}
    chosen, following, headers = _page(sorted(entries), request.path, **query)
    body = {"repositories": [entries[name].summary() for name in chosen], "next": following}
    return _json(body, headers)


@bp.get("/repositories/<path:name>/tags")
def tags(name: str) -> Response:
    gate = _services().access()
    user = _user(gate)
    source = request.args.get("source") or None
    try:
        entry = _inventory().repository(name, source)
    except NameUnknown:
        entry = None
    if entry is None or not _visible(gate, user, entry):
        if user is None:
            raise TokenRequired(f"{name[:200]}: log in to see its tags")
        raise NameUnknown(f"repository {name[:200]} is not known to this door")
    by_tag = {t.tag: t for t in entry.tags}
    chosen, following, headers = _page(sorted(by_tag), request.path)
    body = {**entry.head(), "tags": [by_tag[t].document() for t in chosen], "next": following}
    return _json(body, headers)


@bp.get("/store")
def store() -> Response:
    _admin(_services().access())
    return _json(_inventory().usage())


@bp.delete("/repositories/<path:name>/tags/<tag>")
def delete_tag(name: str, tag: str) -> Response:
    _admin(_services().access())
    _inventory().delete_hosted_tag(name, tag)
    return _json({"deleted": f"{name}:{tag}"})


@bp.delete("/cache/<path:reference>")
def evict(reference: str) -> Response:
    _admin(_services().access())
    digest = request.args.get("digest") or None
    name, tag = reference, None
    if digest is None:
        name, colon, tag = reference.rpartition(":")
        if not colon or not name or "/" in tag:
            raise BadRequest("name the image as <name>:<tag>, or <name>?digest=sha256:…")
    return _json(_inventory().evict(name, tag, digest))


@bp.post("/gc")
def gc() -> Response:
    _admin(_services().access())
    from passthrough.registry.gc import Collector

    try:
        body = json.loads(request.get_data() or b"{}")
    except ValueError:
        raise BadRequest('the body must be JSON such as {"dry_run": true}') from None
    if not isinstance(body, dict) or body.get("dry_run", True) is not True:
        raise BadRequest("only gc's dry run is offered here; run `passthrough gc --delete`")
    store = _inventory().store
    lines: list[str] = []
    summary = Collector(store, grace=3600.0, out=lines.append).run(delete=False)
    report = {k: v for k, v in vars(summary).items() if isinstance(v, int | bool)}
    return _json({"dry_run": True, "lines": lines[:-1], "summary": lines[-1], **report})
