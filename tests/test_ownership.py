"""Folders and sockets are ours, or we refuse (issue 16, point 4).

Real files, real sockets and, where ownership matters, a real second OS user (made as
tests/test_other_user.py makes it, and run under `setpriv`).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest

from sidecar.cli import main
from sidecar.control.client import ApiCallError
from tests.daemon_runner import DaemonThread
from tests.pki import Leaf
from tests.scenario import Pki, route_to, write_config
from tests.test_cli import LogFollower
from tests.test_other_user import make_other_user
from tests.waiting import wait_until


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_under_umask_000_every_folder_is_0700_and_the_log_is_0600(tmp_path: Path) -> None:
    home = tmp_path / "not" / "yet" / "home"  # parents the daemon makes too
    env = {**os.environ, "MTLS_SIDECAR_HOME": str(home)}
    env.pop("MTLS_SIDECAR_CONFIG", None)
    proc = subprocess.Popen(
        ["sh", "-c", f"umask 000 && exec {sys.executable} -m sidecar run"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    follower = LogFollower(proc)
    try:
        follower.wait_for(r"control API on")
        follower.wait_for(r"listening on")
        folders = [tmp_path / "not", tmp_path / "not" / "yet", home, home / "keystore", home / "logs", home / "run"]
        folders += [p for p in (home / "keystore").iterdir() if p.is_dir()]
        assert {str(f): oct(_mode(f)) for f in folders} == {str(f): oct(0o700) for f in folders}
        log_file = home / "logs" / "daemon.log"
        assert _mode(log_file) == 0o600
        assert _mode(home / "config.toml") == 0o600
        assert _mode(home / "run" / "control.sock") == 0o600
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        follower.join()
        assert proc.stderr is not None
        proc.stderr.close()


# -- the runtime folder and the control socket: another user's, or open to others ------------------

OTHER_USER = "mtls-sidecar-other"


@pytest.fixture(scope="module")
def other_user() -> pwd.struct_passwd:
    return make_other_user()


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MTLS_SIDECAR_HOME": str(home)}
    env.pop("MTLS_SIDECAR_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "sidecar", *args], capture_output=True, text=True, env=env, timeout=60)


def _one_line(done: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.mark.parametrize("command", [["run"], ["status"], ["route", "list"]])
def test_a_runtime_folder_of_another_user_is_refused_in_one_line(
    tmp_path: Path, other_user: pwd.struct_passwd, command: list[str]
) -> None:
    home = tmp_path / "home"
    (home / "run").mkdir(parents=True, mode=0o700)
    os.chown(home / "run", other_user.pw_uid, other_user.pw_gid)
    done = _cli(home, *command)
    assert done.returncode == 1
    line = _one_line(done) if command != ["run"] else done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr
    assert f"the runtime folder {home / 'run'} belongs to another user (uid {other_user.pw_uid})" in line
    assert not (home / "run" / "control.sock").exists()


@pytest.mark.parametrize("command", [["run"], ["status"]])
def test_a_runtime_folder_others_may_write_is_refused_in_one_line(tmp_path: Path, command: list[str]) -> None:
    home = tmp_path / "home"
    (home / "run").mkdir(parents=True)
    os.chmod(home / "run", 0o777)
    done = _cli(home, *command)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert f"the runtime folder {home / 'run'} is writable by other users (mode 0777)" in done.stderr.splitlines()[-1]
    assert _mode(home / "run") == 0o777  # refused, not quietly changed


# Another user's program listening where our control socket should be: counts what it is sent.
FAKE_DAEMON = """
import socket, sys
server = socket.socket(socket.AF_UNIX)
server.bind(sys.argv[1])
server.listen(4)
print("ready", flush=True)
server.settimeout(20)
conn, _ = server.accept()
conn.settimeout(2)
data = b""
try:
    while chunk := conn.recv(65536):
        data += chunk
except OSError:
    pass
