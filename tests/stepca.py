"""A real smallstep `step-ca` for tests, built from Debian's Go packages and started per test.

Debian bookworm ships the step-ca library (`golang-github-smallstep-certificates-dev`, 0.19)
but no command; `tests/stepca/main.go` is our own entry point that runs the library's own
start command. It is built offline in GOPATH mode (a temporary GOPATH whose `src/` links
every folder of `/usr/share/gocode/src`, plus ours), once per source and toolchain: the
binary is cached under `~/.cache/mtls-sidecar-tests/` (the real home, not the test's) keyed
on a hash of `main.go`, `go version` and the library's version. A build takes about 25 s.

The CA itself is made here: root and intermediate with `cryptography`, a JWK provisioner
whose private key the test holds, short certificate lifetimes, `ca.json` written by hand,
all state in the test's folder. It listens on 127.0.0.1 only.

Missing Go or the library is a test failure that says what to install, never a skip.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import pwd
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from josepy.jwk import JWKEC

from tests.pebble import pick_port
from tests.pki import CA, Key, key_pem, pem
from tests.realservers import start_process, stop_process, wait_for_port

LOOPBACK = "127.0.0.1"
GOCODE = Path("/usr/share/gocode/src")
LIBRARY = GOCODE / "github.com/smallstep/certificates"
MAIN_GO = Path(__file__).parent / "stepca" / "main.go"
BUILD_DEADLINE_S = 300.0
START_DEADLINE_S = 20.0
_INSTALL_HINT = "apt-get install golang-go golang-github-smallstep-certificates-dev (.ci/run does this)"
_LOG_TAIL = 4000
PROVISIONER = "tests@example.test"


def cache_root() -> Path:
    """The real user's cache folder: tests move $HOME and XDG_CACHE_HOME to temp folders."""
    override = os.environ.get("MTLS_SIDECAR_TEST_CACHE")
    if override:
        return Path(override)
    return Path(pwd.getpwuid(os.getuid()).pw_dir) / ".cache" / "mtls-sidecar-tests"


def require_stepca_binary() -> Path:
    """The cached step-ca binary, built first if needed; fails the test if the parts are missing."""
    go = shutil.which("go")
    if go is None or not LIBRARY.is_dir():
        missing = "the go command" if go is None else f"the step-ca library ({LIBRARY})"
        pytest.fail(f"cannot build step-ca: {missing} is missing: {_INSTALL_HINT}", pytrace=False)
    version = subprocess.run([go, "version"], capture_output=True, text=True, check=True, timeout=30).stdout
    key = hashlib.sha256(MAIN_GO.read_bytes() + version.encode() + (LIBRARY / "go.mod").read_bytes()).hexdigest()
    folder = cache_root() / f"step-ca-{key[:16]}"
    binary = folder / "step-ca"
    if binary.exists():
        return binary
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test run may be building the same thing
        if not binary.exists():
            _build(go, binary)
    return binary


def _build(go: str, binary: Path) -> None:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="stepca-gopath-") as gopath:
        src = Path(gopath) / "src"
        src.mkdir()
        for entry in GOCODE.iterdir():
            (src / entry.name).symlink_to(entry)
        ours = src / "mtls-sidecar-stepca"
        ours.mkdir()
        shutil.copy(MAIN_GO, ours / "main.go")
        env = {
            **os.environ,
            "GOPATH": gopath,
            "GO111MODULE": "off",
            "GOPROXY": "off",
            "GOFLAGS": "",
            "GOCACHE": str(cache_root() / "go-build"),
        }
        partial = binary.with_name(binary.name + ".partial")
        result = subprocess.run(
            [go, "build", "-ldflags", "-s -w", "-o", str(partial), "."],
            cwd=ours,
            env=env,
            capture_output=True,
            text=True,
            timeout=BUILD_DEADLINE_S,
        )
        if result.returncode != 0:
            pytest.fail(f"building step-ca failed ({_INSTALL_HINT}):\n{result.stderr[-_LOG_TAIL:]}", pytrace=False)
        partial.replace(binary)
    print(f"\nstep-ca: built {binary} in {time.monotonic() - started:.1f} s")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class Provisioner:
    """A JWK provisioner: its name, key id and private key (the test holds it)."""

    name: str
    key: ec.EllipticCurvePrivateKey
    kid: str = ""

    def __post_init__(self) -> None:
        self.kid = _b64(JWKEC(key=self.key.public_key()).thumbprint())

    def public_jwk(self) -> dict[str, object]:
        jwk = JWKEC(key=self.key.public_key()).to_json()
        return {**jwk, "kid": self.kid, "use": "sig", "alg": "ES256"}

    def write_private_jwk(self, path: Path) -> Path:
        """The private JWK as `step crypto jwe decrypt` prints it: JSON, mode 0600."""
        jwk = {**JWKEC(key=self.key).to_json(), "kid": self.kid, "use": "sig", "alg": "ES256"}
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(jwk, fh)
        return path


