"""`protocol = "mysql"`: TLS inside the MySQL / MariaDB handshake. Pure.

MySQL does not start TLS on connect. The server speaks first with its greeting (the initial
handshake packet, protocol 10), whose capability flags say whether it offers TLS
(`CLIENT_SSL`). A client that wants TLS answers with an SSLRequest (the first 32 bytes of its
HandshakeResponse, `CLIENT_SSL` set, sequence id 1), both sides start TLS on the same
connection, and the client sends its whole HandshakeResponse again through TLS, as packet 2.

The stage does that on the client's behalf:

    server ──greeting──▶ stage ──greeting, CLIENT_SSL cleared──▶ local client
    local client ──HandshakeResponse (seq 1)──▶ stage (held)
    stage ──SSLRequest (seq 1), raw──▶ server; the connection runs the mTLS handshake
    stage ──HandshakeResponse, CLIENT_SSL set (seq 2), through TLS──▶ server

The local client believes it is on plaintext, so its packet numbers are one behind the
server's: until the connection phase ends (an OK or ERR packet from the server), the stage
renumbers every packet, client → server +1 and server → client −1, through auth-switch
(0xFE), extra auth data (0x01) and every other round of the auth plugin. Packets are framed
(3-byte length, 1-byte sequence id), so pieces and several packets in one read are all the
same to it. An ERR ends the connection (the server hangs up after it). After OK, bytes pass
untouched (each command starts again at sequence id 0 on both links); the stage only reads
the headers of the client's packets (or compressed frames), to close the connection itself
after COM_QUIT: servers answer it by closing TCP without TLS close_notify, which would
otherwise count as a cut-off answer.

Failures reach the client as a MySQL ERR packet (error 1043, "bad handshake", SQLSTATE 08S01)
that says `mtls-sidecar: <reason>; fix: <what to do>`, at a moment the client reads one:
before the greeting it is the first packet, without SQLSTATE, as servers send "Too many
connections" (clients print it); after the greeting, once the client has sent its
HandshakeResponse. A server without `CLIENT_SSL` is the failure `server_offers_no_tls`; an ERR
the server sends before TLS (too many connections, host blocked) reaches the client as the
server wrote it. (Not the client libraries' own codes 2003 or 2026: libmariadb reports a
server's ERR with one of those as a malformed packet.)

Without `local_tls` the client gets a greeting without `CLIENT_SSL`, so it must not insist on
TLS (`mariadb --skip-ssl`, `mysql --ssl-mode=DISABLED` or the default PREFERRED, PyMySQL
without `ssl`). Clients that insist on TLS see that and give up by themselves ("SSL is
required, but the server does not support it"); one that sends an SSLRequest all the same is
refused, named, with local_tls as the fix.

With `local_tls = true` the greeting keeps `CLIENT_SSL`, and a client that wants TLS gets it
from the sidecar (a dev-CA certificate for localhost, 127.0.0.1 and ::1):

    local client ──SSLRequest (seq 1)──▶ stage ──SSLRequest (seq 1), raw──▶ server; StartTLS
    stage: StartLocalTLS(the client's bytes past its SSLRequest: its ClientHello, sent at once)
    local client ══HandshakeResponse (seq 2), through its TLS══▶ stage (held until our TLS is up)
    stage ──HandshakeResponse (seq 2), through TLS──▶ server

Both links then carry the same sequence ids (greeting 0, SSLRequest 1, response 2), so the
renumbering described above is the identity. The two handshakes run side by side; the client's
response may come before or after ours is done. A client that does not ask for TLS on such a
route is served in plaintext as above.

Authentication plugins over the plaintext local hop (with local_tls the client's hop is TLS,
and it behaves as it would towards a TLS server: caching_sha2_password's full authentication
sends the password in cleartext through both TLS links, and the stage passes it as it is):

- `mysql_native_password` and MariaDB's `ed25519` (and any other challenge–response plugin)
  work as they are: the client answers the server's challenge, TLS or not.
- `caching_sha2_password` (the MySQL 8 default) works at once while the server has the user
  in its cache ("fast auth"). Its full authentication (the first login after the server
  started, or after FLUSH PRIVILEGES) sends the password: in cleartext when the client's
  connection is TLS, RSA-encrypted with the server's public key otherwise. Here the server's
  side is TLS and expects cleartext, while the client, on plaintext, will only send an
  encrypted password. So the stage stands in for the server's key: when the client asks for
  the public key (`mysql --get-server-public-key`, Connector/J `allowPublicKeyRetrieval=true`,
  PyMySQL always), it gets a key the stage made for this connection; the stage decrypts the
  password and sends it to the server through TLS, as a TLS client would. A client given the
  server's real key file (`--server-public-key-path`) encrypts for the server, which then
  refuses it: do not give it one. A client with neither fails with "Authentication requires
  secure connection". The password is never logged.
- `sha256_password` (deprecated) is not translated: use `caching_sha2_password`.
- `mysql_clear_password` (PAM, LDAP) sends the password in cleartext on the loopback hop
  (the client needs `--enable-cleartext-plugin`); the remote hop is TLS.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from sidecar.causes import Cause, Fault
from sidecar.config import RouteSpec
from sidecar.stages import (
    Close,
    Command,
    EndLocal,
    EndRemote,
    Refuse,
    SendLocal,
    SendRemote,
    StartLocalTLS,
    StartTLS,
)

# Capability flags (the greeting's and the HandshakeResponse's first four bytes).
CLIENT_COMPRESS = 0x0000_0020
CLIENT_PROTOCOL_41 = 0x0000_0200
CLIENT_SSL = 0x0000_0800
CLIENT_SECURE_CONNECTION = 0x0000_8000
CLIENT_PLUGIN_AUTH = 0x0008_0000
CLIENT_ZSTD_COMPRESSION = 0x0400_0000
COMPRESSED = CLIENT_COMPRESS | CLIENT_ZSTD_COMPRESSION  # packets are wrapped in compressed frames after OK

HEADER = 4  # 3-byte little-endian payload length, 1-byte sequence id
COMPRESSED_HEADER = 7  # a compressed frame's: length, sequence id, 3-byte uncompressed length
MAX_GREETING = 4096  # real greetings are ~100 bytes; a non-MySQL server's first bytes read as a huge length
MAX_RESPONSE = 1 << 20  # a HandshakeResponse with connection attributes is a few hundred bytes
SSL_REQUEST_LENGTH = 32  # capability flags, max packet size, charset, 23 reserved bytes
SCRAMBLE_LENGTH = 20
CHECK_USER = b"mtls-sidecar-check"  # the user name `check` gives, in the local client's place
MAX_PACKET = 1 << 24  # a HandshakeResponse's max packet size, as clients send it (16 MiB)
UTF8MB4 = 45  # utf8mb4_general_ci: the character set `check` names

OK, ERR, AUTH_SWITCH, AUTH_MORE_DATA = 0x00, 0xFF, 0xFE, 0x01
COM_QUIT = 0x01
CACHING_SHA2 = "caching_sha2_password"
PERFORM_FULL_AUTH = b"\x01\x04"  # caching_sha2_password's AuthMoreData: "send the password"
FAST_AUTH_OK = b"\x01\x03"  # ... and "fast auth passed" (OK follows)
REQUEST_PUBLIC_KEY = b"\x02"

SQLSTATE = "08S01"  # communication link failure
# ER_HANDSHAKE_ERROR, a server's code. Not the client libraries' own 2003 (cannot connect) or
# 2026 (SSL connection error): libmariadb takes those from a server for a malformed packet.
ER_HANDSHAKE_ERROR = 1043


def packet(seq: int, payload: bytes) -> bytes:
    return struct.pack("<I", len(payload))[:3] + bytes([seq & 0xFF]) + payload


def next_packet(buffer: bytes) -> tuple[int, bytes, bytes] | None:
    """The first whole packet in `buffer` as (sequence id, payload, the rest); None until it is whole."""
    if len(buffer) < HEADER:
        return None
    end = HEADER + int.from_bytes(buffer[:3], "little")
    if len(buffer) < end:
        return None
    return buffer[3], buffer[HEADER:end], buffer[end:]


def split_packets(buffer: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """The whole packets at the start of `buffer` as (sequence id, payload), and the rest."""
    found: list[tuple[int, bytes]] = []
    while (first := next_packet(buffer)) is not None:
        seq, payload, buffer = first
        found.append((seq, payload))
    return found, buffer


def err_payload(code: int, message: str, sqlstate: str | None = SQLSTATE) -> bytes:
    """An ERR packet's payload, as clients print it: `ERROR code (sqlstate): message`. Before the
    greeting, without SQLSTATE (as servers send "Too many connections"): MySQL's client reads
    the SQLSTATE marker only once it knows the server speaks protocol 4.1."""
    marker = b"#" + sqlstate.encode() if sqlstate else b""
    return b"\xff" + struct.pack("<H", code) + marker + message.encode()


@dataclass(frozen=True)
class Greeting:
    """The parts of a server's initial handshake packet (protocol 10) the stage needs."""

    version: str
    capabilities: int
    scramble: bytes  # the auth plugin's challenge (20 bytes with 4.1+ servers)
    plugin: str  # the server's default auth plugin ("" when it names none)
    flags_at: int  # where the lower two capability bytes are in the payload


