# ruff: noqa: E501  (the case tables read best one case a line)
"""Every bad input we try, and the message the user gets: the source of docs/bad-inputs.md.

Each case makes its input for real (files, a daemon, servers that misbehave) and records the
message mtls-sidecar gives. tests/test_bad_input_catalogue.py checks each message says what
it must and that docs/bad-inputs.md is what this renders; to refresh the document:

    python3 -m tests.bad_input_catalogue > docs/bad-inputs.md
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sidecar.config import parse_config
from sidecar.credentials import Secrets
from sidecar.errors import ConfigError
from sidecar.keystore import read_identity_folder, select
from sidecar.paths import resolve_places
from tests.pki import CA, key_pem
from tests.scenario import Pki, recv_all, write_config


@dataclass(frozen=True)
class Case:
    area: str
    what: str
    expect: tuple[str, ...]  # fragments the message must contain
    run: Callable[[Path], str]  # makes the input under a scratch folder; returns the message


@dataclass(frozen=True)
class Row:
    case: Case
    message: str


# -- config.toml ----------------------------------------------------------------------------

MINIMAL_ROUTE = (
    '[identities.dev]\nrenew = "none"\n\n[routes.api]\nlisten = "127.0.0.1:8443"\ntarget = "api.example.test:443"\n'
)


def config_message(text: str) -> Callable[[Path], str]:
    def run(_: Path) -> str:
        try:
            parse_config(text, source="~/.config/mtls-sidecar/config.toml", base_dir=Path("/cfg"))
        except ConfigError as exc:
            return str(exc)
        return "(accepted)"

    return run


CONFIG_CASES = [
    Case("config", "broken TOML (unclosed string)", ("config.toml:3",), config_message('[identities.dev]\nrenew = "none"\nsubject = "CN=dev\n')),
    Case("config", "a misspelt key", ("lisen", "listen"), config_message(MINIMAL_ROUTE.replace("listen =", "lisen ="))),
    Case("config", "listening beyond loopback", ("0.0.0.0", "unsafe_listen"), config_message(MINIMAL_ROUTE.replace("127.0.0.1:8443", "0.0.0.0:8443"))),
    Case("config", "a port out of range", ("routes.api.listen", "port must be a number from 0 to 65535"), config_message(MINIMAL_ROUTE.replace("8443", "70000"))),
    Case("config", "a route naming an unknown identity", ("prod",), config_message(MINIMAL_ROUTE + 'identity = "prod"\n')),
    Case("config", "an unknown renewal provider", ("renew", "local-ca"), config_message(MINIMAL_ROUTE.replace('renew = "none"', 'renew = "letsencrypt"'))),
    Case("config", "a duration that is not one", ("connect_timeout",), config_message(MINIMAL_ROUTE + 'connect_timeout = "10 parsecs"\n')),
    Case("config", "renew_at outside (0, 1)", ("config.toml:3", "renew_at = 1.5", "between 0 and 1"), config_message('[identities.dev]\nrenew = "local-ca"\nrenew_at = 1.5\n')),
    Case("config", "an ACME port out of range", ("config.toml:4", "identities.dev.acme_http_port = 99999", "1-65535"), config_message('[identities.dev]\nrenew = "acme"\nacme_directory = "https://acme.example.test/directory"\nacme_http_port = 99999\n')),
    Case("config", "a provider without its required key", ("config.toml:1", "identities.dev.renew_command", 'renew = "command"'), config_message('[identities.dev]\nrenew = "command"\n')),
    Case("config", "a key of another provider", ("config.toml:4", "acme_directory", 'renew = "acme"', 'renew = "command"'), config_message('[identities.dev]\nrenew = "command"\nrenew_command = ["./renew.sh"]\nacme_directory = "https://acme.example.test/directory"\n')),
    Case("config", "a keyring entry without SERVICE/USERNAME", ("pkcs12_password_keyring", "SERVICE/USERNAME"), config_message('[identities.dev]\npkcs12_password_keyring = "dev"\n')),
    Case("config", "a password written into the config", ("pkcs12_password_env",), config_message(MINIMAL_ROUTE.replace('renew = "none"', 'renew = "none"\npkcs12_password_env = "hunter2 is my password"'))),
    Case("config", "active_identity not defined", ("active_identity",), config_message('active_identity = "prod"\n' + MINIMAL_ROUTE)),
    Case("config", "a pin that is not a base64 SHA-256", ("routes.api.pin_sha256", "openssl x509"), config_message(MINIMAL_ROUTE + 'pin_sha256 = ["d6a8c7a1"]\n')),
    Case("config", "a URI SAN pattern without a scheme", ("allowed_uri_sans", "spiffe://"), config_message(MINIMAL_ROUTE + 'allowed_uri_sans = ["example.test/api/*"]\n')),
    Case("config", "an IP address to allow that is a network", ("config.toml:7", "routes.api.allowed_ip_sans", "not an IP address"), config_message(MINIMAL_ROUTE + 'allowed_ip_sans = ["10.0.0.0/8"]\n')),
    Case("config", "allowed_common_names written as one string", ("config.toml:7", "routes.api.allowed_common_names", "array of strings"), config_message(MINIMAL_ROUTE + 'allowed_common_names = "api"\n')),
    Case("config", "an unknown revocation mode", ("revocation", "off, soft, hard"), config_message(MINIMAL_ROUTE + 'revocation = "strict"\n')),
    Case("config", "crl_file with revocation checking off", ("crl_file", 'revocation = "hard"'), config_message(MINIMAL_ROUTE + 'crl_file = "ca.crl"\n')),
    Case("config", "an identity name of 256 bytes", ("invalid name", "1 to 64 characters"), config_message(f'[identities.{"a" * 256}]\nrenew = "none"\n')),
    Case("config", "a route name that is a path", ("routes.\"../x\"", "invalid name", "beginning with a letter or digit"), config_message(MINIMAL_ROUTE.replace("[routes.api]", '[routes."../x"]'))),
    Case("config", "a route whose target is its own listen address", ("config.toml:6", "routes.api.target", "own listen address"), config_message(MINIMAL_ROUTE.replace("api.example.test:443", "127.0.0.1:8443"))),
    Case("config", "a route whose target is another route's listener", ("routes.b.target", "route api"), config_message(MINIMAL_ROUTE + '\n[routes.b]\nlisten = "127.0.0.1:8444"\ntarget = "localhost:8443"\n')),
    Case("config", "renew_env naming something that is not a variable", ("identities.dev.renew_env", "not an environment variable name"), config_message('[identities.dev]\nrenew = "command"\nrenew_command = ["./renew.sh"]\nrenew_env = ["A=B"]\n')),
    Case("config", "max_connections that is not a whole number", ("routes.api.max_connections", "1 to 1000000"), config_message(MINIMAL_ROUTE + "max_connections = 0\n")),
    Case("config", "a [[proxy.rules]] host that is no pattern (the second rule)", ("config.toml:8", "proxy.rules[1].hosts = '*.com'", "one left-most label"), config_message('[identities.dev]\nrenew = "none"\n\n[[proxy.rules]]\nhosts = ["a.example"]\n\n[[proxy.rules]]\nhosts = ["*.com"]\n')),
    Case("config", "a proxy rule whose connect is the proxy's own port", ("config.toml:6", "proxy.rules[0].connect", "tunnel into itself"), config_message('[identities.dev]\nrenew = "none"\n\n[[proxy.rules]]\nhosts = ["a.example"]\nconnect = "127.0.0.1:18888"\n')),
    Case("config", "an upstream proxy URL with the user and password in it", ("config.toml:7", "routes.api.upstream_proxy", "credentials do not belong in the config file", "upstream_proxy_auth_env"), config_message(MINIMAL_ROUTE + 'upstream_proxy = "http://alice:hunter2@proxy.corp.example:3128"\n')),
    Case("config", "an upstream proxy of a scheme we do not speak", ("routes.api.upstream_proxy = 'socks4://proxy.corp.example'", "http://, socks5:// or socks5h://"), config_message(MINIMAL_ROUTE + 'upstream_proxy = "socks4://proxy.corp.example"\n')),
    Case("config", "the proxy's user:password written where its variable's name goes", ("routes.api.upstream_proxy_auth_env", "not an environment variable name (value not shown)"), config_message(MINIMAL_ROUTE + 'upstream_proxy = "http://proxy.corp.example"\nupstream_proxy_auth_env = "alice:hunter2"\n')),
    Case("config", "the proxy listening beyond loopback", ("proxy.listen = '0.0.0.0:3128'", "unsafe_listen = true in [proxy]"), config_message('[identities.dev]\nrenew = "none"\n\n[proxy]\nlisten = "0.0.0.0:3128"\n\n[[proxy.rules]]\nhosts = ["a.example"]\n')),
    Case("config", "metrics_listen beyond loopback", ("config.toml:1", "metrics_listen = '0.0.0.0:9464'", "metrics_unsafe_listen = true"), config_message('metrics_listen = "0.0.0.0:9464"\n' + MINIMAL_ROUTE)),
    Case("config", "metrics_listen on a route's port", ("config.toml:1", "metrics_listen", "route api both listen on", "a port of their own"), config_message('metrics_listen = "127.0.0.1:8443"\n' + MINIMAL_ROUTE)),
]  # fmt: skip


# -- the keystore -----------------------------------------------------------------------------

_CA = CA("Catalogue CA")
_NOW = datetime.now(UTC)


def keystore_message(files: Callable[[], dict[str, bytes]], secrets: Secrets | None = None) -> Callable[[Path], str]:
    def run(scratch: Path) -> str:
        folder = scratch / "keystore" / "dev"
        folder.mkdir(parents=True)
        for name, data in files().items():
            (folder / name).write_bytes(data)
            (folder / name).chmod(0o644 if name == "loose.key" else 0o600)
        candidates = read_identity_folder(folder, secrets or Secrets())
        selection = select("dev", candidates, _NOW)
        return selection.why_unusable() if selection.selected is None else "(accepted)"

    return run


def _leaf(**kwargs: object) -> tuple[bytes, bytes]:
    leaf = _CA.client("dev", **kwargs)  # type: ignore[arg-type]
    return leaf.chain_pem(), key_pem(leaf.key)


def _expired() -> dict[str, bytes]:
    cert, key = _leaf(not_before=_NOW - timedelta(days=30), not_after=_NOW - timedelta(days=1))
    return {"old.crt": cert, "old.key": key}


def _not_yet() -> dict[str, bytes]:
    cert, key = _leaf(not_before=_NOW + timedelta(days=2), not_after=_NOW + timedelta(days=30))
    return {"future.crt": cert, "future.key": key}


def _mismatched() -> dict[str, bytes]:
    cert, _ = _leaf()
    _, other_key = _leaf()
    return {"dev.crt": cert, "dev.key": other_key}


def _p12(password: bytes) -> dict[str, bytes]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import pkcs12

    leaf = _CA.client("dev")
    data = pkcs12.serialize_key_and_certificates(
        b"dev", leaf.key, leaf.cert, None, serialization.BestAvailableEncryption(password)
    )
    return {"dev.p12": data}


def _encrypted_key() -> dict[str, bytes]:
    leaf = _CA.client("dev")
    return {"dev.crt": leaf.chain_pem(), "dev.key": key_pem(leaf.key, password=b"right")}


def _server_only() -> dict[str, bytes]:
    from cryptography.x509.oid import ExtendedKeyUsageOID

    leaf = _CA.issue("dev", eku=(ExtendedKeyUsageOID.SERVER_AUTH,))
    return {"dev.crt": leaf.chain_pem(), "dev.key": key_pem(leaf.key)}


def _p12_rounds(rounds: int) -> dict[str, bytes]:
    """A PKCS#12 file asking for `rounds` iterations: made at 2,000,000 (the cap), then its counts
    rewritten, so making it costs no more than reading one within the cap."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import pkcs12

    def der_int(n: int) -> bytes:
        body = n.to_bytes((n.bit_length() + 8) // 8, "big")
        return bytes([0x02, len(body)]) + body

    leaf = _CA.client("dev")
    encryption = (
        serialization.PrivateFormat.PKCS12.encryption_builder().kdf_rounds(2_000_000)
        .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC).build(b"right")
    )  # fmt: skip
    data = pkcs12.serialize_key_and_certificates(b"dev", leaf.key, leaf.cert, None, encryption)
    return {"dev.p12": data.replace(der_int(2_000_000), der_int(rounds))}