@dataclass
class StepCA:
    workdir: Path
    port: int
    binary: Path
    ca: CA  # root + intermediate; the intermediate signs
    provisioner: Provisioner
    root_file: Path
    chain_file: Path  # root and intermediate: what servers trust for step-ca's client certificates
    config_file: Path
    log_file: Path
    starts: int = 0
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"https://{LOOPBACK}:{self.port}"

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def requests_logged(self, path: str) -> int:
        """How many requests to `path` (e.g. "/1.0/renew") the CA's log shows."""
        return sum(1 for line in self.log().splitlines() if f"path={path} " in line or f'"path":"{path}"' in line)

    def start(self) -> None:
        if self.is_running:
            return
        self.starts += 1
        steppath = self.workdir / "steppath"
        steppath.mkdir(exist_ok=True)
        self._proc = start_process(
            [str(self.binary), str(self.config_file)],
            self.log_file,
            cwd=self.workdir,
            env={**os.environ, "STEPPATH": str(steppath), "HOME": str(self.workdir)},
            header=f"--- start {self.starts}\n",
        )
        try:
            wait_for_port(LOOPBACK, self.port, START_DEADLINE_S, self._proc, ready=self._health_ok)
        except BaseException as exc:
            self.stop()
            raise AssertionError(f"step-ca did not start: {exc}\n{self.log()[-_LOG_TAIL:]}") from exc

    def _health_ok(self) -> bool:
        ctx = ssl.create_default_context(cafile=str(self.root_file))
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=1.0, context=ctx) as response:
                return bool(json.loads(response.read()).get("status") == "ok")
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        stop_process(proc)


def _write_key(path: Path, key: Key) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key_pem(key))
    return path


@contextmanager
def stepca_server(workdir: Path, *, default_duration: str = "2m", start: bool = True) -> Iterator[StepCA]:
    """A fresh step-ca on a free loopback port; stopped (and its group killed if need be) on exit."""
    binary = require_stepca_binary()
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    ca = CA("Step Test Root CA", with_intermediate=True)
    assert ca.intermediate is not None
    root_file = ca.write_root(workdir / "root_ca.crt")
    inter_file = workdir / "intermediate_ca.crt"
    inter_file.write_bytes(pem(ca.intermediate))
    inter_key = _write_key(workdir / "intermediate_ca_key", ca.signing_key)
    chain_file = workdir / "root_and_intermediate.crt"
    chain_file.write_bytes(pem(ca.root) + pem(ca.intermediate))
    provisioner = Provisioner(PROVISIONER, ec.generate_private_key(ec.SECP256R1()))
    port = pick_port()  # below the ephemeral range: no outgoing connection can take it meanwhile
    config = {
        "root": str(root_file),
        "crt": str(inter_file),
        "key": str(inter_key),
        "address": f"{LOOPBACK}:{port}",
        "dnsNames": ["localhost", LOOPBACK],
        "logger": {"format": "text"},
        "db": {"type": "badgerv2", "dataSource": str(workdir / "db")},
        "authority": {
            "provisioners": [
                {
                    "type": "JWK",
                    "name": provisioner.name,
                    "key": provisioner.public_jwk(),
                    "claims": {
                        "minTLSCertDuration": "5s",
                        "defaultTLSCertDuration": default_duration,
                        "maxTLSCertDuration": "24h",
                    },
                }
            ]
        },
        "tls": {"minVersion": 1.2, "maxVersion": 1.3},
    }
    config_file = workdir / "ca.json"
    config_file.write_text(json.dumps(config, indent=2))
    server = StepCA(
        workdir=workdir,
        port=port,
        binary=binary,
        ca=ca,
        provisioner=provisioner,
        root_file=root_file,
        chain_file=chain_file,
        config_file=config_file,
        log_file=workdir / "step-ca.log",
    )
    try:
        if start:
            server.start()
        yield server
    finally:
        server.stop()
