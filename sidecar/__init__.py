"""mtls-sidecar: localhost plaintext ports tunnelled to mutual-TLS services."""

__version__ = "0.1.0"