def _loose() -> dict[str, bytes]:
    cert, key = _leaf()
    return {"loose.crt": cert, "loose.key": key}


KEYSTORE_CASES = [
    Case("keystore", "malformed PEM (damaged base64)", ("malformed",), keystore_message(lambda: {"dev.pem": _leaf()[0].replace(b"M", b"!", 3) + _leaf()[1]})),
    Case("keystore", "not a PEM file at all", ("not a PEM file",), keystore_message(lambda: {"dev.crt": b"hello\n"})),
    Case("keystore", "a certificate without its key", ("no private key", "dev.key"), keystore_message(lambda: {"dev.crt": _leaf()[0]})),
    Case("keystore", "a key without its certificate", ("no certificate",), keystore_message(lambda: {"dev.key": _leaf()[1]})),
    Case("keystore", "a key that does not match the certificate", ("match",), keystore_message(_mismatched)),
    Case("keystore", "an expired certificate", ("expired",), keystore_message(_expired)),
    Case("keystore", "a certificate not valid yet", ("not valid until",), keystore_message(_not_yet)),
    Case("keystore", "PKCS#12 with the wrong password", ("wrong PKCS#12 password", "DEV_P12"), keystore_message(lambda: _p12(b"right"), Secrets(pkcs12_password=b"wrong", pkcs12_password_source="environment variable DEV_P12"))),
    Case("keystore", "PKCS#12 with no password configured", ("needs a password", "pkcs12_password_env"), keystore_message(lambda: _p12(b"right"))),
    Case("keystore", "an encrypted key with no password configured", ("encrypted",), keystore_message(_encrypted_key)),
    Case("keystore", "a certificate for servers only (no clientAuth)", ("clientAuth",), keystore_message(_server_only)),
    Case("keystore", "a private key others can read (0644)", ("chmod 600",), keystore_message(_loose)),
    Case("keystore", "1 MiB of unterminated BEGIN lines in a *.pem (read in linear time, off the event loop)", ("not a PEM file",), keystore_message(lambda: {"dev.pem": b"-----BEGIN CERTIFICATE-----\n" * 37_449})),
    Case("keystore", "PKCS#12 asking for 8,000,000 key-derivation iterations", ("refused", "8,000,000 iterations", "more than 2,000,000"), keystore_message(lambda: _p12_rounds(8_000_000), Secrets(pkcs12_password=b"right"))),
]  # fmt: skip


