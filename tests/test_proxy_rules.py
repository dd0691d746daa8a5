"""The proxy's rules: host patterns, which rule covers a destination, the route it is reached
by, the refusal's words, the PAC file and the shell lines. Pure (the PAC file is run by `node`
when it is installed; the real browser test is tests/test_e2e_proxy.py)."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import subprocess
from pathlib import Path

import pytest

from sidecar.config import ListenAddress, ProxyRuleSpec, ProxySpec
from sidecar.proxy.hosts import HostPattern, ip_literal, normal_name, parse_host_pattern
from sidecar.proxy.rules import (
    CONNECT,
    HTTP,
    SOCKS,
    Destination,
    destination_route,
    env_lines,
    http_base,
    match,
    no_proxy_hosts,
    pac_file,
    proxy_url,
    refusal,
)
from tests.realservers import require_binary

# Runs anywhere: pure logic, or loopback sockets only (the macOS and Windows CI jobs run it).
pytestmark = pytest.mark.portable


def rule(*hosts: str, **extra: object) -> ProxyRuleSpec:
    fields: dict[str, object] = {"name": hosts[0], "hosts": tuple(parse_host_pattern(h) for h in hosts), **extra}
    return ProxyRuleSpec(**fields)  # type: ignore[arg-type]


def proxy(*rules: ProxyRuleSpec, listen: ListenAddress | None = None) -> ProxySpec:
    return ProxySpec(listen=listen or ListenAddress("tcp", "127.0.0.1", 18888), rules=rules)


# --- host patterns ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "host", "covered"),
    [
        # a name: exactly it, whatever the case, with or without the root's dot
        ("db.example.net", "db.example.net", True),
        ("db.example.net", "DB.Example.NET", True),
        ("db.example.net", "db.example.net.", True),
        ("DB.Example.Net.", "db.example.net", True),
        ("db.example.net", "x.db.example.net", False),
        ("db.example.net", "example.net", False),
        ("db.example.net", "db.example.network", False),
        # a wildcard: one whole label, never the bare suffix nor two labels
        ("*.corp.example", "api.corp.example", True),
        ("*.corp.example", "API.CORP.EXAMPLE.", True),
        ("*.corp.example", "a-b_c.corp.example", True),
        ("*.corp.example", "corp.example", False),
        ("*.corp.example", ".corp.example", False),
        ("*.corp.example", "a.b.corp.example", False),
        ("*.corp.example", "apicorp.example", False),
        ("*.corp.example", "api.corp.example.evil", False),
        ("*.Corp.Example", "api.corp.example", True),
        # addresses and blocks: as the client named the destination
        ("10.20.0.5", "10.20.0.5", True),
        ("10.20.0.5", "10.20.0.6", False),
        ("10.20.0.0/16", "10.20.255.1", True),
        ("10.20.0.0/16", "10.21.0.1", False),
        ("10.20.0.5/16", "10.20.9.9", True),  # host bits set: the block they are in
        ("10.20.0.0/16", "::ffff:10.20.0.1", False),  # another version is another address
        ("::1", "::1", True),
        ("::1", "[::1]", True),
        ("[::1]", "::1", True),
        ("::1", "0:0:0:0:0:0:0:1", True),
        ("fd00::/8", "fd12:3456::1", True),
        ("fd00::/8", "[fd12::1]", True),
        ("fd00::/8", "fe80::1", False),
        ("2001:DB8::1", "2001:db8::1", True),
        # names are never resolved to be matched against blocks, nor blocks against names
        ("10.20.0.0/16", "db.example.net", False),
        ("127.0.0.1", "localhost", False),
        ("db.example.net", "10.20.0.5", False),
        ("*.corp.example", "10.20.0.5", False),
    ],
)
def test_host_pattern_matches(pattern: str, host: str, covered: bool) -> None:
    assert parse_host_pattern(pattern).matches(host) is covered


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("db.example.net", HostPattern("db.example.net", name="db.example.net")),
        ("  Db.Example.Net.  ", HostPattern("  Db.Example.Net.  ", name="db.example.net")),
        ("localhost", HostPattern("localhost", name="localhost")),
        ("_svc.example", HostPattern("_svc.example", name="_svc.example")),
        ("*.corp.example", HostPattern("*.corp.example", suffix=".corp.example")),
        ("10.20.0.5", HostPattern("10.20.0.5", network=ipaddress.ip_network("10.20.0.5/32"))),
        ("10.20.0.0/16", HostPattern("10.20.0.0/16", network=ipaddress.ip_network("10.20.0.0/16"))),
        ("[::1]", HostPattern("[::1]", network=ipaddress.ip_network("::1/128"))),
        ("fd00::/8", HostPattern("fd00::/8", network=ipaddress.ip_network("fd00::/8"))),
    ],
)
def test_host_pattern_parses(text: str, expected: HostPattern) -> None:
    parsed = parse_host_pattern(text)
    assert parsed == expected
    assert parsed.text == text  # as written: what status shows
    assert parsed.is_name is (expected.network is None)


WILDCARD_FORM = "a wildcard is '*.' before a name of two labels or more, as in *.corp.example"
WILDCARD_LABEL = "a wildcard stands only for the whole left-most label, as in *.corp.example"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty host"),
        ("   ", "empty host"),
        ("1.2.3", "not a valid IPv4 address"),
        ("256.1.1.1", "not a valid IPv4 address"),
        ("1.2.3.4.5", "not a valid IPv4 address"),
        ("10.0.0.0/33", "not a CIDR block ("),
        ("a.example/24", "not a CIDR block ("),
        ("[::1]/128", "not a CIDR block ("),
        ("*", WILDCARD_LABEL),
        ("*.com", WILDCARD_FORM),
        ("*.*.corp.example", WILDCARD_FORM),
        ("*.", WILDCARD_LABEL),  # the root's dot goes first: "*"
        ("*.-bad.example", WILDCARD_FORM),
        ("api*.corp.example", WILDCARD_LABEL),
        ("api.*.example", WILDCARD_LABEL),
        ("bad name.example", "not a valid host name"),
        ("-a.example", "not a valid host name"),
        ("a..example", "not a valid host name"),
        ("http://a.example", "not a CIDR block ("),
        ("a.example:443", "not a valid host name"),
        ("a" * 64 + ".example", "not a valid host name"),
        (".".join(["a" * 60] * 5), "not a valid host name"),  # 304 characters
    ],
)
def test_bad_host_patterns_say_why(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_host_pattern(text)
    assert str(info.value).startswith(message), str(info.value)


def test_helpers_for_literals_and_names() -> None:
    assert ip_literal("[::1]") == ipaddress.ip_address("::1")
    assert ip_literal("10.0.0.1") == ipaddress.ip_address("10.0.0.1")
    assert ip_literal("[10.0.0.1") is None
    assert ip_literal("db.example.net") is None
    assert normal_name("A.B.") == "a.b"


# --- which rule covers a destination ---------------------------------------------------------

API = rule("api.corp.example", name="api", ports=(443, 8443))
CORP = rule("*.corp.example", name="corp")
DB = rule("db.example.net", "10.20.0.0/16", name="db", ports=(5432,), protocol="postgres")
PLAIN = rule("plain.example", name="plain", tls_port=8443)
RULES = (API, CORP, DB, PLAIN)


@pytest.mark.parametrize(
    ("host", "port", "how", "name", "dest"),
    [
        # first match wins: api's ports cover 443, so corp never sees it
        ("api.corp.example", 443, CONNECT, "api", Destination("api.corp.example", 443, 443)),
        ("API.corp.example.", 8443, SOCKS, "api", Destination("api.corp.example", 8443, 8443)),
        # a port api leaves out falls through to the next rule that covers the host
        ("api.corp.example", 22, CONNECT, "corp", Destination("api.corp.example", 22, 22)),
        ("web.corp.example", 1234, SOCKS, "corp", Destination("web.corp.example", 1234, 1234)),
        ("db.example.net", 5432, CONNECT, "db", Destination("db.example.net", 5432, 5432)),
        ("10.20.3.4", 5432, SOCKS, "db", Destination("10.20.3.4", 5432, 5432)),
        # the HTTP proxy: an http:// URL with no port, or :80, goes to tls_port; another port is that port
        ("api.corp.example", None, HTTP, "api", Destination("api.corp.example", 443, None)),
        ("api.corp.example", 80, HTTP, "api", Destination("api.corp.example", 443, 80)),
        ("api.corp.example", 8443, HTTP, "api", Destination("api.corp.example", 8443, 8443)),
        ("plain.example", None, HTTP, "plain", Destination("plain.example", 8443, None)),
        ("plain.example", 80, HTTP, "plain", Destination("plain.example", 8443, 80)),
        ("plain.example", 9000, HTTP, "plain", Destination("plain.example", 9000, 9000)),
        # CONNECT and SOCKS to port 80 mean port 80
        ("plain.example", 80, CONNECT, "plain", Destination("plain.example", 80, 80)),
        ("web.corp.example", 80, SOCKS, "corp", Destination("web.corp.example", 80, 80)),
        # an IPv6 literal, bracketed or not, is one destination
        ("[fd00::1]", 443, CONNECT, "v6", Destination("fd00::1", 443, 443)),
    ],
)
def test_match(host: str, port: int | None, how: str, name: str, dest: Destination) -> None:
    rules = (*RULES, rule("fd00::/8", name="v6"))
    found = match(rules, host, port, how)
    assert found is not None
    assert (found[0].name, found[1]) == (name, dest)


@pytest.mark.parametrize(
    ("host", "port", "how"),
    [
        ("elsewhere.example", 443, CONNECT),
        ("corp.example", 443, SOCKS),  # the wildcard's bare suffix
        ("a.b.corp.example", None, HTTP),  # two labels
        ("db.example.net", 5433, CONNECT),
        ("10.20.3.4", 22, SOCKS),
        ("10.21.0.1", 5432, SOCKS),
        ("db.example.net", None, HTTP),  # tls_port 443 is not in db's ports
        ("db.example.net", 80, HTTP),
    ],
)
def test_no_rule_covers(host: str, port: int | None, how: str) -> None:
    assert match(RULES, host, port, how) is None


def test_the_http_proxy_matches_ports_against_the_port_tls_goes_to() -> None:
    only_443 = (rule("api.corp.example", ports=(443,)),)
    assert match(only_443, "api.corp.example", None, HTTP) is not None
    assert match(only_443, "api.corp.example", 80, HTTP) is not None
    assert match(only_443, "api.corp.example", 80, CONNECT) is None
    assert match(only_443, "api.corp.example", 8080, HTTP) is None
    tls_9443 = (rule("api.corp.example", ports=(9443,), tls_port=9443),)
    assert match(tls_9443, "api.corp.example", None, HTTP) is not None
    assert match(tls_9443, "api.corp.example", 443, CONNECT) is None


def test_no_rules_cover_nothing() -> None:
    assert match((), "api.corp.example", 443, CONNECT) is None


# --- the refusal's words -------------------------------------------------------------------


def test_refusal_of_a_host_no_rule_covers() -> None:
    text = refusal(RULES, "Elsewhere.Example", 443, CONNECT)
    assert text == (
        "elsewhere.example:443 is not in the proxy's rules, and the sidecar is no open relay: "
        "add a [[proxy.rules]] whose hosts cover elsewhere.example"
    )


def test_refusal_of_a_port_names_the_rule_and_its_ports() -> None:
    text = refusal(RULES, "db.example.net", 5433, CONNECT)
    assert text == (
        "db.example.net:5433 is not in the proxy's rules: rule db covers db.example.net but only on port(s) "
        "5432; add the port to its ports"
    )


def test_refusal_lists_the_ports_of_every_rule_that_covers_the_host() -> None:
    rules = (rule("api.corp.example", name="a", ports=(8443, 443)), rule("*.corp.example", name="b", ports=(9000,)))
    text = refusal(rules, "api.corp.example", 22, SOCKS)
    assert "rule a covers api.corp.example but only on port(s) 443, 8443, 9000;" in text


def test_refusal_of_an_http_url_without_a_port_shows_the_host_alone() -> None:
    text = refusal(RULES, "elsewhere.example", None, HTTP)
    assert text.startswith("elsewhere.example is not in the proxy's rules, and the sidecar is no open relay")


def test_refusal_of_an_ipv6_destination_brackets_it() -> None:
    assert refusal((), "[fd00::1]", 443, CONNECT).startswith("[fd00::1]:443 is not in the proxy's rules")


# --- the route a destination is reached by ------------------------------------------------


def test_destination_route_for_the_http_proxy() -> None:
    r = rule("*.corp.example", name="corp", identity="dev", ca_file=Path("/ca.pem"), alpn=("http/1.1",))
    spec = proxy(r)
    route = destination_route(r, Destination("api.corp.example", 443, None), spec, HTTP)
    assert route.name == "api.corp.example:443"
    assert route.listen == spec.listen
    assert (route.target_host, route.target_port) == ("api.corp.example", 443)
    assert route.server_name == "api.corp.example"
    assert route.identity == "dev"
    assert route.protocol == "http"
    assert route.host_header == "api.corp.example"
    assert route.ca_file == Path("/ca.pem")
    assert route.alpn == ("http/1.1",)
    assert route.passthrough is False


def test_destination_route_dials_connect_but_names_the_destination() -> None:
    r = rule("*.corp.example", connect=("127.0.0.1", 8443))
    route = destination_route(r, Destination("api.corp.example", 9443, 9443), proxy(r), HTTP)
    assert (route.target_host, route.target_port) == ("127.0.0.1", 8443)
    assert route.target == "127.0.0.1:8443"
    assert route.server_name == "api.corp.example"  # SNI and the name checked: the destination's
    assert route.host_header == "api.corp.example:9443"


@pytest.mark.parametrize(
    ("protocol", "how", "expected", "host_header"),
    [
        (None, HTTP, "http", "db.example.net:5432"),
        (None, CONNECT, "tcp", None),
        (None, SOCKS, "tcp", None),
        ("postgres", CONNECT, "postgres", None),
        ("mysql", SOCKS, "mysql", None),
        ("postgres", HTTP, "http", "db.example.net:5432"),  # an absolute-URI request is HTTP
        ("http", CONNECT, "http", "db.example.net:5432"),
    ],
)
def test_destination_route_protocol(protocol: str | None, how: str, expected: str, host_header: str | None) -> None:
    r = rule("db.example.net", protocol=protocol)
    route = destination_route(r, Destination("db.example.net", 5432, 5432), proxy(r), how)
    assert route.protocol == expected
    assert route.host_header == host_header
    assert (route.target_host, route.target_port) == ("db.example.net", 5432)


def test_destination_route_host_header_of_an_ipv6_destination() -> None:
    r = rule("fd00::/8")
    assert destination_route(r, Destination("fd00::1", 443, None), proxy(r), HTTP).host_header == "[fd00::1]"
    route = destination_route(r, Destination("fd00::1", 8443, 8443), proxy(r), HTTP)
    assert route.host_header == "[fd00::1]:8443"
    assert route.name == "[fd00::1]:8443"
    assert route.server_name == "fd00::1"


def test_destination_route_carries_every_check_of_the_rule() -> None:
    r = rule(
        "api.corp.example",
        ca_dir=Path("/cas"),
        connect_timeout=3.0,
        unsafe_skip_verify=True,
        pin_sha256=("pin",),
        allowed_uri_sans=("spiffe://x/*",),
        revocation="soft",
        crl_file=Path("/x.crl"),
        postgres_negotiation="direct",
        max_connections=7,
        idle_timeout=30.0,
    )
    spec = dataclasses.replace(proxy(r), unsafe_listen=True)
    route = destination_route(r, Destination("api.corp.example", 443, 443), spec, CONNECT)
    assert (route.ca_dir, route.connect_timeout, route.unsafe_skip_verify) == (Path("/cas"), 3.0, True)
    assert (route.pin_sha256, route.allowed_uri_sans) == (("pin",), ("spiffe://x/*",))
    assert (route.revocation, route.crl_file, route.postgres_negotiation) == ("soft", Path("/x.crl"), "direct")
    assert (route.max_connections, route.idle_timeout, route.unsafe_listen) == (7, 30.0, True)
    assert route.identity is None  # the active identity, when the rule names none


@pytest.mark.parametrize(
    ("dest", "base"),
    [
        (Destination("api.corp.example", 443, None), "http://api.corp.example"),
        (Destination("api.corp.example", 443, 80), "http://api.corp.example"),
        (Destination("api.corp.example", 8443, 8443), "http://api.corp.example:8443"),
        (Destination("fd00::1", 443, None), "http://[fd00::1]"),
        (Destination("fd00::1", 9000, 9000), "http://[fd00::1]:9000"),
        # `GET https://name/` to the proxy: its redirects to https://name/ stay https, through the proxy again
        (Destination("api.corp.example", 443, 443), "https://api.corp.example"),
    ],
)
def test_http_base_is_the_origin_the_client_asked_for(dest: Destination, base: str) -> None:
    assert http_base(dest) == base


def test_destination_address() -> None:
    assert Destination("a.example", 443).address == "a.example:443"
    assert Destination("::1", 443).address == "[::1]:443"


# --- what to paste into a shell ---------------------------------------------------------------


def test_env_lines_for_each_shell() -> None:
    spec = proxy(CORP, listen=ListenAddress("tcp", "127.0.0.1", 3128))
    names = ["http_proxy", "HTTP_PROXY", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"]
    values = ["http://127.0.0.1:3128"] * 2 + ["socks5h://127.0.0.1:3128"] * 2 + [no_proxy_hosts()] * 2
    assert env_lines(spec) == [f"export {n}={v}" for n, v in zip(names, values, strict=True)]
    assert env_lines(spec, "sh") == env_lines(spec)
    assert env_lines(spec, "fish") == [f"set -gx {n} {v}" for n, v in zip(names, values, strict=True)]
    assert env_lines(spec, "powershell") == [f'$env:{n} = "{v}"' for n, v in zip(names, values, strict=True)]
    # never https_proxy: a client would CONNECT and start its own TLS, which cannot carry our certificate
    assert not any("https_proxy" in line.lower() for line in env_lines(spec))
    assert no_proxy_hosts() == "localhost,127.0.0.1,::1"


@pytest.mark.parametrize(
    ("listen", "url"),
    [
        (ListenAddress("tcp", "127.0.0.1", 18888), "http://127.0.0.1:18888"),
        (ListenAddress("tcp", "::1", 18888), "http://[::1]:18888"),
        (ListenAddress("tcp", "0.0.0.0", 3128), "http://127.0.0.1:3128"),  # reachable locally
        (ListenAddress("tcp", "::", 3128), "http://127.0.0.1:3128"),
        (ListenAddress("tcp", "localhost", 3128), "http://localhost:3128"),
    ],
)
def test_proxy_url(listen: ListenAddress, url: str) -> None:
    assert proxy_url(listen) == url
    assert env_lines(proxy(CORP, listen=listen))[0] == f"export http_proxy={url}"


# --- the PAC file ----------------------------------------------------------------------------

PAC_RULES = (
    rule("*.corp.example", "db.example.net", name="a", ports=(443,)),
    rule("10.20.0.0/16", "192.168.1.7", "::1", "[fd00::5]", name="b"),
)


def test_pac_file_names_exactly_the_rules_hosts() -> None:
    text = pac_file(proxy(*PAC_RULES, listen=ListenAddress("tcp", "127.0.0.1", 3128)))
    assert text.startswith("// mtls-sidecar:")
    assert "function FindProxyForURL(url, host) {" in text
    assert 'host = host.toLowerCase().replace(/\\.$/, "");' in text
    # one test per host of the rules, in order, joined by ||
    condition = text.split("  if (", 1)[1].split(")\n    return", 1)[0]
    tests = condition.split("\n      || ")
    assert tests == [
        '(dnsDomainIs(host, ".corp.example") && host.indexOf(".") == host.length - 13)',
        'host == "db.example.net"',
        '(isIp4(host) && isInNet(host, "10.20.0.0", "255.255.0.0"))',
        '(isIp4(host) && isInNet(host, "192.168.1.7", "255.255.255.255"))',
        '(host == "::1" || host == "[::1]" || inNet6(host, "::1/128"))',
        '(host == "fd00::5" || host == "[fd00::5]" || inNet6(host, "fd00::5/128"))',
    ]
    assert text.count('return "PROXY 127.0.0.1:3128";') == 1
    assert text.rstrip().endswith('return "DIRECT";\n}')
    assert "corp.example" not in text.replace('".corp.example"', "")  # the bare suffix is never named


def test_pac_file_without_rules_sends_everything_direct() -> None:
    text = pac_file(proxy())
    assert "PROXY" not in text
    assert 'return "DIRECT";' in text


def test_pac_file_names_a_reachable_proxy_address() -> None:
    text = pac_file(proxy(CORP, listen=ListenAddress("tcp", "0.0.0.0", 3128)))
    assert 'return "PROXY 127.0.0.1:3128";' in text
    text = pac_file(proxy(CORP, listen=ListenAddress("tcp", "::1", 3128)))
    assert 'return "PROXY [::1]:3128";' in text


# What a browser's PAC runtime gives a script (the Netscape definitions), enough to run ours.
_PAC_RUNTIME = r"""
function dnsDomainIs(host, domain) {
  return host.length >= domain.length && host.substring(host.length - domain.length) == domain;
}
function isInNet(host, pattern, mask) {
  function n(ip) { return ip.split(".").reduce(function (a, b) { return a * 256 + Number(b); }, 0); }
  var m = n(mask);
  function and(a, b) { var r = 0, bit = 1; for (var i = 0; i < 32; i++) {
    if (Math.floor(a / bit) % 2 && Math.floor(b / bit) % 2) r += bit; bit *= 2; } return r; }
  return and(n(host), m) == and(n(pattern), m);
}
function isInNetEx(host, cidr) {  // Chromium's and Windows' CIDR test (IPv4 and IPv6)
  var net = require("net"), list = new net.BlockList(), parts = cidr.split("/");
  var family = function (ip) { return ip.indexOf(":") >= 0 ? "ipv6" : "ipv4"; };
  list.addSubnet(parts[0], Number(parts[1]), family(parts[0]));
  return net.isIP(host) != 0 && list.check(host, family(host));
}
"""


def test_pac_file_sends_through_the_proxy_what_the_rules_cover() -> None:
    """The PAC script, run, agrees with `match` on every host (a PAC script cannot see ports:
    the proxy refuses what `ports` leaves out)."""
    hosts = [
        "api.corp.example", "API.Corp.Example", "api.corp.example.", "corp.example", "corp.example.",
        "a.b.corp.example", "apicorp.example", "db.example.net", "DB.example.net.", "x.db.example.net",
        "10.20.0.1", "10.20.255.255", "10.21.0.1", "192.168.1.7", "192.168.1.8",
        "::1", "[::1]", "fd00::5", "[fd00::5]", "fd00::6", "elsewhere.example", "localhost",
        "fe80::1", "fe80:0:0:1::2", "[fe80::9]", "fe81::1",
    ]  # fmt: skip
    require_binary("node")  # CI installs nodejs: this test runs the script, it is not skipped
    rules = (*PAC_RULES, rule("fe80::/32", name="v6 block"))
    script = pac_file(proxy(*rules)) + _PAC_RUNTIME
    script += (
        f"\nconsole.log(JSON.stringify({json.dumps(hosts)}.map(function (h) {{ return FindProxyForURL('', h); }})));"
    )
    done = subprocess.run(["node", "-e", script], capture_output=True, text=True, timeout=30, check=True)
    got = dict(zip(hosts, json.loads(done.stdout), strict=True))
    expected = {
        host: "PROXY 127.0.0.1:18888" if match(rules, host, None, HTTP) or match(rules, host, 1, CONNECT)
        else "DIRECT"
        for host in hosts
    }  # fmt: skip
    assert got == expected
    assert got["api.corp.example"] != "DIRECT" and got["elsewhere.example"] == "DIRECT"
