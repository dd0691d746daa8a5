"""`renew = "step-ca"`: certificates from smallstep's step-ca over its HTTPS API; no `step` CLI.

- Renewal: `POST {url}/1.0/renew`, authenticated by mutual TLS with the certificate and key in
  use (no token); step-ca returns a new certificate for the same key. With `rekey = true`,
  `POST {url}/1.0/rekey` with a CSR for a fresh key, over the same mutual TLS.
- Enrollment (no usable certificate: first run, or a laptop that slept past expiry, which
  `/renew` refuses): a one-time token, then `POST {url}/1.0/sign` with `{"csr", "ott"}`. The
  token is an ES256 (or ES384/ES512/RS256, by key) JWT signed with the JWK provisioner's
  private key (`step_ca_provisioner` + `step_ca_provisioner_key`), or whatever
  `step_ca_token_command` prints. Without either the identity is `expired` and status says what
  to run.

Options (`identities.NAME.*`, parsed and checked at load into `settings.StepCASettings`):

- `step_ca_url` (required): `https://host:port` of the CA.
- `step_ca_root`: the CA's root certificate (trust for its HTTPS); default the system store.
- `step_ca_provisioner`, `step_ca_provisioner_key`: a JWK provisioner's name and its private
  JWK as JSON (decrypted: `step crypto jwe decrypt`), mode 0600.
- `step_ca_token_command`: argv (no shell) that prints a one-time token for the subject.
- `rekey`: a new key at each renewal (default false: `/renew` keeps the key).
- `renew_timeout`: bound on one whole attempt (default 30 s).

The subject's CN is the name asked for: the token's `sub` and its only SAN (DNS name, or IP
address when the CN is one). The CA's errors arrive as one line with the HTTP status and the
CA's own `message`. Tokens and keys never reach logs or status.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import ipaddress
import json
import secrets
import shlex
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from josepy import jwa, jws
from josepy.errors import DeserializationError
from josepy.jwk import JWK, JWKEC, JWKRSA

from sidecar import __version__
from sidecar.config import IdentitySpec
from sidecar.credentials import Candidate, PrivateKey
from sidecar.files import loose_key_problem
from sidecar.renewal.providers.base import (
    CannotEnroll,
    NewCredential,
    ProviderContext,
    ProviderError,
    RenewalRequest,
    settings_of,
)
from sidecar.renewal.providers.run import run_setting_command
from sidecar.renewal.settings import StepCASettings
from sidecar.tlsctx import load_credential

TOKEN_LIFETIME = timedelta(minutes=5)
USER_AGENT = f"mtls-sidecar/{__version__}"
MAX_RESPONSE_BYTES = 1 << 20
_MESSAGE_MAX = 300


def check_files(settings: StepCASettings, where: str) -> None:
    """What the config cannot check without the file system: the files are there, and the
    provisioner's private key is readable by its owner only."""
    for key, path in (("step_ca_root", settings.root), ("step_ca_provisioner_key", settings.provisioner_key)):
        if path is not None and not path.is_file():
            raise ProviderError(f"{where}.{key}: no such file: {path}")
    if settings.provisioner_key is not None:
        problem = loose_key_problem(settings.provisioner_key, settings.provisioner_key.stat().st_mode)
        if problem:
            raise ProviderError(f"{where}.step_ca_provisioner_key: {problem}")