# -- the command line -----------------------------------------------------------------------


def cli_message(*args: str, setup: Callable[[Path], None] | None = None) -> Callable[[Path], str]:
    def run(scratch: Path) -> str:
        home = scratch / "home"
        home.mkdir(exist_ok=True)
        if setup is not None:
            setup(scratch)
        env = {**os.environ, "MTLS_SIDECAR_HOME": str(home), "XDG_RUNTIME_DIR": str(scratch)}
        done = subprocess.run(
            [sys.executable, "-m", "sidecar", *args], capture_output=True, text=True, env=env, timeout=60, cwd=scratch
        )
        return f"exit {done.returncode}: {done.stderr.strip()}"

    return run


def _broken_config(scratch: Path) -> None:
    (scratch / "home" / "config.toml").write_text('[identities.dev]\nrenew = "none"\nsubject = "CN=dev\n')


def _p12_file(scratch: Path) -> None:
    (scratch / "dev.p12").write_bytes(_p12(b"right")["dev.p12"])


TUNNEL = ("tunnel", "--listen", "127.0.0.1:0", "--target", "127.0.0.1:1", "--cert", "me.crt", "--key", "me.key")


def _client_pair(scratch: Path) -> None:
    CA("Catalogue CA").client("me").write_pair(scratch, "me")
    (scratch / "notes.txt").write_text("no certificate in here\n")


