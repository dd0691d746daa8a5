"""What a route's local client speaks, as a connection stage (sidecar.stages). Pure.

`tcp`: TLS at once, bytes untouched (`PassThrough`); `postgres`: the SSLRequest dance on both
sides; `mysql`: TLS inside the MySQL handshake; `http`: HTTP/1.1 with each request's Host
rewritten to the target's name. One module each.
"""

from __future__ import annotations

from sidecar.config import ListenAddress, RouteSpec
from sidecar.stages import PassThrough, Stage


def make_stage(route: RouteSpec, local: ListenAddress) -> Stage:
    """A new stage for one connection of `route`, whose listener is bound at `local`."""
    if route.protocol == "postgres":
        from sidecar.protocols.postgres import PostgresStage

        return PostgresStage(route)
    if route.protocol == "mysql":
        from sidecar.protocols.mysql import MySQLStage

        return MySQLStage(route)
    if route.protocol == "http":
        from sidecar.protocols.http import HTTPStage

        return HTTPStage(route, local)
    return PassThrough()
