"""Turning TLS exceptions into reason keys and sentences, without sockets."""

from __future__ import annotations

import ssl

import pytest

from sidecar import failures
from sidecar.causes import Cause

# Runs anywhere: pure logic, or loopback sockets only (the macOS and Windows CI jobs run it).
pytestmark = pytest.mark.portable


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
            Cause.SERVER_REJECTED_CERT,
        ),
        (ssl_error("tlsv1 alert unknown ca", "TLSV1_ALERT_UNKNOWN_CA"), Cause.SERVER_REJECTED_CERT),
        (ssl_error("wrong version number", "WRONG_VERSION_NUMBER"), Cause.NOT_TLS),
        # Python 3.11 has no name for this newer reason: it must be recovered from the text
        (ssl_error("[SSL] tlsv1 alert no application protocol (_ssl.c:1006)"), Cause.ALPN_REFUSED),
        (ssl_error("something else entirely", "SOMETHING_ELSE"), Cause.TLS_ERROR),
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
        # `refused`, as `check` has always said (one vocabulary: this was `connect` in the tunnel)
        failures.classify(ConnectionRefusedError(111, "refused"), target="t:1", server_name="t", trust="x").reason
        == Cause.REFUSED
    )
    assert failures.classify(TimeoutError(), target="t:1", server_name="t", trust="x").reason == Cause.TIMEOUT


def test_timeouts_say_which_step_got_no_answer() -> None:
    tcp = failures.classify(TimeoutError(), target="t:1", server_name="t", trust="x", connected=False, timeout=0.5)
    tls = failures.classify(TimeoutError(), target="t:1", server_name="t", trust="x", connected=True, timeout=0.5)
    assert tcp.reason == tls.reason == Cause.TIMEOUT
    assert "no TCP connection within 0.5s" in tcp.message
    assert "accepted the TCP connection but did not complete the TLS handshake within 0.5s" in tls.message


def test_broken_streams_name_reset_and_truncation_with_the_byte_count() -> None:
    reset = failures.broken_stream(ConnectionResetError(104, "Connection reset by peer"), target="t:1", received=1)
    assert (reset.reason, reset.message) == (
        Cause.RESET,
        "t:1 reset the connection after 1 byte of its answer; the local connection was reset too",
    )
    cut = failures.broken_stream(None, target="t:1", received=73)
    assert cut.reason == Cause.TRUNCATED
    assert "without TLS close_notify after 73 bytes" in cut.message
    broken = failures.broken_stream(TimeoutError(110, "Connection timed out"), target="t:1", received=0)
    assert (broken.reason, broken.message) == (
        Cause.RESET,
        "the connection to t:1 broke after 0 bytes of its answer: Connection timed out",
    )
