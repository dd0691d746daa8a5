"""A host and port as people write them: `host:port`, and `[v6]:port` for an IPv6 literal (pure)."""

from __future__ import annotations


def host_port(host: str, port: int) -> str:
    """`example.test:443`, `127.0.0.1:8443`, `[::1]:8443`: the brackets keep the port apart from the address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