CLI_CASES = [
    Case("cli", "`run` with a broken config.toml", ("exit 2", "config.toml:3"), cli_message("run", setup=_broken_config)),
    Case("cli", "`status` with no daemon running", ("exit 3", "not running"), cli_message("status")),
    Case("cli", "`identity import` of a PKCS#12 file without its password", ("exit", "password"), cli_message("identity", "import", "dev.p12", "--name", "dev", setup=_p12_file)),
    Case("cli", "`identity import` of a file that does not exist", ("exit", "nothing.pem"), cli_message("identity", "import", "nothing.pem", "--name", "dev")),
    Case("cli", "`identity new ../../x`", ("exit 2", "NAME = '../../x': invalid name", "1 to 64 characters"), cli_message("identity", "new", "../../x")),
    Case("cli", "`identity new` with an absolute name", ("exit 2", "NAME = '/tmp': invalid name"), cli_message("identity", "new", "/tmp")),
    Case("cli", "`identity import --name ../../x`", ("exit 2", "--name = '../../x': invalid name"), cli_message("identity", "import", "dev.p12", "--name", "../../x", setup=_p12_file)),
    Case("cli", "`ca server ../../x --out D`", ("exit 2", "NAME = '../../x': not a server name", "DNS name"), cli_message("ca", "server", "../../x", "--out", "D")),
    Case("cli", "`tunnel` listening beyond loopback", ("exit 2", "unsafe"), cli_message("tunnel", "--listen", "0.0.0.0:0", "--target", "127.0.0.1:1", "--cert", "c", "--key", "k")),
    Case("cli", "`tunnel --cacert` naming a file that does not exist", ("exit 2", "--cacert", "missing.pem", "cannot load trusted CA certificates"), cli_message(*TUNNEL, "--cacert", "missing.pem", setup=_client_pair)),
    Case("cli", "`tunnel --cacert` with a file that holds no certificate", ("exit 2", "--cacert", "notes.txt", "cannot load trusted CA certificates"), cli_message(*TUNNEL, "--cacert", "notes.txt", setup=_client_pair)),
    Case("cli", "`tunnel --keystore` PKCS#12 with a wrong `--storepass`", ("exit 2", "--keystore", "dev.p12", "password"), cli_message("tunnel", "--listen", "127.0.0.1:0", "--target", "127.0.0.1:1", "--keystore", "dev.p12", "--storepass", "wrong", setup=_p12_file)),
    Case("cli", "`tunnel` to a name that does not resolve", ("exit 1", "no-such-host.invalid", "--skip-resolve"), cli_message("tunnel", "--listen", "127.0.0.1:0", "--target", "no-such-host.invalid:443", "--cert", "me.crt", "--key", "me.key", setup=_client_pair)),
    Case("cli", "`tunnel --keystore` together with `--cert`", ("exit 2", "--keystore and --cert cannot be used together"), cli_message(*TUNNEL, "--keystore", "dev.p12", setup=_client_pair)),
    Case("cli", "`tunnel --proxy` together with `--connect-proxy`", ("exit 2", "--connect-proxy", "--proxy", "not allowed with"), cli_message(*TUNNEL, "--proxy", "http://127.0.0.1:1", "--connect-proxy", "http://127.0.0.1:1")),
]  # fmt: skip


# -- at run time: servers that misbehave ----------------------------------------------------


@contextlib.contextmanager
def _daemon_with_route(
    scratch: Path, pki: Pki, port: int, **route: object
) -> Iterator[Callable[[], dict[str, object]]]:
    from tests.daemon_runner import DaemonThread

    home = scratch / "home"
    pki.enroll(home / "keystore", "dev", "dev-1", cn="dev")
    config = write_config(
        home / "config.toml",
        identities={"dev": {"renew": "none"}},
        routes={"svc": {"listen": "127.0.0.1:0", "target": f"127.0.0.1:{port}", "server_name": "localhost",
                        "ca_file": str(pki.server_ca_file), **route}},
    )  # fmt: skip
    with DaemonThread(config, resolve_places(home=home)) as daemon:
        with contextlib.suppress(OSError), daemon.connect("svc", timeout=10) as sock:
            sock.sendall(b"hello\n")
            sock.shutdown(socket.SHUT_WR)
            recv_all(sock)
        yield lambda: daemon.status()["routes"]["svc"]


def runtime_message(server_kind: str, **route: object) -> Callable[[Path], str]:
    def run(scratch: Path) -> str:
        from tests.tlsserver import ScriptedTLSServer

        pki = Pki.create(scratch / "pki")
        with contextlib.ExitStack() as stack:
            if server_kind == "refused":
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", 0))
                    port = probe.getsockname()[1]  # closed again: nothing listens there
            else:
                cert, key = pki.server_cert, pki.server_key
                client_ca: Path | None = pki.client_ca_file
                if server_kind == "untrusted":
                    cert, key = CA("Rogue CA").server("localhost").write_pair(scratch / "rogue", "s")
                if server_kind == "rejects":
                    client_ca = CA("Some Other Client CA").write_root(scratch / "other-ca.pem")
                server = stack.enter_context(
                    ScriptedTLSServer(cert=cert, key=key, client_ca=client_ca, require_client_cert=True,
                                      mode="plaintext" if server_kind == "plaintext" else "echo")
                )  # fmt: skip
                port = server.port
            status = stack.enter_context(_daemon_with_route(scratch, pki, port, **route))()
        failures = status["failures"]
        assert isinstance(failures, dict)
        return f"{', '.join(failures)}: {status['last_error']}"

    return run


