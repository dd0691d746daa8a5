"""`mtls-sidecar proxy env|pac`: what a shell or a browser needs to use the proxy.

Both read the running daemon when there is one (its port is the one actually bound, which
`listen = "127.0.0.1:0"` leaves to the OS), and config.toml otherwise.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from sidecar.config import ListenAddress, ProxySpec, load_config
from sidecar.control.client import ControlClient, DaemonNotRunning
from sidecar.paths import Places
from sidecar.proxy.rules import env_lines, pac_file

EXIT_OK = 0
EXIT_FAILURE = 1


def cmd_proxy(places: Places, args: argparse.Namespace) -> int:
    spec = _proxy_spec(places)
    if not spec.enabled:
        print(
            f"mtls-sidecar: the proxy is off: it starts once {places.config_file} has a [[proxy.rules]] "
            '(for example hosts = ["*.corp.example"]); see "One port for everything" in the README',
            file=sys.stderr,
        )
        return EXIT_FAILURE
    if args.proxy_command == "env":
        print("# Programs in this shell send http:// and SOCKS traffic through mtls-sidecar's proxy;")
        print("# destinations outside its rules are refused (403), so keep these to the shell you work in.")
        for line in env_lines(spec, args.shell):
            print(line)
    else:
        sys.stdout.write(pac_file(spec))
    return EXIT_OK


def _proxy_spec(places: Places) -> ProxySpec:
    """The running daemon's proxy (its bound port), or config.toml's when no daemon runs."""
    try:
        status = ControlClient.for_places(places).get("/v1/proxy")
    except DaemonNotRunning:
        return load_config(places.config_file).proxy
    spec = load_config(places.config_file).proxy
    listen = status.get("listen") or ""
    host, _, port = listen.rpartition(":")
    if status.get("enabled") and port.isdigit():
        spec = replace(spec, listen=ListenAddress("tcp", host.strip("[]"), int(port)))
    return spec
