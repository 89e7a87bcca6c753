"""GET /ca.crt: the CA of TLS_SELF_SIGNED, for clients to trust (docker's certs.d,
containerd's hosts.toml, curl --cacert).

The gunicorn master makes the CA and tells its workers where the file is
(:data:`passthrough.tls.CA_FILE_ENV`); the CA certificate is public, its key never
leaves the master's private directory. Without TLS_SELF_SIGNED there is no CA of ours
to hand out: an operator's own certificate is trusted by whatever signed it.
"""

from __future__ import annotations

import os

from flask import Blueprint, Response, current_app

from passthrough.errors import NoCertificateAuthority
from passthrough.services import services_of
from passthrough.tls import CA_FILE_ENV

bp = Blueprint("tls", __name__)


@bp.get("/ca.crt")
def ca_certificate() -> Response:
    services = services_of(current_app)
    if not services.settings.tls_self_signed:
        raise NoCertificateAuthority(
            "no CA to hand out: TLS_SELF_SIGNED is off (with TLS_CERT_FILE, trust the CA "
            "that signed that certificate)"
        )
    path = os.environ.get(CA_FILE_ENV)
    if not path:
        raise NoCertificateAuthority(
            "no CA yet: the certificate is made by the gunicorn master (gunicorn.conf.py) "
            "at start-up"
        )
    try:
        with open(path, "rb") as handle:
            pem = handle.read()
    except OSError:
        raise NoCertificateAuthority("the CA file made at start-up is gone") from None
    return Response(
        pem,
        mimetype="application/x-pem-file",
        headers={
            "Content-Disposition": 'attachment; filename="ca.crt"',
            "Cache-Control": "no-cache",
        },
    )