def _port_taken(scratch: Path) -> str:
    from tests.daemon_runner import DaemonThread

    pki = Pki.create(scratch / "pki")
    home = scratch / "home"
    pki.enroll(home / "keystore", "dev", "dev-1", cn="dev")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        config = write_config(
            home / "config.toml",
            identities={"dev": {"renew": "none"}},
            routes={
                "svc": {"listen": f"127.0.0.1:{port}", "target": "127.0.0.1:1", "ca_file": str(pki.server_ca_file)}
            },
        )
        with DaemonThread(config, resolve_places(home=home)) as daemon:
            return str(daemon.status()["routes"]["svc"]["last_error"])


def _revoked_in_crl_file(scratch: Path) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    from tests.tlsserver import ScriptedTLSServer

    pki = Pki.create(scratch / "pki")
    now = datetime.now(UTC)
    entry = x509.RevokedCertificateBuilder().serial_number(pki.server.cert.serial_number).revocation_date(now).build()
    crl = (
        x509.CertificateRevocationListBuilder().issuer_name(pki.server_ca.root.subject).last_update(now)
        .next_update(now + timedelta(days=1)).add_revoked_certificate(entry).sign(pki.server_ca.root_key, hashes.SHA256())
    )  # fmt: skip
    crl_file = scratch / "server-ca.crl"
    crl_file.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(
            ScriptedTLSServer(cert=pki.server_cert, key=pki.server_key, client_ca=pki.client_ca_file,
                              require_client_cert=True, mode="echo")
        )  # fmt: skip
        status = stack.enter_context(
            _daemon_with_route(scratch, pki, server.port, revocation="hard", crl_file=str(crl_file))
        )()
    failures = status["failures"]
    assert isinstance(failures, dict)
    return f"{', '.join(failures)}: {status['last_error']}"


def _ca_file_rewritten(scratch: Path) -> str:
    """A route's ca_file replaced by another CA's while the daemon runs: new connections use it."""
    from tests.daemon_runner import DaemonThread
    from tests.tlsserver import ScriptedTLSServer
    from tests.waiting import wait_until

    pki = Pki.create(scratch / "pki")
    ca_file = scratch / "trust" / "server-ca.pem"
    ca_file.parent.mkdir()
    ca_file.write_bytes(pki.server_ca_file.read_bytes())
    home = scratch / "home"
    pki.enroll(home / "keystore", "dev", "dev-1", cn="dev")
    with ScriptedTLSServer(cert=pki.server_cert, key=pki.server_key, client_ca=pki.client_ca_file,
                           require_client_cert=True, mode="echo") as server:  # fmt: skip
        config = write_config(
            home / "config.toml",
            identities={"dev": {"renew": "none"}},
            routes={"svc": {"listen": "127.0.0.1:0", "target": f"127.0.0.1:{server.port}", "server_name": "localhost",
                            "ca_file": str(ca_file)}},
        )  # fmt: skip
        with DaemonThread(config, resolve_places(home=home)) as daemon:
            (scratch / "other.pem").write_bytes(CA("Another Server CA").root_pem())
            os.replace(scratch / "other.pem", ca_file)

            def refused() -> bool:
                with contextlib.suppress(OSError), daemon.connect("svc", timeout=10) as sock:
                    sock.sendall(b"hello\n")
                    sock.shutdown(socket.SHUT_WR)
                    recv_all(sock)
                return bool(daemon.status()["routes"]["svc"]["failures"])

            wait_until(refused, timeout=10, what="the rewritten ca_file to be used")
            status = daemon.status()["routes"]["svc"]
    return f"{', '.join(status['failures'])}: {status['last_error']}"


def _subject_with_escapes(scratch: Path) -> str:
    """A server certificate whose subject CN holds a newline and terminal escapes, on a pinned
    route: the refusal names the certificate by its subject, escaped."""
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from tests.tlsserver import ScriptedTLSServer

    pki = Pki.create(scratch / "pki")
    cn = "evil\nWARNING forged line \x1b[2J\x1b]0;title\x07"
    leaf = pki.server_ca.issue(cn, dns=["localhost"], ips=["127.0.0.1"], eku=(ExtendedKeyUsageOID.SERVER_AUTH,))
    cert, key = leaf.write_pair(scratch / "evil", "server")
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(
            ScriptedTLSServer(cert=cert, key=key, client_ca=pki.client_ca_file, require_client_cert=True, mode="echo")
        )
        status = stack.enter_context(
            _daemon_with_route(scratch, pki, server.port, pin_sha256=["47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="])
        )()
    failures = status["failures"]
    assert isinstance(failures, dict)
    return f"{', '.join(failures)}: {status['last_error']}"


def _over_the_cap(scratch: Path) -> str:
    """A third connection while two are open on a route with max_connections = 2."""
    from tests.tlsserver import ScriptedTLSServer

    pki = Pki.create(scratch / "pki")
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(
            ScriptedTLSServer(cert=pki.server_cert, key=pki.server_key, client_ca=pki.client_ca_file,
                              require_client_cert=True, mode="echo")
        )  # fmt: skip
        home = scratch / "home"
        pki.enroll(home / "keystore", "dev", "dev-1", cn="dev")
        config = write_config(
            home / "config.toml",
            identities={"dev": {"renew": "none"}},
            routes={"svc": {"listen": "127.0.0.1:0", "target": f"127.0.0.1:{server.port}", "server_name": "localhost",
                            "ca_file": str(pki.server_ca_file), "max_connections": 2}},
        )  # fmt: skip
        from tests.daemon_runner import DaemonThread

        daemon = stack.enter_context(DaemonThread(config, resolve_places(home=home)))
        held = [stack.enter_context(daemon.connect("svc")) for _ in range(2)]
        for sock in held:
            sock.sendall(b"hi\n")
            sock.recv(3)
        with daemon.connect("svc") as third:
            recv_all(third)
        status = daemon.status()["routes"]["svc"]
    failures = status["failures"]
    assert isinstance(failures, dict)
    return f"{', '.join(failures)}: {status['last_error']}"


