"""The control API stays exact: changes happen one at a time, so a change that fails and is
put back never takes another change with it, and a malformed body gets a 400 that names
its field (never a dropped connection and a traceback).

A real daemon, real HTTP/1.1 on its control socket, real ports (one held by another socket).
"""

from __future__ import annotations

import json
import socket
import threading
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.controlhttp import request
from tests.daemon_runner import DaemonThread
from tests.realservers import free_port
from tests.scenario import Pki, one_route_config

ROUNDS = 20

# The whole suite once per control transport (issue 19): the Unix socket and the loopback port.
pytestmark = pytest.mark.usefixtures("control_transport")


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.create(tmp_path / "pki")


def _post_route(path: Path, body: dict[str, Any], start: threading.Barrier, answers: dict[str, Any]) -> None:
    start.wait()
    answers[body["name"]] = request(path, "POST", "/v1/routes", json.dumps(body).encode())


def test_a_failed_route_add_never_undoes_a_concurrent_one(pki: Pki, isolated_home: Path) -> None:
    config = one_route_config(isolated_home, pki, free_port())
    with socket.socket() as taken, DaemonThread(config) as daemon:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        taken_port = taken.getsockname()[1]
        lost = []
        for round_ in range(ROUNDS):
            good, bad = f"good-{round_}", f"bad-{round_}"
            bodies = {
                good: {"name": good, "listen": "127.0.0.1:0", "target": "127.0.0.1:9", "server_name": "localhost"},
                bad: {"name": bad, "listen": f"127.0.0.1:{taken_port}", "target": "127.0.0.1:9"},
            }
            answers: dict[str, tuple[int, Any]] = {}
            start = threading.Barrier(2)  # both requests leave together
            threads = [
                threading.Thread(target=_post_route, args=(daemon.socket, body, start, answers))
                for body in bodies.values()
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
            assert answers[good][0] == 201, answers[good]
            assert answers[bad][0] == 409 and "address already in use" in answers[bad][1]["error"].lower(), answers
            routes = daemon.status()["routes"]
            saved = tomllib.loads(config.read_text())["routes"]
            if good not in routes or good not in saved:
                lost.append(round_)
            assert bad not in routes and bad not in saved
        assert lost == [], f"the good route, answered 201, was undone in rounds {lost}"
        assert set(daemon.call(lambda d: set(d.listeners))) >= {f"good-{r}" for r in range(ROUNDS)}


def test_malformed_bodies_get_a_400_naming_the_field(pki: Pki, isolated_home: Path) -> None:
    config = one_route_config(isolated_home, pki, free_port())
    before = config.read_text()
    with DaemonThread(config) as daemon:
        deep = b'{"name": "x", "alpn": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
        status, answer = request(daemon.socket, "POST", "/v1/routes", deep)
        assert status == 400 and "nested too deeply" in answer["error"]

        add = {"name": "x", "listen": "127.0.0.1:0", "target": "127.0.0.1:9"}
        cases: list[tuple[str, str, dict[str, Any], str, str]] = [
            ("POST", "/v1/routes", {**add, "alpn": ["h2", None]}, "alpn", "item 1 is null"),
            ("PATCH", "/v1/routes/svc", {"alpn": [None]}, "alpn", "item 0 is null"),
            ("POST", "/v1/routes", {**add, "listen": {"host": "127.0.0.1"}}, "listen", "got an object"),
            ("POST", "/v1/routes", {**add, "alpn": [["h2"]]}, "alpn", "item 0 is a list"),
            ("PATCH", "/v1/routes/svc", {"target": [{"a": None}]}, "target", "item 0 is an object"),
            ("POST", "/v1/routes", {**add, "name": 7}, "name", 'send {"name": "..."}'),
            ("POST", "/v1/active-identity", {"name": ["dev"]}, "name", 'send {"name": "..."}'),
        ]
        for method, target, body, field, words in cases:
            status, answer = request(daemon.socket, method, target, json.dumps(body).encode())
            assert (status, answer.get("field")) == (400, field), (body, answer)
            assert words in answer["error"], (body, answer)
        assert set(daemon.status()["routes"]) == {"svc"}
    assert config.read_text() == before  # nothing of it was saved