class StepCAProvider:
    name = "step-ca"

    def __init__(self, spec: IdentitySpec, context: ProviderContext) -> None:
        self.spec = spec
        self.settings = settings_of(spec, StepCASettings)
        check_files(self.settings, f"identities.{spec.name}")

    async def issue(self, request: RenewalRequest) -> NewCredential:
        try:
            return await asyncio.wait_for(self._issue(request), self.settings.timeout)
        except TimeoutError:
            raise ProviderError(
                f"step-ca at {self.settings.url} did not answer within {self.settings.timeout:g}s"
            ) from None

    async def _issue(self, request: RenewalRequest) -> NewCredential:
        current = request.current
        # An expired certificate (a laptop that slept past its end) cannot renew: step-ca refuses
        # it in the handshake. Then enrollment is the way back, when it is configured.
        if (
            current is not None
            and current.cert is not None
            and current.key is not None
            and request.now < current.cert.not_valid_after_utc
        ):
            return await self._renew(current)
        return await self._enroll(request)

    # --- renewal over mutual TLS

    async def _renew(self, current: Candidate) -> NewCredential:
        assert current.cert is not None and current.key is not None
        context = self._tls_context()
        load_credential(context, current)
        for tries_left in (1, 0):
            key: PrivateKey
            if self.settings.rekey:
                key = new_key()
                body = {"csr": make_csr(key, self.spec.subject, self.settings.common_name)}
                answer = await asyncio.to_thread(
                    post_json, self.settings.url, "/1.0/rekey", body, context, self.settings.timeout
                )
            else:
                key = current.key
                answer = await asyncio.to_thread(
                    post_json, self.settings.url, "/1.0/renew", None, context, self.settings.timeout
                )
            chain = parse_certificate_response(answer)
            if tries_left and _same_second(chain, current.cert):
                # Certificate times have one-second resolution: renewed within the second of the
                # last issuance, the new certificate ties on notBefore and could lose the
                # keystore's tie-break (serial). Ask once more in the next second.
                await asyncio.sleep(1.05 - datetime.now(UTC).microsecond / 1e6)
                continue
            break
        return NewCredential(cert_chain_pem=chain, key_pem=_key_pem(key))

    # --- enrollment with a one-time token

    async def _enroll(self, request: RenewalRequest) -> NewCredential:
        settings = self.settings
        if not settings.can_enroll:
            raise CannotEnroll(self._what_to_run(request))
        audience = f"{settings.url}/1.0/sign"
        if settings.token_command is not None:
            token = await run_token_command(settings.token_command, settings.timeout)
        else:
            assert settings.provisioner is not None and settings.provisioner_key is not None
            key_file = load_provisioner_key(settings.provisioner_key)
            token = make_token(key_file, settings.provisioner, settings.common_name, audience, datetime.now(UTC))
        key = new_key()
        body = {"csr": make_csr(key, self.spec.subject, settings.common_name), "ott": token}
        answer = await asyncio.to_thread(
            post_json, settings.url, "/1.0/sign", body, self._tls_context(), settings.timeout
        )
        return NewCredential(cert_chain_pem=parse_certificate_response(answer), key_pem=_key_pem(key))

    def _what_to_run(self, request: RenewalRequest) -> str:
        cn = self.settings.common_name
        argv = ["step", "ca", "certificate", cn, str(request.folder / f"{cn}.crt"), str(request.folder / f"{cn}.key")]
        argv += ["--ca-url", self.settings.url]
        if self.settings.root:
            argv += ["--root", str(self.settings.root)]
        return (
            f"no usable certificate, and step-ca renews only a valid one: run `{shlex.join(argv)}`, "
            f"or set step_ca_provisioner and step_ca_provisioner_key (or step_ca_token_command) "
            f"on identities.{self.spec.name} to enroll automatically"
        )

    def _tls_context(self) -> ssl.SSLContext:
        try:
            context = ssl.create_default_context(cafile=str(self.settings.root) if self.settings.root else None)
        except (OSError, ssl.SSLError) as exc:
            raise ProviderError(f"cannot load step_ca_root {self.settings.root}: {_reason(exc)}") from exc
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context


# --- pure pieces: keys, CSRs, tokens, responses


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def subject_alt_name(common_name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(common_name))
    except ValueError:
        return x509.DNSName(common_name)


def make_csr(key: ec.EllipticCurvePrivateKey, subject: str, common_name: str) -> str:
    """A PEM CSR for `subject`, with the CN as its one SAN (what the token allows)."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name.from_rfc4514_string(subject))
        .add_extension(x509.SubjectAlternativeName([subject_alt_name(common_name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


@dataclass(frozen=True)
class ProvisionerKey:
    """A JWK provisioner's private key and the `kid` step-ca knows it by."""

    jwk: JWK = field(repr=False)
    kid: str


def load_provisioner_key(path: Path) -> ProvisionerKey:
    """The provisioner's private JWK from a JSON file; errors never show the key."""
    where = f"step_ca_provisioner_key {path}"
    try:
        text = path.read_text()
    except OSError as exc:
        raise ProviderError(f"cannot read {where}: {_reason(exc)}") from exc
    try:
        data = json.loads(text)
    except ValueError:
        raise ProviderError(f"{where} is not JSON (expected a private JWK)") from None
    if not isinstance(data, dict):
        raise ProviderError(f"{where} is not a JSON object (expected a private JWK)")
    if "ciphertext" in data or "encrypted_key" in data:
        raise ProviderError(
            f"{where} is encrypted (JWE); decrypt it once with "
            "`step crypto jwe decrypt < ENCRYPTED.json > provisioner.json` and keep that file 0600"
        )
    try:
        jwk = JWK.from_json(data)
    except (DeserializationError, ValueError, TypeError) as exc:
        raise ProviderError(f"{where} is not a usable JWK ({type(exc).__name__})") from None
    if not isinstance(jwk, JWKEC | JWKRSA) or "d" not in data:
        raise ProviderError(f'{where} must be a private EC or RSA JWK (with its "d" member)')
    kid = data.get("kid")
    return ProvisionerKey(jwk, kid if isinstance(kid, str) and kid else key_id(jwk))


def key_id(jwk: JWK) -> str:
    """The RFC 7638 thumbprint, base64url: what step uses as a JWK provisioner's `kid`."""
    return base64.urlsafe_b64encode(jwk.public_key().thumbprint()).rstrip(b"=").decode()


def _algorithm(jwk: JWK) -> jwa.JWASignature:
    if isinstance(jwk, JWKRSA):
        return jwa.RS256
    curve = jwk.key.curve.name  # josepy wraps the cryptography key; attributes pass through
    by_curve = {"secp256r1": jwa.ES256, "secp384r1": jwa.ES384, "secp521r1": jwa.ES512}
    try:
        return by_curve[curve]
    except KeyError:
        raise ProviderError(f"step_ca_provisioner_key: unsupported EC curve {curve}") from None