RUNTIME_CASES = [
    Case("runtime", "a server whose certificate our trust does not cover", ("server_untrusted", "ca_file"), runtime_message("untrusted")),
    Case("runtime", "a server that presents the wrong name", ("name_mismatch", "not valid for 'other.example.test'"), runtime_message("trusted", server_name="other.example.test")),
    Case("runtime", "a server that rejects our client certificate", ("server_rejected_certificate",), runtime_message("rejects")),
    Case("runtime", "nothing listening at the target", ("connect", "refused"), runtime_message("refused")),
    Case("runtime", "a plaintext server where TLS was expected", ("not_tls",), runtime_message("plaintext")),
    Case("runtime", "a listen port already taken", ("already in use",), _port_taken),
    Case("runtime", "a server key that is not pinned", ("pin_mismatch", "not pinned"), runtime_message("trusted", pin_sha256=["47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="])),
    Case("runtime", "a server without an allowed URI SAN", ("uri_san_not_allowed", "spiffe://example.test/api/*"), runtime_message("trusted", allowed_uri_sans=["spiffe://example.test/api/*"])),
    Case("runtime", "a server whose CN and SANs the allow-list does not hold", ("server_not_allowed", "CN localhost", "allowed_common_names = ['api']"), runtime_message("trusted", allowed_common_names=["api"], allowed_ip_sans=["10.0.0.5"])),
    Case("runtime", "a server certificate revoked in crl_file", ("server_certificate_revoked", "CRL file"), _revoked_in_crl_file),
    Case("runtime", 'revocation = "hard" and nowhere to ask', ("revocation_unknown", 'revocation = "hard"'), runtime_message("trusted", revocation="hard")),
    Case("runtime", "a server certificate whose subject holds a newline and terminal escapes", ("pin_mismatch", "CN=evil\\nWARNING forged line \\x1b[2J\\x1b]0\\;title\\x07"), _subject_with_escapes),
    Case("runtime", "a route's ca_file rewritten to another CA while running (new connections use it)", ("server_untrusted", "ca_file"), _ca_file_rewritten),
    Case("runtime", "a third connection on a route with max_connections = 2", ("too_many_connections", "routes.svc.max_connections"), _over_the_cap),
]  # fmt: skip

# -- the control API: bodies the CLI never sends -------------------------------------------


def api_message(method: str, target: str, body: bytes) -> Callable[[Path], str]:
    def run(scratch: Path) -> str:
        from tests.controlhttp import request

        pki = Pki.create(scratch / "pki")
        with _daemon_with_route(scratch, pki, 9):
            status, answer = request(resolve_places(home=scratch / "home").control_socket, method, target, body)
        field = f" (field {answer['field']})" if answer.get("field") else ""
        return f"{status}{field}: {answer['error']}"

    return run


def _two_adds_one_on_a_taken_port(scratch: Path) -> str:
    """Two route adds at the same moment, the second on a port another socket holds."""
    import json
    import threading

    from tests.controlhttp import request

    pki = Pki.create(scratch / "pki")
    with socket.socket() as taken, _daemon_with_route(scratch, pki, 9):
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        daemon_socket = resolve_places(home=scratch / "home").control_socket
        bodies = {
            "good": {"name": "good", "listen": "127.0.0.1:0", "target": "127.0.0.1:9"},
            "bad": {"name": "bad", "listen": f"127.0.0.1:{taken.getsockname()[1]}", "target": "127.0.0.1:9"},
        }
        answers: dict[str, tuple[int, dict[str, str]]] = {}
        start = threading.Barrier(2)

        def add(name: str) -> None:
            start.wait()
            answers[name] = request(daemon_socket, "POST", "/v1/routes", json.dumps(bodies[name]).encode())

        threads = [threading.Thread(target=add, args=(name,)) for name in bodies]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        routes = request(daemon_socket, "GET", "/v1/routes", b"")[1]
    (good, _), (bad, refused) = answers["good"], answers["bad"]
    return f"good: {good}; bad: {bad} {refused['error']}; routes afterwards: {', '.join(sorted(routes))}"


API_CASES = [
    Case("api", "a 100,000-character route name", ("400 (field name)", "invalid name", "1 to 64 characters"), api_message("POST", "/v1/routes", b'{"name": "' + b"r" * 100_000 + b'", "listen": "127.0.0.1:0", "target": "127.0.0.1:9"}')),
    Case("api", "JSON nested 100,000 deep", ("400", "nested too deeply"), api_message("POST", "/v1/routes", b'{"name": "x", "alpn": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")),
    Case("api", "`null` in an alpn list", ("400 (field alpn)", "item 1 is null"), api_message("PATCH", "/v1/routes/svc", b'{"alpn": ["h2", null]}')),
    Case("api", "an object where a string goes", ("400 (field target)", "got an object"), api_message("PATCH", "/v1/routes/svc", b'{"target": {"host": "x"}}')),
    Case("api", "two route adds at once, one on a taken port", ("good: 201", "bad: 409", "routes afterwards: good, svc"), _two_adds_one_on_a_taken_port),
]  # fmt: skip

# -- the proxy port: clients that ask for what it does not serve ------------------------------


def _client_hello() -> bytes:
    """A real TLS ClientHello, as a client that does its own TLS sends it first."""
    import ssl

    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="svc.test")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def _shown(answer: bytes) -> str:
    """What the client was answered: an HTTP answer's status line and body, else the bytes."""
    if not answer:
        return "nothing (the connection closed)"
    if answer.startswith(b"HTTP/"):
        head, _, body = answer.partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0].decode()
        return f"{status} {body.decode(errors='replace').strip()}".strip()
    return repr(answer)