def parse_greeting(payload: bytes) -> Greeting:
    """Raises ValueError for anything that is not a protocol-10 greeting."""
    if not payload or payload[0] != 10:
        raise ValueError(f"not a MySQL protocol 10 greeting (first byte {payload[:1].hex() or 'none'})")
    end = payload.find(b"\0", 1)
    if end < 0 or len(payload) < end + 16:
        raise ValueError("MySQL greeting cut short")
    version = payload[1:end].decode("utf-8", "replace")
    pos = end + 1 + 4  # after the connection id
    scramble = payload[pos : pos + 8]
    flags_at = pos + 9  # after the 8 challenge bytes and a filler byte
    capabilities = int.from_bytes(payload[flags_at : flags_at + 2], "little")
    plugin = ""
    rest = flags_at + 2
    if len(payload) >= rest + 16:  # charset, status, upper flags, challenge length, 10 reserved bytes
        capabilities |= int.from_bytes(payload[rest + 3 : rest + 5], "little") << 16
        challenge_length = payload[rest + 5]
        pos = rest + 16
        if capabilities & CLIENT_SECURE_CONNECTION:
            more = max(13, challenge_length - 8)
            scramble += payload[pos : pos + more]
            pos += more
        if capabilities & CLIENT_PLUGIN_AUTH:
            plugin = payload[pos:].split(b"\0", 1)[0].decode("ascii", "replace")
    return Greeting(version, capabilities, scramble[:SCRAMBLE_LENGTH], plugin, flags_at)


