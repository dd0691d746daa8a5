"""The certificate `local_tls` routes present to local clients: dev CA, localhost, 127.0.0.1, ::1.

Clients that insist on TLS (psql with sslmode=require or verify-full, a MySQL client with
--ssl-mode=VERIFY_IDENTITY) get it on the loopback hop too, with `mtls-sidecar ca export` as
their root. One certificate serves every such route; it is issued on first use and issued
again once a third of its life is left, so a long-running daemon never presents an expired one.
"""

from __future__ import annotations

import ssl
from datetime import UTC, datetime, timedelta

from sidecar.credentials import Candidate
from sidecar.devca import DevCA
from sidecar.tlsctx import load_credential

LIFETIME = timedelta(days=30)
NAMES = ("localhost", "127.0.0.1", "::1")


class LocalServerContext:
    def __init__(self, ca: DevCA, lifetime: timedelta = LIFETIME) -> None:
        self.ca = ca
        self.lifetime = lifetime
        self._ctx: ssl.SSLContext | None = None
        self._renew_at: datetime | None = None

    def __call__(self, now: datetime | None = None) -> ssl.SSLContext:
        now = now or datetime.now(UTC)
        if self._ctx is None or self._renew_at is None or now >= self._renew_at:
            issued = self.ca.issue_server(list(NAMES), self.lifetime, now)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            load_credential(ctx, Candidate(file="<local_tls>", cert=issued.cert, chain=issued.chain, key=issued.key))
            self._ctx = ctx
            self._renew_at = issued.cert.not_valid_after_utc - self.lifetime / 3
        return self._ctx