def proxy_message(talk: Callable[[socket.socket], bytes]) -> Callable[[Path], str]:
    """A daemon whose proxy has one rule (svc.test, port 443, reached over mTLS at a real server);
    one client connection that `talk`s: what it was answered, and what the proxy's status counted."""

    def run(scratch: Path) -> str:
        from tests.daemon_runner import DaemonThread
        from tests.tlsserver import ScriptedTLSServer
        from tests.waiting import wait_until

        pki = Pki.create(scratch / "pki", "svc.test")
        home = scratch / "home"
        pki.enroll(home / "keystore", "dev", "dev-1", cn="dev")
        with ScriptedTLSServer(cert=pki.server_cert, key=pki.server_key, client_ca=pki.client_ca_file,
                               require_client_cert=True, mode="echo") as server:  # fmt: skip
            rule = {"name": "svc", "hosts": ["svc.test"], "ports": [443], "ca_file": str(pki.server_ca_file),
                    "connect": f"127.0.0.1:{server.port}"}  # fmt: skip
            config = write_config(
                home / "config.toml",
                identities={"dev": {"renew": "none"}},
                routes={},
                proxy={"listen": "127.0.0.1:0", "rules": [rule]},
            )
            with DaemonThread(config, resolve_places(home=home)) as daemon:
                port = int(daemon.status()["proxy"]["listen"].rsplit(":", 1)[1])
                with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                    answer = talk(sock)

                def counted() -> bool:
                    proxy = daemon.status()["proxy"]
                    return bool(proxy["refused"] or proxy["rules"][0]["failures"])

                wait_until(counted, timeout=10, what="the proxy to count the refusal")
                proxy = daemon.status()["proxy"]
        if proxy["refused"]:
            where = f"{', '.join(proxy['refused'])}: {proxy['last_refusal']}"
        else:
            rule_status = proxy["rules"][0]
            where = f"rule svc {', '.join(rule_status['failures'])}: {rule_status['last_error']}"
        return f"answered {_shown(answer)}; counted {where}"

    return run


def _sends(data: bytes) -> Callable[[socket.socket], bytes]:
    def talk(sock: socket.socket) -> bytes:
        sock.sendall(data)
        return recv_all(sock)

    return talk


def _malformed_socks5(sock: socket.socket) -> bytes:
    sock.sendall(b"\x05\x01\x00")  # no authentication, please
    chosen = sock.recv(2)
    sock.sendall(b"\x05\x01\x00\x09\x00\x00\x00\x00\x01\xbb")  # CONNECT to address type 9
    return chosen + recv_all(sock)


def _client_hello_inside_connect(sock: socket.socket) -> bytes:
    sock.sendall(b"CONNECT svc.test:443 HTTP/1.1\r\nHost: svc.test:443\r\n\r\n")
    answer = b""
    while b"\r\n\r\n" not in answer and (chunk := sock.recv(4096)):
        answer += chunk
    sock.sendall(_client_hello())
    return answer + recv_all(sock)


PROXY_CASES = [
    Case("proxy", "binary garbage on the proxy port", ("nothing (the connection closed)", "protocol_mismatch", "neither HTTP nor SOCKS"), proxy_message(_sends(b"\x00\x01\x02 garbage\r\n\r\n"))),
    Case("proxy", "a TLS ClientHello to the proxy port itself (https:// proxy URL)", ("400 Bad Request", "protocol_mismatch", "not https://"), proxy_message(_sends(_client_hello()))),
    Case("proxy", "a malformed SOCKS5 request (address type 9)", ("\\x05\\x00\\x05\\x08", "protocol_mismatch", "unknown SOCKS5 address type 9"), proxy_message(_malformed_socks5)),
    Case("proxy", "a TLS ClientHello inside CONNECT (a client doing its own TLS)", ("200 Connection established", "client_speaks_tls", "began its own TLS", "passthrough = true"), proxy_message(_client_hello_inside_connect)),
    Case("proxy", "an http:// destination outside the rules", ("403 Forbidden", "proxy_not_allowed", "no open relay", "elsewhere.example"), proxy_message(_sends(b"GET http://elsewhere.example/ HTTP/1.1\r\nHost: elsewhere.example\r\n\r\n"))),
    Case("proxy", "a SOCKS5 destination outside the rules", ("\\x05\\x02", "proxy_not_allowed", "elsewhere.example:443"), proxy_message(_sends(b"\x05\x01\x00\x05\x01\x00\x03\x11elsewhere.example\x01\xbb"))),
    Case("proxy", "a CONNECT to a port the rule leaves out", ("403 Forbidden", "proxy_not_allowed", "only on port(s) 443"), proxy_message(_sends(b"CONNECT svc.test:5432 HTTP/1.1\r\nHost: svc.test:5432\r\n\r\n"))),
]  # fmt: skip

# -- folders and sockets: ours, or refused ---------------------------------------------------------

NOBODY = 65534  # Debian's `nobody`: another user, without making one


def _runtime_folder_of_nobody(scratch: Path) -> None:
    run = scratch / "home" / "run"
    run.mkdir(mode=0o700)
    os.chown(run, NOBODY, NOBODY)


def _runtime_folder_open_to_all(scratch: Path) -> None:
    run = scratch / "home" / "run"
    run.mkdir()
    run.chmod(0o777)


