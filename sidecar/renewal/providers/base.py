"""What every renewal provider is given and must return."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Protocol, TypeVar

from sidecar.config import IdentitySpec
from sidecar.credentials import Candidate
from sidecar.devca import DevCA
from sidecar.renewal.settings import ProviderSettings

S = TypeVar("S", bound=ProviderSettings)


class ProviderError(Exception):
    """A provider could not issue; the message is one readable line (no secrets) for status and logs."""


class CannotEnroll(ProviderError):
    """There is no usable certificate and the provider cannot get a first one on its own (for
    example step-ca without a provisioner: `/renew` needs a valid certificate). The identity is
    `expired`, not `failing`; the message says what the user can run."""


class Refused(CannotEnroll):
    """The provider will not write into the identity's folder as it is now (the dev CA beside
    certificates from another issuer). Nothing is issued; the renewer tries again as soon as the
    folder's credentials change (or on the usual back-off), and the message says what to change."""


@dataclass(frozen=True)
class ProviderContext:
    """Daemon-wide things providers may need."""

    keystore: Path
    dev_ca: DevCA | None = None
    # A private folder (0700) for short-lived files such as the decrypted key a renew_command
    # reads; the daemon empties it at start, so a renewal killed midway leaves nothing for long.
    scratch: Path | None = None


@dataclass(frozen=True)
class RenewalRequest:
    identity: IdentitySpec
    folder: Path  # the identity's keystore folder (providers may keep state in hidden files here)
    current: Candidate | None  # the credential in use now; None when enrolling
    now: datetime


@dataclass(frozen=True)
class NewCredential:
    """PEM bytes as issued: the leaf first, then its chain; and the private key."""

    cert_chain_pem: bytes
    key_pem: bytes = field(repr=False)


def settings_of(spec: IdentitySpec, kind: type[S]) -> S:
    """`spec.provider`, which the config parsed and checked for provider `kind`."""
    if not isinstance(spec.provider, kind):
        raise ProviderError(f"identity {spec.name} has renew = {spec.renew!r}, not {kind.name!r}")
    return spec.provider


class Provider(Protocol):
    name: str

    async def issue(self, request: RenewalRequest) -> NewCredential:
        """Obtain a new certificate for `request.identity`. Raise ProviderError on failure."""
        ...
