"""`renew = "local-ca"`: the embedded dev CA issues (new key unless `rekey = false`)."""

from __future__ import annotations

from datetime import timedelta

from cryptography import x509

from sidecar.config import IdentitySpec
from sidecar.credentials import Secrets
from sidecar.devca import BACKDATE, foreign_credentials
from sidecar.errors import KeystoreError
from sidecar.keystore import read_identity_folder
from sidecar.renewal.providers.base import (
    NewCredential,
    ProviderContext,
    ProviderError,
    Refused,
    RenewalRequest,
    settings_of,
)
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
        self._refuse_beside_another_issuer(request, ca.cert)
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

    def _refuse_beside_another_issuer(self, request: RenewalRequest, ca_cert: x509.Certificate) -> None:
        """A dev-CA certificate beside a company's would win the keystore rule (it is newer) and
        silently replace it: never write one there. The folder is read as it is now, without
        passwords: a PKCS#12 file is another issuer's even when it cannot be opened."""
        foreign = foreign_credentials(read_identity_folder(request.folder, Secrets()), ca_cert)
        if not foreign:
            return
        name = self.spec.name
        raise Refused(
            f"refused: the dev CA does not issue into identity {name}, whose folder {request.folder} holds "
            f'credentials from another issuer: {"; ".join(foreign)}. Set renew = "none" (or that issuer\'s '
            f"provider) for identities.{name}, or move those files out of the folder"
        )