def without_ssl(payload: bytes, greeting: Greeting) -> bytes:
    """The greeting with CLIENT_SSL cleared: the local client will not ask for TLS."""
    at = greeting.flags_at
    low = int.from_bytes(payload[at : at + 2], "little") & ~CLIENT_SSL & 0xFFFF
    return payload[:at] + low.to_bytes(2, "little") + payload[at + 2 :]


def with_flags(payload: bytes, capabilities: int) -> bytes:
    return capabilities.to_bytes(4, "little") + payload[4:]


def _xor(data: bytes, key: bytes) -> bytes:
    return bytes(b ^ key[i % len(key)] for i, b in enumerate(data))


class MySQLStage:
    def __init__(self, route: RouteSpec) -> None:
        self.route = route
        self.transparent = False
        # "greeting": waiting for the server's greeting; "response": the client has it and is to
        # answer; "tls": SSLRequest sent, the handshake runs (with local_tls, the client's own
        # TLS too); "auth": renumbering; "command": bytes pass, the client's packets are framed
        # by their headers to see COM_QUIT.
        self.phase = "greeting"
        self._server = b""  # the server's bytes not yet framed
        self._client = b""  # the client's bytes not yet framed
        self._response = b""  # the client's HandshakeResponse payload, until TLS is up
        self._client_flags = 0  # its capability flags
        self._to_server = 0  # the next sequence id on the server's link
        self._to_client = 0  # the next sequence id on the client's link
        self._plugin = ""  # the auth plugin in use, and its challenge
        self._scramble = b""
        self._full_auth = False  # caching_sha2_password asked for the password
        self._key: rsa.RSAPrivateKey | None = None  # the key the client got from us instead of the server's
        self._failure: str | None = None  # what the client is told, once the remote failed
        self._server_err: bytes | None = None  # or the ERR the server sent before TLS, as it is
        self._closed = False
        self._client_turn = False  # the client is to send the next packet of the connection phase
        self._server_flags = 0  # the greeting's capability flags
        self._established = False  # our TLS with the server is up
        # local_tls: the client asked for TLS (an SSLRequest) and its HandshakeResponse, which
        # comes through its own TLS as packet 2, is still to come.
        self._awaiting_response = False
        # The command phase: the client's frames, read by their headers.
        self._frame_header = HEADER  # 7 with the compressed protocol
        self._quit = bytes([COM_QUIT])  # COM_QUIT's frame payload (in a compressed frame: the whole packet)
        self._skip = 0  # payload bytes of the current frame still to come
        self._head = b""  # the start of the next frame's header
        self._candidate: bytes | None = None  # the current frame's payload so far, while it may be COM_QUIT

    # --- the server

    def connected(self) -> list[Command]:
        return []  # the server speaks first

    def from_remote(self, data: bytes) -> list[Command]:
        if self.phase == "command":
            return [SendLocal(data)]
        self._server += data
        if self.phase == "greeting":
            return self._greeting()
        if self.phase == "response":  # the server spoke again before our SSLRequest
            return self._early_server_packet()
        return self._relay_server()

    def remote_eof(self) -> list[Command]:
        return [EndLocal()]

    def tls_established(self) -> list[Command]:
        self._established = True
        if self._awaiting_response:
            return []  # local_tls: the client's HandshakeResponse is still on its way, through its TLS
        return self._send_response()

    def remote_failed(self, cause: Cause, message: str) -> list[Command]:
        if self._closed:
            return []
        if self.phase == "command":
            return [Close()]  # mid-session: no handshake answer to give
        if self._failure is None:
            self._failure = f"mtls-sidecar: {message}; fix: {cause.fix}"
        if self._client_turn:
            return []  # the client is about to send a packet and then reads: answer that
        return self._answer_failure()

    # --- the local client

    def from_local(self, data: bytes) -> list[Command]:
        if self._closed:
            return []
        if self.phase == "command":
            return self._command(data)
        self._client += data
        if self.phase == "greeting":
            fault = Fault("local", "protocol", "the client spoke before the server's greeting")
            return [Refuse(fault, "the local client does not speak MySQL: it spoke before the server's greeting")]
        if self.phase == "response":
            return self._handshake_response()
        if self.phase == "tls":
            if self._awaiting_response:
                return self._response_through_local_tls()
            return []  # held until TLS is up (a MySQL client waits for the server's answer)
        return self._relay_client()

    def local_eof(self) -> list[Command]:
        if self.phase == "command":
            return [EndRemote()]
        return [Close()]

    # --- the connection phase

    def _greeting(self) -> list[Command]:
        if len(self._server) >= HEADER + 1:
            length, seq, kind = int.from_bytes(self._server[:3], "little"), self._server[3], self._server[4]
            if length > MAX_GREETING or seq != 0 or kind not in (10, ERR):
                return self._not_mysql()
        first = next_packet(self._server)
        if first is None:
            return []
        _, payload, self._server = first
        if payload[0] == ERR:  # the server refused us at once (too many connections, host blocked)
            return self._server_refused(payload)
        try:
            greeting = parse_greeting(payload)
        except ValueError:
            return self._not_mysql()
        if not greeting.capabilities & CLIENT_SSL:
            fault = Fault("handshake", "no_tls", "the greeting lacks CLIENT_SSL")
            return [Refuse(fault, f"{self._target()} does not offer TLS (its greeting lacks CLIENT_SSL)")]
        if not greeting.capabilities & CLIENT_PROTOCOL_41:
            fault = Fault("handshake", "protocol", "the server lacks CLIENT_PROTOCOL_41")
            return [Refuse(fault, f"{self._target()} speaks the pre-4.1 MySQL protocol: not supported")]
        self.phase = "response"
        self._client_turn = True
        self._plugin, self._scramble = greeting.plugin, greeting.scramble
        self._server_flags = greeting.capabilities
        self._to_server, self._to_client = 1, 1
        given = payload if self.route.local_tls else without_ssl(payload, greeting)  # local_tls: TLS is ours to offer
        out: list[Command] = [SendLocal(packet(0, given))]
        return out + self._early_server_packet() if self._server else out

    def _early_server_packet(self) -> list[Command]:
        first = next_packet(self._server)
        if first is None:
            return []
        _, payload, self._server = first
        if payload[:1] == bytes([ERR]):
            return self._server_refused(payload)
        fault = Fault("handshake", "protocol", "the server spoke twice before TLS")
        return [Refuse(fault, f"{self._target()} sent a second packet before TLS: is it MySQL?")]

    def _handshake_response(self) -> list[Command]:
        if self._bad_header(1):
            return self._not_a_client()  # known from its header: no need to wait for the rest
        first = next_packet(self._client)
        if first is None:
            return []
        seq, payload, self._client = first
        self._client_turn = False
        flags = int.from_bytes(payload[:4], "little") if len(payload) >= 4 else 0
        if len(payload) < SSL_REQUEST_LENGTH or not flags & CLIENT_PROTOCOL_41:
            return self._not_a_client()
        if flags & CLIENT_SSL:
            if not self.route.local_tls:
                fault = Fault("local", "protocol", "the client asked for TLS")
                message = (
                    "the local client asked for TLS, which this route does not offer it: connect without TLS "
                    "(mariadb --skip-ssl, mysql --ssl-mode=DISABLED), or set local_tls = true for the route"
                )
                return [Refuse(fault, message)]
            if len(payload) != SSL_REQUEST_LENGTH:
                return self._not_a_client("it asked for TLS in a whole HandshakeResponse, not an SSLRequest")
            return self._local_tls_request(seq, payload, flags)
        self._to_client = seq + 1
        if self._failure is not None or self._server_err is not None:
            return self._answer_failure()
        self.phase = "tls"
        self._client_flags = flags
        self._response = payload
        ssl_request = packet(self._to_server, with_flags(payload[:SSL_REQUEST_LENGTH], flags | CLIENT_SSL))
        self._to_server += 1
        return [SendRemote(ssl_request), StartTLS()]

    def _local_tls_request(self, seq: int, ssl_request: bytes, flags: int) -> list[Command]:
        """local_tls: the client sent an SSLRequest. Send the server ours (unless the remote has
        already failed: the client then reads why through its TLS), and start the client's TLS
        with what it sent past its request (MySQL clients send their hello without waiting)."""
        self._to_client = seq + 1
        self.phase = "tls"
        self._awaiting_response = True
        self._client_turn = True  # its HandshakeResponse comes next; a failure meanwhile answers that
        self._client_flags = flags
        leftover, self._client = self._client, b""
        out: list[Command] = []
        if self._failure is None and self._server_err is None:
            out += [SendRemote(packet(self._to_server, ssl_request)), StartTLS()]  # the client's own, CLIENT_SSL set
            self._to_server += 1
        return [*out, StartLocalTLS(leftover)]

    def _response_through_local_tls(self) -> list[Command]:
        """local_tls: the client's HandshakeResponse, decrypted: packet 2 on both links, so it
        goes to the server as it is, once our TLS is up."""
        if self._bad_header(2):
            return self._not_a_client()
        first = next_packet(self._client)
        if first is None:
            return []
        seq, payload, self._client = first
        self._awaiting_response = False
        self._client_turn = False
        self._to_client = seq + 1
        flags = int.from_bytes(payload[:4], "little") if len(payload) >= 4 else 0
        if len(payload) <= SSL_REQUEST_LENGTH or not flags & CLIENT_PROTOCOL_41:
            return self._not_a_client("its HandshakeResponse through TLS is not a 4.1+ one")
        if self._failure is not None or self._server_err is not None:
            return self._answer_failure()
        self._client_flags = flags
        self._response = payload
        return self._send_response() if self._established else []

    def _send_response(self) -> list[Command]:
        """Our TLS is up: the client's HandshakeResponse goes to the server, CLIENT_SSL set."""
        self.phase = "auth"
        response = packet(self._to_server, with_flags(self._response, self._client_flags | CLIENT_SSL))
        self._to_server += 1
        self._response = b""
        return [SendRemote(response), *self._relay_client()]

    def _bad_header(self, seq: int) -> bool:
        """The client's next packet, by its header alone, cannot be its HandshakeResponse (or SSLRequest)."""
        if len(self._client) < HEADER:
            return False
        return self._client[3] != seq or int.from_bytes(self._client[:3], "little") > MAX_RESPONSE

    def _not_a_client(self, why: str = "its answer to the greeting is not a 4.1+ HandshakeResponse") -> list[Command]:
        fault = Fault("local", "protocol", "no HandshakeResponse41")
        return [Refuse(fault, f"the local client does not speak MySQL: {why}")]

    # --- check: no local client

    def check_reply(self, sent: bytes) -> bytes | None:
        """What `check` answers in the local client's place to what the stage sent it: to the
        greeting, a minimal HandshakeResponse41 (user mtls-sidecar-check, no TLS asked, no auth
        data), which the stage turns into its SSLRequest; to anything else, nothing. The server
        sees no more of it than the SSLRequest: check stops after the TLS handshake."""
        first = next_packet(sent)
        if first is None or first[0] != 0 or first[1][:1] != b"\x0a":
            return None
        flags = CLIENT_PROTOCOL_41 | CLIENT_SECURE_CONNECTION
        fixed = struct.pack("<IIB", flags, MAX_PACKET, UTF8MB4) + bytes(23)
        return packet(1, fixed + CHECK_USER + b"\0" + b"\0")  # the user, NUL; an auth response of length 0

    def _relay_server(self) -> list[Command]:
        """Server → client during the connection phase: renumbered, and watched for its end."""
        out: list[Command] = []
        while (first := next_packet(self._server)) is not None:
            seq, payload, self._server = first
            self._to_server = seq + 1
            out.append(SendLocal(packet(self._to_client, payload)))
            self._to_client += 1
            kind = payload[0] if payload else None
            if kind == OK:
                return out + self._step_aside()
            if kind == ERR:  # the server refused the login and hangs up (without close_notify): so do we
                self._closed = True
                return [*out, Close()]
            if kind == AUTH_SWITCH:
                self._switched(payload)
            elif payload == PERFORM_FULL_AUTH and self._plugin == CACHING_SHA2:
                self._full_auth = True
            # The plugin's rounds are questions for the client, but for "fast auth passed", which OK follows.
            self._client_turn = payload != FAST_AUTH_OK
        return out

    def _relay_client(self) -> list[Command]:
        """Client → server during the connection phase: renumbered; caching_sha2's key request answered."""
        out: list[Command] = []
        while (first := next_packet(self._client)) is not None:
            seq, payload, self._client = first
            self._to_client = seq + 1
            self._client_turn = False
            if self._failure is not None or self._server_err is not None:
                return self._answer_failure()
            if self._full_auth:
                answer = self._full_auth_packet(payload)
                if answer is not None:
                    out += answer
                    if self._closed:
                        return out
                    continue
            out.append(SendRemote(packet(self._to_server, payload)))
            self._to_server += 1
        return out

    def _switched(self, payload: bytes) -> None:
        """An AuthSwitchRequest: 0xFE, the plugin's name, NUL, its challenge (a lone 0xFE: the old password)."""
        name, _, data = payload[1:].partition(b"\0")
        self._plugin = name.decode("ascii", "replace") if len(payload) > 1 else "mysql_old_password"
        if data:
            self._scramble = data.rstrip(b"\0")[:SCRAMBLE_LENGTH]
        self._full_auth = False

    def _full_auth_packet(self, payload: bytes) -> list[Command] | None:
        """caching_sha2_password's full authentication: the commands for the client's packet, or
        None to pass it on as it is (a cleartext password, or one encrypted for a key not ours)."""
        if payload == REQUEST_PUBLIC_KEY:
            if self._key is None:
                self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            pem = self._key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            reply = packet(self._to_client, bytes([AUTH_MORE_DATA]) + pem)
            self._to_client += 1
            self._client_turn = True
            return [SendLocal(reply)]
        self._full_auth = False
        if self._key is None or len(payload) != self._key.key_size // 8:
            return None
        try:
            oaep = padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA1()), algorithm=hashes.SHA1(), label=None)
            secret = self._key.decrypt(payload, oaep)
        except ValueError:
            fault = Fault("local", "protocol", "the encrypted password does not decrypt")
            self._closed = True
            return [Refuse(fault, "the local client's encrypted password (caching_sha2_password) does not decrypt")]
        cleartext = _xor(secret, self._scramble or b"\0")  # the password and its NUL, as a TLS client sends it
        out: list[Command] = [SendRemote(packet(self._to_server, cleartext))]
        self._to_server += 1
        return out

    def _step_aside(self) -> list[Command]:
        """The connection phase ended: from here bytes pass untouched (what is left over, too).

        The stage still frames the client's packets by their headers (not their bytes), to see
        COM_QUIT: MariaDB and MySQL answer it by closing TCP without TLS close_notify, which the
        connection would count as a cut-off answer (or a reset, when our own close_notify then
        meets a closed socket). After COM_QUIT the stage closes the connection itself. With the
        compressed protocol, packets travel in compressed frames (a 7-byte header: length,
        sequence id, uncompressed length, 0 when the frame is not compressed, as for COM_QUIT).
        """
        self.phase = "command"
        if self._client_flags & self._server_flags & COMPRESSED:
            self._frame_header, self._quit = COMPRESSED_HEADER, packet(0, bytes([COM_QUIT]))
        out: list[Command] = []
        if self._server:
            out.append(SendLocal(self._server))
        client, self._server, self._client = self._client, b"", b""
        return out + (self._command(client) if client else [])

    def _command(self, data: bytes) -> list[Command]:
        """The command phase: the client's bytes pass as they are; after COM_QUIT, close."""
        if self._quits(data):
            self._closed = True
            return [SendRemote(data), Close()]
        return [SendRemote(data)]

    def _quits(self, data: bytes) -> bool:
        """Whether `data` holds COM_QUIT: a frame with sequence id 0 whose payload is `self._quit`."""
        pos, end = 0, len(data)
        while pos < end:
            if self._skip:
                step = min(self._skip, end - pos)
                if self._candidate is not None:
                    self._candidate += data[pos : pos + step]
                pos += step
                self._skip -= step
                if not self._skip and self._candidate is not None:
                    if self._candidate == self._quit:
                        return True
                    self._candidate = None
                continue
            size = self._frame_header
            need = size - len(self._head)
            self._head += data[pos : pos + need]
            pos += need
            if len(self._head) < size:
                break
            head, self._head = self._head, b""
            self._skip = int.from_bytes(head[:3], "little")
            plain = size == HEADER or head[4:7] == b"\0\0\0"  # uncompressed length 0: the frame is as it is
            self._candidate = b"" if head[3] == 0 and plain and self._skip == len(self._quit) else None
        return False

    # --- failures

    def _server_refused(self, payload: bytes) -> list[Command]:
        """An ERR from the server before TLS: the client gets the server's own words."""
        self._server_err = payload
        text = payload[9:] if payload[3:4] == b"#" else payload[3:]
        fault = Fault("handshake", "closed", "the server sent ERR before TLS")
        return [Refuse(fault, f"{self._target()} refused the connection: {text.decode('utf-8', 'replace')}")]

    def _not_mysql(self) -> list[Command]:
        first = self._server[:16]
        fault = Fault("handshake", "protocol", "no MySQL greeting", first_bytes=first)
        return [Refuse(fault, f"{self._target()} did not greet as a MySQL server (it sent {first!r}): is it MySQL?")]

    def _answer_failure(self) -> list[Command]:
        self._closed = True
        sqlstate = SQLSTATE if self.phase != "greeting" else None  # after the greeting: protocol 4.1
        payload = self._server_err or err_payload(ER_HANDSHAKE_ERROR, self._failure or "", sqlstate)
        return [SendLocal(packet(self._to_client, payload)), Close()]

    def _target(self) -> str:
        return self.route.target
