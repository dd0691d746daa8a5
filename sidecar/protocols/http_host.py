"""The Host an `http` route gives every request. Pure; used by the http stage and by `check`."""

from __future__ import annotations

from sidecar.config import RouteSpec


def http_host(route: RouteSpec) -> str:
    """`host_header` when set; else the server's name, with `:port` unless the port is 443."""
    if route.host_header:
        return route.host_header
    name = route.server_name
    if ":" in name and not name.startswith("["):
        name = f"[{name}]"  # an IPv6 literal
    return name if route.target_port == 443 else f"{name}:{route.target_port}"
