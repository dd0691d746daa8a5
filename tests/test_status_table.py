"""`mtls-sidecar status` as a table: columns stay aligned whatever the values' lengths."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from sidecar.statusview import render_status

# Runs anywhere: pure logic, or loopback sockets only (the macOS and Windows CI jobs run it).
pytestmark = pytest.mark.portable

NOW = datetime(2026, 11, 22, 20, 0, tzinfo=UTC)
LONG_SUBJECT = "CN=svc-reporting-batch-worker,OU=Platform Engineering,O=Example Corporation Europe GmbH,L=Berlin,C=DE"


def _status() -> dict[str, Any]:
    def identity(subject: str, provider: str) -> dict[str, Any]:
        return {
            "selected": {"subject": subject, "not_after": "2026-11-29T20:00:00Z"},
            "renewal": {"provider": provider, "state": "valid"},
        }

    def route(listen: str, target: str, who: str) -> dict[str, Any]:
        return {
            "listen": listen,
            "target": target,
            "identity": who,
            "state": "up",
            "active_connections": 0,
            "total_connections": 2,
        }

    return {
        "version": "0.1.0",
        "active_identity": "dev",
        "identities": {
            "dev": identity("CN=dev", "local-ca"),
            "corporate-reporting": identity(LONG_SUBJECT, "none"),
        },
        "routes": {
            "api": route("127.0.0.1:8443", "api.example.test:443", "dev"),
            "reporting-warehouse-eu": route(
                "127.0.0.1:15432", "warehouse.reporting.eu-central-1.internal.example.test:5432", "corporate-reporting"
            ),
        },
        "warnings": [],
    }


def test_a_long_subject_and_long_route_names_keep_every_column_aligned() -> None:
    lines = render_status(_status(), NOW).splitlines()
    identity_header = next(line for line in lines if line.startswith("IDENTITY"))
    renewal_at = identity_header.index("RENEWAL")
    dev = next(line for line in lines if line.startswith("*dev"))
    corporate = next(line for line in lines if line.startswith(" corporate-reporting"))
    assert dev[renewal_at:].startswith("local-ca: valid"), "\n".join(lines)
    assert corporate[renewal_at:].startswith("none: valid"), "\n".join(lines)
    assert corporate.index("CN=svc-reporting") == dev.index("CN=dev") == identity_header.index("CERTIFICATE")

    route_header = next(line for line in lines if line.startswith("ROUTE"))
    api = next(line for line in lines if line.startswith(" api "))
    warehouse = next(line for line in lines if line.startswith(" reporting-warehouse-eu"))
    for column, api_value, warehouse_value in (
        ("LISTEN", "127.0.0.1:8443", "127.0.0.1:15432"),
        ("AS", "dev ", "corporate-reporting"),
        ("STATE", "up ", "up "),
        ("CONNECTIONS", "0 open, 2 total", "0 open, 2 total"),
    ):
        at = route_header.index(f" {column}") + 1
        assert api[at:].startswith(api_value), (column, "\n".join(lines))
        assert warehouse[at:].startswith(warehouse_value), (column, "\n".join(lines))


def test_short_values_keep_the_usual_widths_and_colour_does_not_shift_columns() -> None:
    status = _status()
    del status["identities"]["corporate-reporting"]
    del status["routes"]["reporting-warehouse-eu"]
    plain = render_status(status, NOW).splitlines()
    assert "IDENTITY      CERTIFICATE                          RENEWAL" in plain
    assert "ROUTE         LISTEN → TARGET                                  AS           STATE   CONNECTIONS" in plain
    coloured = render_status(status, NOW, colour=True)
    uncoloured = coloured.replace("\033[32m", "").replace("\033[0m", "")
    assert uncoloured.splitlines() == plain