_LISTEN_AS_NOBODY = "import socket, sys, time\ns = socket.socket(socket.AF_UNIX)\ns.bind(sys.argv[1])\ns.listen()\nprint('ready', flush=True)\ntime.sleep(30)\n"


def _control_socket_of_nobody(scratch: Path) -> str:
    """`status` where the control socket is served by another user's process."""
    import shutil

    home = scratch / "home"
    (home / "run").mkdir(parents=True, mode=0o700)
    theirs = Path(tempfile.mkdtemp(prefix="mtls-nobody-"))
    try:
        theirs.chmod(0o777)
        fake = subprocess.Popen(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable, "-c", _LISTEN_AS_NOBODY, str(theirs / "s.sock")],
            stdout=subprocess.PIPE, text=True, cwd="/",
        )  # fmt: skip
        try:
            assert fake.stdout is not None and fake.stdout.readline().strip() == "ready"
            os.rename(theirs / "s.sock", home / "run" / "control.sock")
            return cli_message("status")(scratch)
        finally:
            fake.kill()
            fake.wait()
            assert fake.stdout is not None
            fake.stdout.close()
    finally:
        shutil.rmtree(theirs, ignore_errors=True)


def _unix_route_on(make: Callable[[Path], object]) -> Callable[[Path], str]:
    """POST /v1/routes with a unix: listen path where something already is."""

    def run(scratch: Path) -> str:
        import json

        from tests.controlhttp import request

        pki = Pki.create(scratch / "pki")
        path = scratch / "in-the-way"
        with contextlib.ExitStack() as stack:
            held = make(path)
            if isinstance(held, socket.socket):
                stack.enter_context(held)
            stack.enter_context(_daemon_with_route(scratch, pki, 9))
            body = {"name": "db", "listen": f"unix:{path}", "target": "127.0.0.1:9"}
            control = resolve_places(home=scratch / "home").control_socket
            status, answer = request(control, "POST", "/v1/routes", json.dumps(body).encode())
        assert path.exists()
        return f"{status}: {answer['error']}"

    return run


def _live_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen()
    return sock


FILES_CASES = [
    Case("files", "a runtime folder of another user", ("exit 1", "belongs to another user (uid 65534)", "nothing was sent"), cli_message("status", setup=_runtime_folder_of_nobody)),
    Case("files", "a runtime folder others may write", ("exit 1", "writable by other users (mode 0777)", "chmod 700"), cli_message("status", setup=_runtime_folder_open_to_all)),
    Case("files", "a control socket served by another user", ("exit 1", "served by another user (uid 65534", "nothing was sent"), _control_socket_of_nobody),
    Case("files", "a unix: route on another program's live socket", ("409", "another program listens on that socket", "left alone"), _unix_route_on(_live_socket)),
    Case("files", "a unix: route on a file that is not a socket", ("409", "not a socket", "left alone", "move it away"), _unix_route_on(lambda path: path.write_text("notes\n"))),
]  # fmt: skip


CASES = CONFIG_CASES + KEYSTORE_CASES + CLI_CASES + RUNTIME_CASES + API_CASES + PROXY_CASES + FILES_CASES


# -- collecting and rendering ---------------------------------------------------------------

_TIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d(:\d\d)? UTC")
_PORT = re.compile(r"(127\.0\.0\.1|localhost|\[::1\]):\d+")
_TMP = re.compile(r"/tmp/[^\s'\",;)]*?/scratch-\d+")


def normalise(message: str, scratch: Path) -> str:
    """Strip what changes from run to run (paths, ports, times), so the document is stable."""
    text = message.replace(str(scratch), "…")
    text = _TMP.sub("…", text)
    text = _TIME.sub("<time>", text)
    text = _PORT.sub(r"\1:PORT", text)
    return " ".join(text.split())


def collect(root: Path) -> list[Row]:
    rows = []
    for number, case in enumerate(CASES):
        scratch = root / f"scratch-{number}"
        scratch.mkdir(parents=True)
        rows.append(Row(case, normalise(case.run(scratch), scratch)))
    return rows


def render(rows: list[Row]) -> str:
    lines = [
        "# Bad input, and what you are told",
        "",
        "Every row is a real run, made by `tests/bad_input_catalogue.py` and checked by",
        "`tests/test_bad_input_catalogue.py` (which fails when this file and the messages",
        "disagree). Paths under the test's scratch folder show as `…`, ports as `PORT`, times as",
        "`<time>`. Regenerate with `python3 -m tests.bad_input_catalogue > docs/bad-inputs.md`.",
        "",
        "Other refusals are tested elsewhere: other OS users (`tests/test_other_user.py`),",
        "server pins, URI SANs and revocation (`tests/test_e2e_policy.py`), faults of targets and",
        "of the disk (`tests/test_faults*.py`).",
        "",
    ]
    for area, title in (("config", "config.toml"), ("keystore", "The keystore"), ("cli", "The command line"),
                        ("runtime", "At run time (reason counted in status: message)"),
                        ("api", "The control API (status, field: answer)"),
                        ("proxy", "The proxy port (what the client is answered; what status counts)"),
                        ("files", "Folders and sockets: ours, or refused")):  # fmt: skip
        lines += [f"## {title}", "", "| bad input | message |", "|---|---|"]
        for row in rows:
            if row.case.area == area:
                message = row.message.replace("|", "\\|")
                lines.append(f"| {row.case.what} | {message} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        os.environ.setdefault("XDG_RUNTIME_DIR", folder)
        sys.stdout.write(render(collect(Path(folder))))
