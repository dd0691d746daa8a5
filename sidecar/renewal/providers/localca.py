"""`renew = "local-ca"`: the embedded dev CA issues (new key unless `rekey = false`)."""

from __future__ import annotations

from datetime import timedelta

from sidecar.config import IdentitySpec
from sidecar.devca import BACKDATE
from sidecar.errors import KeystoreError
from sidecar.renewal.providers.base import NewCredential, ProviderContext, ProviderError, RenewalRequest, settings_of
from sidecar.renewal.settings import LocalCASettings


class LocalCAProvider:
    name = "local-ca"

    def __init__(self, spec: IdentitySpec, context: ProviderContext) -> None:
        self.spec = spec
        self.context = context
        self.rekey = settings_of(spec, LocalCASettings).rekey

    async def issue(self, request: RenewalRequest) -> NewCredential:
        ca = self.context.dev_ca
        if ca is None:
            raise ProviderError("the dev CA is not available")
        key = None if self.rekey or request.current is None else request.current.key
        lifetime = timedelta(seconds=self.spec.lifetime)
        current = request.current.cert if request.current is not None else None
        if current is not None and current.not_valid_before_utc >= (request.now - BACKDATE).replace(microsecond=0):
            # Certificate times have one-second resolution: a renewal within the same second ties
            # on notBefore, so reach one second past the current notAfter to win the tie-break.
            lifetime = max(lifetime, current.not_valid_after_utc + timedelta(seconds=1) - request.now)
        try:
            issued = ca.issue_client(self.spec.subject, lifetime, request.now, key=key)
        except KeystoreError as exc:
            raise ProviderError(str(exc)) from exc
        return NewCredential(cert_chain_pem=issued.cert_pem(), key_pem=issued.key_pem())
