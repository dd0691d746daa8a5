"""Renewal providers, one module each; `make_provider` picks one by the identity's `renew` key."""

from __future__ import annotations

from sidecar.config import IdentitySpec
from sidecar.renewal.providers.base import Provider, ProviderContext


def make_provider(spec: IdentitySpec, context: ProviderContext) -> Provider | None:
    """The provider for `spec.renew`, or None for `renew = "none"`. Imports lazily: acme is heavy."""
    if spec.renew == "local-ca":
        from sidecar.renewal.providers.localca import LocalCAProvider

        return LocalCAProvider(spec, context)
    if spec.renew == "command":
        from sidecar.renewal.providers.command import CommandProvider

        return CommandProvider(spec, context)
    if spec.renew == "acme":
        from sidecar.renewal.providers.acme import AcmeProvider

        return AcmeProvider(spec, context)
    if spec.renew == "step-ca":
        from sidecar.renewal.providers.stepca import StepCAProvider

        return StepCAProvider(spec, context)
    return None
