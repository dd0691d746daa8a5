"""Smoke tests for the test servers themselves: real nginx and redis with client-certificate
authentication, and the scripted Python TLS server. If these fail, tunnel tests that use
them cannot be trusted either way."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import socket
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.realservers import (
    ServerStartError,
    free_port,
    nginx_mtls,
    pattern_bytes,
    redis_tls,
    require_binary,
    wait_for_port,
)
from tests.tlsserver import PLAINTEXT_ANSWER, ScriptedTLSServer, TLSStream

# --------------------------------------------------------------------------------------------
# A minimal test PKI (local on purpose: this file checks the fixtures, not tests/pki.py)


@dataclass(frozen=True)
class MiniPKI:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    client_der: bytes
    client_serial: int
    client_cn: str

    @property
    def client_serial_hex(self) -> str:
        """As nginx's $ssl_client_serial prints it: the serial's bytes in upper-case hex."""
        n = self.client_serial
        return n.to_bytes((n.bit_length() + 7) // 8, "big").hex().upper()


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def make_pki(folder: Path) -> MiniPKI:
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("realservers test CA"))
        .issuer_name(_name("realservers test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(
        cn: str, eku: x509.ObjectIdentifier, sans: list[x509.GeneralName]
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(hours=12))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    server_cert, server_key = leaf(
        "localhost",
        ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    client_cn = "realservers-client"
    client_cert, client_key = leaf(client_cn, ExtendedKeyUsageOID.CLIENT_AUTH, [])

    folder.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    pki = MiniPKI(
        ca=folder / "ca.pem",
        server_cert=folder / "server-fullchain.pem",
        server_key=folder / "server.key",
        client_cert=folder / "client.pem",
        client_key=folder / "client.key",
        client_der=client_cert.public_bytes(serialization.Encoding.DER),
        client_serial=client_cert.serial_number,
        client_cn=client_cn,
    )
    pki.ca.write_bytes(ca_cert.public_bytes(pem))
    pki.server_cert.write_bytes(server_cert.public_bytes(pem) + ca_cert.public_bytes(pem))
    _write_key(pki.server_key, server_key)
    pki.client_cert.write_bytes(client_cert.public_bytes(pem))
    _write_key(pki.client_key, client_key)
    return pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> MiniPKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


def client_context(pki: MiniPKI, *, with_cert: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    if with_cert:
        ctx.load_cert_chain(pki.client_cert, pki.client_key)
    return ctx


def curl(pki: MiniPKI, url: str, *args: str, with_cert: bool = True) -> tuple[str, str]:
    """Run curl; return (body, http_code)."""
    cert_args = ["--cert", str(pki.client_cert), "--key", str(pki.client_key)] if with_cert else []
    proc = subprocess.run(
        [
            require_binary("curl"),
            "-sS",
            "--max-time",
            "20",
            "--cacert",
            str(pki.ca),
            *cert_args,
            *args,
            "-w",
            "\n%{http_code}",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, f"curl failed ({proc.returncode}): {proc.stderr}"
    body, _, code = proc.stdout.rpartition("\n")
    return body, code


# --------------------------------------------------------------------------------------------
# nginx


def test_nginx_reports_the_client_certificate(pki: MiniPKI, tmp_path: Path) -> None:
    with nginx_mtls(
        tmp_path / "nginx", server_cert=pki.server_cert, server_key=pki.server_key, client_ca=pki.ca
    ) as server:
        assert server.url == f"https://127.0.0.1:{server.port}/"
        body, code = curl(pki, server.url)
    assert code == "200"
    assert f"client_dn=CN={pki.client_cn} " in body
    assert f"serial={pki.client_serial_hex} " in body
    assert "verify=SUCCESS" in body
    assert "proto=HTTP/1.1" in body


def test_nginx_without_client_certificate_answers_400(pki: MiniPKI, tmp_path: Path) -> None:
    with nginx_mtls(
        tmp_path / "nginx", server_cert=pki.server_cert, server_key=pki.server_key, client_ca=pki.ca
    ) as server:
        body, code = curl(pki, server.url, with_cert=False)
    assert code == "400"
    assert "No required SSL certificate was sent" in body


def test_nginx_optional_verification_with_a_python_client(pki: MiniPKI, tmp_path: Path) -> None:
    with nginx_mtls(
        tmp_path / "nginx",
        server_cert=pki.server_cert,
        server_key=pki.server_key,
        client_ca=pki.ca,
        verify_client="optional",
    ) as server:
        answers = {}
        for with_cert in (False, True):
            ctx = client_context(pki, with_cert=with_cert)
            with (
                socket.create_connection((server.host, server.port), timeout=10) as raw,
                ctx.wrap_socket(raw, server_hostname="localhost") as tls,
            ):
                tls.sendall(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
                chunks = []
                while chunk := tls.recv(65536):
                    chunks.append(chunk)
            answers[with_cert] = b"".join(chunks).decode()
    assert answers[False].startswith("HTTP/1.1 200")
    assert "client_dn= serial= verify=NONE" in answers[False]
    assert f"client_dn=CN={pki.client_cn} " in answers[True]
    assert "verify=SUCCESS" in answers[True]


def test_nginx_http2_negotiates_h2(pki: MiniPKI, tmp_path: Path) -> None:
    with nginx_mtls(
        tmp_path / "nginx",
        server_cert=pki.server_cert,
        server_key=pki.server_key,
        client_ca=pki.ca,
        http2=True,
    ) as server:
        body, code = curl(pki, server.url, "--http2")
    assert code == "200"
    assert "proto=HTTP/2.0 alpn=h2" in body


def test_nginx_serves_data_files_and_reads_uploads(pki: MiniPKI, tmp_path: Path) -> None:
    size = 3_000_001
    with nginx_mtls(
        tmp_path / "nginx", server_cert=pki.server_cert, server_key=pki.server_key, client_ca=pki.ca
    ) as server:
        src = server.write_data_file("blob.bin", size)
        out = tmp_path / "download.bin"
        _, code = curl(pki, server.url + "bytes/blob.bin", "-o", str(out))
        assert code == "200"
        assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(pattern_bytes(size)).digest()
        body, code = curl(pki, server.url + "upload", "--data-binary", f"@{src}")
        assert (code, body) == ("200", f"received={size}\n")
        # A chunked upload is buffered whole too.
        body, code = curl(
            pki,
            server.url + "upload",
            "--http1.1",
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            f"@{src}",
        )
        assert (code, body) == ("200", f"received={size}\n")


def test_nginx_stops_with_its_workers(pki: MiniPKI, tmp_path: Path) -> None:
    with nginx_mtls(
        tmp_path / "nginx", server_cert=pki.server_cert, server_key=pki.server_key, client_ca=pki.ca
    ) as server:
        port, pid = server.port, server.pid
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    leftovers = subprocess.run(["pgrep", "-f", f"nginx.*{tmp_path}"], capture_output=True, text=True, check=False)
    assert leftovers.stdout == ""
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_nginx_start_failure_carries_the_error_log(pki: MiniPKI, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-cert.pem"
    with (
        pytest.raises(ServerStartError, match="cannot load certificate") as info,
        nginx_mtls(tmp_path / "nginx", server_cert=missing, server_key=pki.server_key, client_ca=pki.ca),
    ):
        pass
    assert str(missing) in str(info.value)


def test_nginx_on_a_taken_port_fails_clearly(pki: MiniPKI, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with (
            pytest.raises(ServerStartError, match="Address already in use"),
            nginx_mtls(
                tmp_path / "nginx",
                server_cert=pki.server_cert,
                server_key=pki.server_key,
                client_ca=pki.ca,
                port=port,
            ),
        ):
            pass


# --------------------------------------------------------------------------------------------
# redis


def redis_cli(pki: MiniPKI, port: int, *, with_cert: bool = True) -> subprocess.CompletedProcess[str]:
    cert_args = ["--cert", str(pki.client_cert), "--key", str(pki.client_key)] if with_cert else []
    return subprocess.run(
        [
            require_binary("redis-cli"),
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "--tls",
            "--cacert",
            str(pki.ca),
            *cert_args,
            "PING",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_redis_answers_ping_over_mtls(pki: MiniPKI, tmp_path: Path) -> None:
    with redis_tls(
        tmp_path / "redis", server_cert=pki.server_cert, server_key=pki.server_key, client_ca=pki.ca
    ) as server:
        with_cert = redis_cli(pki, server.port)
        without_cert = redis_cli(pki, server.port, with_cert=False)
        pid = server.pid
    assert with_cert.stdout.strip() == "PONG", with_cert
    assert "PONG" not in without_cert.stdout, without_cert
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_wait_for_port_gives_up_at_the_deadline() -> None:
    port = free_port()
    with pytest.raises(TimeoutError, match=f"127.0.0.1:{port}"):
        wait_for_port("127.0.0.1", port, deadline_s=0.3)


def test_a_missing_binary_fails_and_says_what_to_install() -> None:
    with pytest.raises(pytest.fail.Exception, match="apt-get install no-such-tool-xyz"):
        require_binary("no-such-tool-xyz")


# --------------------------------------------------------------------------------------------
# ScriptedTLSServer


def scripted(pki: MiniPKI, mode: str = "echo", **kwargs: object) -> ScriptedTLSServer:
    return ScriptedTLSServer(
        cert=pki.server_cert,
        key=pki.server_key,
        client_ca=pki.ca,
        mode=mode,
        **kwargs,  # type: ignore[arg-type]
    )


def test_scripted_echo_with_client_certificate(pki: MiniPKI) -> None:
    payload = b"secret application payload 0123456789"
    with scripted(pki, require_client_cert=True, alpn=["h2", "http/1.1"]) as server:
        ctx = client_context(pki)
        ctx.set_alpn_protocols(["http/1.1"])
        with (
            socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.sendall(payload)
            echoed = b""
            while len(echoed) < len(payload) and (chunk := tls.recv(65536)):
                echoed += chunk
            assert echoed == payload
        server.wait_closed(1)
        record = server.records[0]
        assert server.connections == 1
        assert server.app_received == payload
        assert server.peer_certs == [pki.client_der]
        assert server.handshake_errors == []
        assert (record.sni, record.alpn, record.version) == ("localhost", "http/1.1", "TLSv1.3")
        raw_bytes = server.raw_received
        assert raw_bytes[:1] == b"\x16"  # a TLS handshake record, not plaintext
        assert payload not in raw_bytes
        assert b"secret" not in raw_bytes


def test_scripted_hello_then_echo(pki: MiniPKI) -> None:
    with scripted(pki, mode="hello") as server:
        with (
            socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw,
            client_context(pki, with_cert=False).wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            assert tls.recv(100) == b"hello\n"
            tls.sendall(b"ping")
            assert tls.recv(100) == b"ping"
        server.wait_closed(1)
        assert server.peer_certs == [None]


def test_scripted_plaintext_mode(pki: MiniPKI) -> None:
    with ScriptedTLSServer(cert=None, key=None, mode="plaintext") as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            answer = b""
            while chunk := sock.recv(1000):
                answer += chunk
        assert answer == PLAINTEXT_ANSWER
        server.wait_closed(1)
        assert server.app_received == b"GET / HTTP/1.0\r\n\r\n"
        assert server.raw_received == b"GET / HTTP/1.0\r\n\r\n"


def test_scripted_tls_client_against_plaintext_fails(pki: MiniPKI) -> None:
    with (
        ScriptedTLSServer(cert=None, key=None, mode="plaintext") as server,
        socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw,
        pytest.raises(ssl.SSLError, match=r"WRONG_VERSION_NUMBER|wrong version number"),
    ):
        client_context(pki).wrap_socket(raw, server_hostname="localhost")


def test_scripted_close_after_handshake(pki: MiniPKI) -> None:
    with scripted(pki, mode="close") as server:
        with (
            socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw,
            client_context(pki).wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            assert tls.recv(100) == b""
        server.wait_closed(1)


def test_scripted_reset_after_handshake(pki: MiniPKI) -> None:
    # Python's SSLSocket reports a reset under TLS as a ragged EOF; the raw socket does not.
    with (
        scripted(pki, mode="reset") as server,
        socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock,
    ):
        stream = TLSStream(sock, client_context(pki), server_side=False, server_hostname="localhost")
        stream.handshake()
        server.wait_closed(1)
        with pytest.raises(ConnectionResetError):
            stream.recv()
    assert server.records[0].version is not None


def test_scripted_reset_over_plain_tcp() -> None:
    # The reset may beat connect()'s own completion check (seen under load), so it can surface
    # from connect as well as from recv.
    with (
        ScriptedTLSServer(cert=None, key=None, tls=False, mode="reset") as server,
        pytest.raises(ConnectionResetError),
        socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock,
    ):
        server.wait_closed(1)
        sock.recv(100)


def test_scripted_reset_on_accept(pki: MiniPKI) -> None:
    # Not SSLContext.wrap_socket here: when the RST is already in, CPython 3.11's wrap_socket
    # raises from inside SSLSocket._create and leaks the SSLSocket (a ResourceWarning).
    with scripted(pki, mode="reset_on_accept") as server:
        # The reset may beat connect()'s own completion check (a connect with a timeout polls
        # for it), so it can surface from connect as well as from the handshake.
        with (
            pytest.raises((ConnectionResetError, BrokenPipeError)),
            socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock,
        ):
            stream = TLSStream(sock, client_context(pki), server_side=False, server_hostname="localhost")
            stream.handshake()
        server.wait_closed(1)
        assert server.peer_certs == [None]
        assert server.raw_received == b""


@pytest.mark.parametrize("how", ["close_notify", "tcp_fin"])
def test_scripted_halfclose_over_tls(pki: MiniPKI, how: str) -> None:
    data = pattern_bytes(200_000)
    with scripted(pki, mode="halfclose") as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            stream = TLSStream(sock, client_context(pki), server_side=False, server_hostname="localhost")
            stream.handshake()
            stream.sendall(data)
            if how == "close_notify":
                stream.close_write()
            else:
                sock.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := stream.recv():
                answer += chunk
        assert answer == b"got 200000 bytes\n"
        server.wait_closed(1)
        assert server.records[0].eof_kind == how
        assert server.app_received == data


def test_scripted_halfclose_over_plain_tcp() -> None:
    with ScriptedTLSServer(cert=None, key=None, tls=False, mode="halfclose") as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"x" * 1234)
            sock.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := sock.recv(1000):
                answer += chunk
        assert answer == b"got 1234 bytes\n"


def test_scripted_requires_a_client_certificate(pki: MiniPKI) -> None:
    with scripted(pki, require_client_cert=True) as server:
        with (
            socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw,
            client_context(pki, with_cert=False).wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            # TLS 1.3: our side of the handshake completes; the refusal comes on first read.
            tls.sendall(b"hi")
            with pytest.raises(ssl.SSLError, match=r"CERTIFICATE_REQUIRED|certificate required"):
                tls.recv(100)
        server.wait_closed(1)
        assert len(server.handshake_errors) == 1
        assert "certificate" in server.handshake_errors[0]
        assert server.peer_certs == [None]
        assert server.app_received == b""


def test_scripted_version_limits(pki: MiniPKI) -> None:
    with scripted(pki, max_version=ssl.TLSVersion.TLSv1_2) as server:
        with (
            socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw,
            client_context(pki).wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            assert tls.version() == "TLSv1.2"
        server.wait_closed(1)
        assert server.records[0].version == "TLSv1.2"


def test_scripted_stall_never_answers(pki: MiniPKI) -> None:
    with scripted(pki, mode="stall") as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
            raw.settimeout(0.5)
            with pytest.raises(TimeoutError):
                client_context(pki).wrap_socket(raw, server_hostname="localhost")
            server.wait_for(lambda: len(server.raw_received) > 0, what="the ClientHello")
        assert server.raw_received[:1] == b"\x16"
        server.wait_closed(1)


def test_scripted_rejects_unknown_mode(pki: MiniPKI) -> None:
    with pytest.raises(ValueError, match="unknown mode"):
        scripted(pki, mode="teapot")
