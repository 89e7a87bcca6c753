"""STUB — NOT TO BE MERGED. The read-only minimum of the /api/v1 contract (COMMON.md)
that the console's browser test needs while the inventory engineer writes the real API:
``GET /api/v1/repositories`` and ``GET /api/v1/repositories/<name>/tags`` for HOSTED
repositories only (no cached listing, store usage, admin actions, pull counts, times,
tar sizes or pagination beyond ``n``). The lead drops this module and its registration
in passthrough/__init__.py for the real one at merge.
"""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, Response, request

from passthrough.errors import NameUnknown, PassthroughError, UpstreamUnavailable
from passthrough.oci.manifest import INDEX_TYPES, index_platforms
from passthrough.registry.access import check_access
from passthrough.registry.hosted import Hosted
from passthrough.web.downloads import services

bp = Blueprint("api_stub", __name__, url_prefix="/api/v1")


def _answer(document: dict[str, Any], status: int = 200) -> Response:
    return Response(json.dumps(document) + "\n", status=status, mimetype="application/json")


@bp.errorhandler(PassthroughError)
def _error(error: PassthroughError) -> Response:
    code = {401: "UNAUTHORIZED", 403: "DENIED", 404: "NAME_UNKNOWN"}.get(error.status, "UNKNOWN")
    return _answer({"errors": [{"code": code, "message": error.message}]}, error.status)


def _may_pull(repository: str | None) -> bool:
    svc = services()
    try:
        check_access(
            svc.settings,
            None,
            request.headers.get("Authorization"),
            repository,
            "pull",
            gate=svc.access(),
            client=request.remote_addr,
        )
    except PassthroughError:
        if repository is None:
            raise
        return False
    return True


def _hosted() -> Hosted:
    svc = services()
    if svc.store is None:
        raise UpstreamUnavailable("the hosted area needs a content store")
    return Hosted(svc.settings, svc.store)


@bp.get("/repositories")
def repositories() -> Response:
    if request.headers.get("Authorization"):
        _may_pull(None)  # a wrong login is 401, not an empty list
    hosted = _hosted()
    wanted = request.args.get("q", "")
    listed = [
        {"name": name, "source": "hosted", "upstream": None, "tags": len(hosted.tags(name)),
         "size": None, "last_pulled": None, "pulls": 0}
        for name in hosted.repositories()
        if wanted in name and _may_pull(name)
    ]  # fmt: skip
    return _answer({"repositories": listed, "next": None})


@bp.get("/repositories/<path:name>/tags")
def tags(name: str) -> Response:
    if not _may_pull(name):
        raise NameUnknown(f"repository {name} is not known to this registry")
    hosted = _hosted()
    return _answer({
        "name": name, "source": "hosted", "upstream": None,
        "tags": [_tag(hosted, name, tag) for tag in hosted.tags(name)], "next": None,
    })  # fmt: skip


def _tag(hosted: Hosted, name: str, tag: str) -> dict[str, Any]:
    found = hosted.manifest(name, tag)
    document = json.loads(found.body or b"{}")
    if found.media_type in INDEX_TYPES:
        platforms = [str(p) for p, _ in index_platforms(document)]
        size = None
    else:
        blob = hosted.store.get_document("blobs", document["config"]["digest"])
        config = json.loads(blob or b"{}")
        platforms = [f"{config.get('os')}/{config.get('architecture')}"]
        size = sum(int(layer["size"]) for layer in document.get("layers", []))
    return {"tag": tag, "digest": found.digest, "media_type": found.media_type,
            "platforms": platforms, "compressed_size": size, "tar_size": None,
            "created": None, "pushed": None, "last_pulled": None, "pulls": 0}  # fmt: skip
