"""Turning TLS exceptions into reason keys and sentences, without sockets."""

from __future__ import annotations

import ssl

import pytest

from sidecar import failures


def ssl_error(text: str, reason: str | None = None) -> ssl.SSLError:
    exc = ssl.SSLError(1, text)
    if reason is not None:
        exc.reason = reason  # type: ignore[misc]
    return exc


@pytest.mark.parametrize(
    ("exc", "key"),
    [
        (
            ssl_error("tlsv13 alert certificate required", "TLSV13_ALERT_CERTIFICATE_REQUIRED"),
            failures.SERVER_REJECTED_CERT,
        ),
        (ssl_error("tlsv1 alert unknown ca", "TLSV1_ALERT_UNKNOWN_CA"), failures.SERVER_REJECTED_CERT),
        (ssl_error("wrong version number", "WRONG_VERSION_NUMBER"), failures.NOT_TLS),
        # Python 3.11 has no name for this newer reason: it must be recovered from the text
        (ssl_error("[SSL] tlsv1 alert no application protocol (_ssl.c:1006)"), failures.ALPN_REFUSED),
        (ssl_error("something else entirely", "SOMETHING_ELSE"), failures.TLS_ERROR),
    ],
)
def test_classify_ssl_error(exc: ssl.SSLError, key: str) -> None:
    assert failures.classify_ssl_error(exc, target="api.example.test:443").reason == key


def test_rejection_message_names_the_alert() -> None:
    exc = ssl_error("tlsv1 alert unknown ca", "TLSV1_ALERT_UNKNOWN_CA")
    message = failures.classify_ssl_error(exc, target="api:443").message
    assert message == "api:443 rejected our client certificate (TLS alert: unknown ca)"


def test_connection_errors() -> None:
    assert (
        failures.classify(ConnectionRefusedError(111, "refused"), target="t:1", server_name="t", trust="x").reason
        == failures.CONNECT
    )
    assert failures.classify(TimeoutError(), target="t:1", server_name="t", trust="x").reason == failures.TIMEOUT