print("received", len(data), flush=True)
"""


def test_the_cli_sends_nothing_to_a_control_socket_served_by_another_user(
    tmp_path: Path, other_user: pwd.struct_passwd
) -> None:
    home = tmp_path / "home"
    (home / "run").mkdir(parents=True, mode=0o700)  # our own folder, private: only the socket is theirs
    theirs = Path(tempfile.mkdtemp(prefix="mtls-other-"))  # in /tmp: a folder they can reach
    try:
        os.chmod(theirs, 0o777)
        fake = subprocess.Popen(
            [
                "setpriv",
                f"--reuid={other_user.pw_uid}",
                f"--regid={other_user.pw_gid}",
                "--clear-groups",
                sys.executable,
                "-c",
                FAKE_DAEMON,
                str(theirs / "s.sock"),
            ],
            stdout=subprocess.PIPE,
            text=True,
            cwd="/",
        )
        try:
            assert fake.stdout is not None
            assert fake.stdout.readline().strip() == "ready"
            os.rename(theirs / "s.sock", home / "run" / "control.sock")  # still their listening socket
            done = _cli(home, "route", "add", "x", "--listen", "127.0.0.1:0", "--target", "example.org:443")
            out, _ = fake.communicate(timeout=30)
        finally:
            if fake.poll() is None:
                fake.kill()
                fake.wait()
        assert out.strip() == "received 0"  # not a byte of the request reached them
        assert done.returncode == 1
        line = _one_line(done)
        assert f"the control socket is served by another user (uid {other_user.pw_uid} " in line
    finally:
        shutil.rmtree(theirs, ignore_errors=True)


# -- unix: routes never take or remove another program's socket -----------------------------------


def _unix_daemon_config(home: Path, tmp_path: Path) -> tuple[Pki, Path]:
    pki = Pki.create(tmp_path / "pki")
    pki.enroll(home / "keystore", "dev", "dev-1", cn="dev")
    config = write_config(home / "config.toml", identities={"dev": {"renew": "none"}}, routes={})
    return pki, config


def _listening_unix(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen()
    return sock


def _still_answers(server: socket.socket, path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(5)
        client.connect(str(path))
        conn, _ = server.accept()
        conn.close()
    return True


def _inode(path: Path) -> tuple[int, int]:
    info = path.lstat()
    return info.st_dev, info.st_ino


def test_a_unix_route_on_a_live_socket_of_another_program_is_refused_and_leaves_it(
    isolated_home: Path, tmp_path: Path
) -> None:
    pki, config = _unix_daemon_config(isolated_home, tmp_path)
    theirs = tmp_path / "theirs.sock"
    plain = tmp_path / "notes.txt"
    plain.write_text("not a socket\n")
    with _listening_unix(theirs) as other_program, DaemonThread(config) as daemon:
        before = _inode(theirs)
        for path, why in ((theirs, "another program listens on that socket"), (plain, "not a socket")):
            with pytest.raises(ApiCallError) as taken:
                daemon.client().post("/v1/routes", {**route_to(pki, 1, listen=f"unix:{path}"), "name": "db"})
            assert taken.value.status == 409, taken.value
            assert why in str(taken.value) and "left alone" in str(taken.value)
            assert "db" not in daemon.status()["routes"]
        assert _inode(theirs) == before and stat.S_ISSOCK(theirs.lstat().st_mode)
        assert _still_answers(other_program, theirs)
        assert plain.read_text() == "not a socket\n"
    assert "db" not in config.read_text()


def test_a_stale_socket_nobody_listens_on_is_replaced(isolated_home: Path, tmp_path: Path) -> None:
    pki, config = _unix_daemon_config(isolated_home, tmp_path)
    stale = tmp_path / "stale.sock"
    _listening_unix(stale).close()  # the file stays; nobody listens any more
    with DaemonThread(config) as daemon:
        daemon.client().post("/v1/routes", {**route_to(pki, 1, listen=f"unix:{stale}"), "name": "db"})
        assert daemon.status()["routes"]["db"]["state"] == "up"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(stale))  # ours now


def test_route_rm_removes_its_own_socket_and_never_one_it_did_not_create(isolated_home: Path, tmp_path: Path) -> None:
    pki, config = _unix_daemon_config(isolated_home, tmp_path)
    path = tmp_path / "svc.sock"
    with DaemonThread(config) as daemon:
        daemon.client().post("/v1/routes", {**route_to(pki, 1, listen=f"unix:{path}"), "name": "own"})
        assert stat.S_ISSOCK(path.lstat().st_mode)
        daemon.client().delete("/v1/routes/own")
        assert not path.exists()  # its own socket: removed

        daemon.client().post("/v1/routes", {**route_to(pki, 1, listen=f"unix:{path}"), "name": "db"})
        path.unlink()  # another program takes the path while the route runs
        with _listening_unix(path) as other_program:
            theirs = _inode(path)
            daemon.client().delete("/v1/routes/db")
            assert _inode(path) == theirs
            assert _still_answers(other_program, path)


# -- the keystore: its folder deleted or replaced, a deep tree, stale temporary keys ---------------


def _selected_serial(daemon: DaemonThread) -> str | None:
    selected = daemon.status()["identities"]["dev"]["selected"]
    return None if selected is None else str(selected["serial"])


def _serial_of(leaf: Leaf) -> str:
    return f"{leaf.cert.serial_number:x}"


def _dev_config(home: Path, pki: Pki) -> Path:
    return write_config(home / "config.toml", identities={"dev": {"renew": "none"}}, routes={})


def test_a_keystore_deleted_or_replaced_while_running_is_still_watched(isolated_home: Path, tmp_path: Path) -> None:
    pki = Pki.create(tmp_path / "pki")
    keystore = isolated_home / "keystore"
    first = pki.enroll(keystore, "dev", "dev-1", cn="dev")
    with DaemonThread(_dev_config(isolated_home, pki)) as daemon:
        assert _selected_serial(daemon) == _serial_of(first)

        shutil.rmtree(keystore)  # deleted ...
        wait_until(lambda: _selected_serial(daemon) is None, what="the deleted credential to be dropped")
        # ... and made again, with a new credential. (Both folders at once: watchdog warns when a
        # subfolder appears while it is still adding the tree's watches, and tests make warnings errors.)
        (keystore / "dev").mkdir(parents=True, mode=0o700)
        second = pki.enroll(keystore, "dev", "dev-2", cn="dev")
        wait_until(lambda: _selected_serial(daemon) == _serial_of(second), what="the new keystore's credential")

        replacement = tmp_path / "keystore.new"  # replaced by a rename
        replacement.mkdir(mode=0o700)
        third = pki.enroll(replacement, "dev", "dev-3", cn="dev")
        os.rename(keystore, tmp_path / "keystore.old")
        os.rename(replacement, keystore)
        wait_until(lambda: _selected_serial(daemon) == _serial_of(third), what="the replacing keystore's credential")

        fourth = pki.enroll(keystore, "dev", "dev-4", cn="dev", lifetime=timedelta(days=30))  # and its later changes
        wait_until(lambda: _selected_serial(daemon) == _serial_of(fourth), what="a credential added afterwards")


def test_a_keystore_nested_1000_levels_deep_starts_and_stale_temporary_keys_are_removed(
    isolated_home: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    pki = Pki.create(tmp_path / "pki")
    keystore = isolated_home / "keystore"
    first = pki.enroll(keystore, "dev", "dev-1", cn="dev")
    deep = keystore / "dev"
    # pytest's own clean-up of old tmp folders recurses: take the chain apart whatever happens
    request.addfinalizer(lambda: _flatten_away(deep / "d", tmp_path))
    fd = os.open(deep, os.O_RDONLY)
    try:  # made relative to an open folder: the whole path is longer than PATH_MAX
        for _ in range(1000):
            os.mkdir("d", dir_fd=fd)
            inner = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = inner
        leftover = os.open(".key.pem.x1y2.tmp", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd)
        os.write(leftover, b"-----BEGIN PRIVATE KEY-----\n")
        os.close(leftover)
    finally:
        os.close(fd)
    (keystore / "dev" / ".dev-1.pem.abcd.tmp").write_text("half a key")  # an interrupted atomic write
    scratch = isolated_home / "run" / "scratch" / "renew-killed"
    scratch.mkdir(parents=True, mode=0o700)
    (scratch / "current.key").write_text("-----BEGIN PRIVATE KEY-----\n")  # a renewal killed midway
    with DaemonThread(_dev_config(isolated_home, pki)) as daemon:
        assert _selected_serial(daemon) == _serial_of(first)
        assert not (keystore / "dev" / ".dev-1.pem.abcd.tmp").exists()
        assert list((isolated_home / "run" / "scratch").iterdir()) == []
        assert _mode(isolated_home / "run" / "scratch") == 0o700
        second = pki.enroll(keystore, "dev", "dev-2", cn="dev", lifetime=timedelta(days=30))  # the watch still works
        wait_until(lambda: _selected_serial(daemon) == _serial_of(second), what="a new credential")
    found = [name for _, _, files in _walk_fd(deep) for name in files]
    assert ".key.pem.x1y2.tmp" not in found


def _flatten_away(top: Path, spare: Path) -> None:
    """Remove a very deep chain of folders one level at a time."""
    level = 0
    while top.exists():
        child, moved = top / "d", spare / f"flat-{level}"
        has_child = child.exists()
        if has_child:
            os.rename(child, moved)
        shutil.rmtree(top)
        top, level = moved, level + 1


def _walk_fd(root: Path) -> list[tuple[str, list[str], list[str]]]:
    """os.walk without recursion (os.walk recurses on 3.11 and paths here exceed PATH_MAX)."""
    out: list[tuple[str, list[str], list[str]]] = []
    stack = [os.open(root, os.O_RDONLY)]
    while stack:
        fd = stack.pop()
        try:
            entries = list(os.scandir(fd))
            dirs = [e.name for e in entries if e.is_dir(follow_symlinks=False)]
            out.append(("", dirs, [e.name for e in entries if not e.is_dir(follow_symlinks=False)]))
            stack += [os.open(d, os.O_RDONLY, dir_fd=fd) for d in dirs]
        finally:
            os.close(fd)
    return out


def test_renew_command_temporary_files_live_in_the_scratch_folder(isolated_home: Path, tmp_path: Path) -> None:
    pki = Pki.create(tmp_path / "pki")
    pki.enroll(isolated_home / "keystore", "dev", "dev-1", cn="dev")
    seen = tmp_path / "seen.txt"
    record = ["sh", "-c", f'echo "$MTLS_SIDECAR_CURRENT_KEY" > {seen}; exit 3']
    config = write_config(
        isolated_home / "config.toml",
        identities={"dev": {"renew": "command", "renew_command": record}},
        routes={},
    )
    with DaemonThread(config) as daemon:
        daemon.client().post("/v1/identities/dev/renew")
        wait_until(lambda: seen.exists() and seen.read_text().strip(), what="the renew_command to run")
        key = Path(seen.read_text().strip())
        assert key.parent.parent == isolated_home / "run" / "scratch", key
        wait_until(lambda: not key.exists(), what="the temporary key to be removed after the renewal")


# -- a symlinked config.toml -----------------------------------------------------------------------


def test_a_symlinked_config_is_hot_reloaded_and_an_api_change_keeps_it_a_link(
    isolated_home: Path, tmp_path: Path
) -> None:
    pki = Pki.create(tmp_path / "pki")
    pki.enroll(isolated_home / "keystore", "dev", "dev-1", cn="dev")
    real = write_config(tmp_path / "dotfiles" / "sidecar.toml", identities={"dev": {"renew": "none"}}, routes={})
    link = isolated_home / "config.toml"
    link.symlink_to(real)
    with DaemonThread(link) as daemon:
        # an edit of the file the link points to is a config change
        write_config(real, identities={"dev": {"renew": "none"}}, routes={"hot": route_to(pki, 1)})
        wait_until(lambda: "hot" in daemon.status()["routes"], what="the edited target to be reloaded")

        daemon.client().post("/v1/routes", {**route_to(pki, 1), "name": "api"})
        assert link.is_symlink() and Path(os.readlink(link)) == real  # still the user's link
        assert "api" in real.read_text() and "hot" in real.read_text()

        text = real.read_text().replace("[routes.hot]", "[routes.renamed]")  # and edits go on counting
        real.write_text(text)
        wait_until(lambda: "renamed" in daemon.status()["routes"], what="a later edit of the target")
        assert link.is_symlink()


def test_identity_new_writes_through_a_symlinked_config(isolated_home: Path, tmp_path: Path) -> None:
    real = write_config(tmp_path / "dotfiles" / "sidecar.toml", identities={"dev": {"renew": "none"}}, routes={})
    link = isolated_home / "config.toml"
    link.symlink_to(real)
    assert main(["identity", "new", "ci"]) == 0
    assert link.is_symlink() and Path(os.readlink(link)) == real
    assert "[identities.ci]" in real.read_text()