def token_claims(provisioner: str, common_name: str, audience: str, now: datetime) -> dict[str, Any]:
    """The claims step-ca's JWK provisioner checks: issuer, subject, SANs, audience, times, jti."""
    issued = int(now.timestamp())
    return {
        "iss": provisioner,
        "sub": common_name,
        "sans": [common_name],
        "aud": audience,
        "nbf": issued,
        "iat": issued,
        "exp": issued + int(TOKEN_LIFETIME.total_seconds()),
        "jti": secrets.token_hex(32),
    }


def make_token(key: ProvisionerKey, provisioner: str, common_name: str, audience: str, now: datetime) -> str:
    """A compact JWS (a JWT) over `token_claims`, with `kid` in the protected header."""
    jwk, kid = key.jwk, key.kid
    payload = json.dumps(token_claims(provisioner, common_name, audience, now), separators=(",", ":")).encode()
    signed = jws.JWS.sign(
        payload,
        key=jwk,
        alg=_algorithm(jwk),
        protect=frozenset({"alg", "kid", "typ"}),
        kid=kid,
        typ="application/JWT",  # written as "JWT" (RFC 7515 4.1.9)
    )
    token: str = signed.to_compact().decode()
    return token


def _same_second(chain_pem: bytes, current: x509.Certificate) -> bool:
    leaf = x509.load_pem_x509_certificate(chain_pem)
    return leaf.not_valid_before_utc <= current.not_valid_before_utc


def parse_certificate_response(body: Mapping[str, Any]) -> bytes:
    """step-ca's sign/renew/rekey answer → PEM chain, leaf first: `certChain`, else `crt` + `ca`."""
    chain = body.get("certChain")
    if isinstance(chain, list) and chain:
        parts: Sequence[object] = chain
    else:
        parts = [p for p in (body.get("crt"), body.get("ca")) if p]
    if not parts or not all(isinstance(p, str) and "-----BEGIN CERTIFICATE-----" in p for p in parts):
        raise ProviderError("step-ca answered without a certificate (no certChain, nor crt and ca, in PEM)")
    return b"".join(str(p).strip().encode() + b"\n" for p in parts)


def error_line(url: str, path: str, status: int, reason: str, body: bytes) -> str:
    """One readable line from an error answer: status, and the CA's own JSON `message`."""
    message = ""
    with contextlib.suppress(ValueError, UnicodeDecodeError):
        data = json.loads(body)
        if isinstance(data, dict) and isinstance(data.get("message"), str):
            message = data["message"]
    if not message:
        text = body.decode(errors="replace").strip()
        message = text if text and "PRIVATE KEY" not in text else "no message"
    message = " ".join(message.split())[:_MESSAGE_MAX]
    return f"step-ca at {url} answered {status} {reason} to {path}: {message}"


# --- I/O


def post_json(
    url: str, path: str, body: Mapping[str, Any] | None, context: ssl.SSLContext, timeout: float
) -> dict[str, Any]:
    """POST (blocking, run in a thread) and return the JSON answer; ProviderError says what failed."""
    parts = urlsplit(url)
    assert parts.hostname is not None
    conn = http.client.HTTPSConnection(parts.hostname, parts.port or 443, context=context, timeout=timeout)
    data = json.dumps(body).encode() if body is not None else b""
    try:
        conn.request(
            "POST",
            parts.path + path,
            body=data,
            headers={"Content-Type": "application/json", "Accept": "application/json", "User-Agent": USER_AGENT},
        )
        response = conn.getresponse()
        answer = response.read(MAX_RESPONSE_BYTES)
    except ssl.SSLCertVerificationError as exc:
        raise ProviderError(
            f"step-ca at {url}: its certificate is not trusted ({exc.verify_message}); check step_ca_root"
        ) from exc
    except (OSError, http.client.HTTPException) as exc:
        raise ProviderError(f"cannot reach step-ca at {url}: {_reason(exc)}") from exc
    finally:
        conn.close()
    if not 200 <= response.status < 300:
        raise ProviderError(error_line(url, path, response.status, response.reason, answer))
    try:
        parsed = json.loads(answer)
    except ValueError:
        raise ProviderError(f"step-ca at {url} answered {path} with something that is not JSON") from None
    if not isinstance(parsed, dict):
        raise ProviderError(f"step-ca at {url} answered {path} with JSON that is not an object")
    return parsed


async def run_token_command(argv: Sequence[str], timeout: float) -> str:
    """Run `step_ca_token_command`; its last output line is the token (never logged)."""
    stdout = await run_setting_command(argv, setting="step_ca_token_command", timeout=timeout)
    lines = [line.strip() for line in stdout.decode(errors="replace").splitlines() if line.strip()]
    token = lines[-1] if lines else ""
    if token.count(".") != 2 or any(c.isspace() for c in token):
        raise ProviderError(f"step_ca_token_command {argv[0]!r} did not print a token (a JWT) as its last line")
    return token


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).replace("_", " ").lower()
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return " ".join(str(text).split())
