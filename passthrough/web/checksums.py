"""The checksum answers of every tar URL: ``<tar URL>.sha256`` and ``.md5`` give the
digest of exactly the bytes that URL sends, as ``sha256sum``/``md5sum`` print it
(:mod:`passthrough.export.checksum`). The routes are the tar routes' own
(:mod:`passthrough.web.downloads`, :mod:`passthrough.web.bundles`): they call
:func:`checksum_response` when the path ends in one of those suffixes."""

from __future__ import annotations

from flask import Response, current_app

from passthrough.capacity import Transfer
from passthrough.export.checksum import Archive, checksum_line, checksums
from passthrough.services import services_of


def checksum_response(archive: Archive, algorithm: str, transfer: Transfer | None) -> Response:
    """The one line; the archive is built (every layer fetched) the first time only.
    Releases the transfer slot that a build holds."""
    try:
        record = checksums(services_of(current_app).store, archive)
    finally:
        if transfer is not None:
            transfer.release()
    return Response(
        checksum_line(record, algorithm, archive.filename),
        mimetype="text/plain",
        headers={"Cache-Control": "private, no-cache", "X-Content-Type-Options": "nosniff"},
    )
