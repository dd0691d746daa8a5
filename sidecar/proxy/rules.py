"""Which proxy rule covers a destination, and the route a destination is reached by. Pure.

A destination is what the client asked for: a host (a name or an IP literal) and a port. For
the HTTP proxy's requests (`GET http://api.corp.example/…`) the port TLS goes to is the rule's
`tls_port` when the URL names none, else the URL's port; `ports` is matched against that port,
so `ports = [443]` covers `http://api.corp.example/`. For CONNECT and SOCKS it is the port asked.

Each destination reached is served as a route of its own (`destination_route`): same tunnel,
same stages, same checks as a configured route; its identity, trust and policy are the rule's,
its server name is the destination's host.
"""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.config import ListenAddress, ProxyRuleSpec, ProxySpec, RouteSpec
from sidecar.hostport import host_port
from sidecar.proxy.hosts import ip_literal, normal_name

# How a client asked: an absolute-URI request (the HTTP proxy), CONNECT, or SOCKS 4a/5.
HTTP, CONNECT, SOCKS = "http", "connect", "socks"


@dataclass(frozen=True)
class Destination:
    host: str  # a DNS name, lower case, or an IP address without brackets
    port: int  # the port TLS goes to
    asked_port: int | None = None  # HTTP proxy: the URL's own port (None: it named none)

    @property
    def address(self) -> str:
        return host_port(self.host, self.port)


def normal_host(host: str) -> str:
    address = ip_literal(host)
    return str(address) if address is not None else normal_name(host)


def match(
    rules: tuple[ProxyRuleSpec, ...], host: str, port: int | None, how: str
) -> tuple[ProxyRuleSpec, Destination] | None:
    """The first rule that covers `host` and its port, and the destination it makes; None: refused.

    `port` None: an http:// URL that names no port (each rule's `tls_port` then).
    """
    host = normal_host(host)
    for rule in rules:
        effective = port if port is not None else rule.tls_port
        if how == HTTP and port == 80:
            effective = rule.tls_port  # http://name:80/ is the same as http://name/
        if rule.ports and effective not in rule.ports:
            continue
        if any(pattern.matches(host) for pattern in rule.hosts):
            return rule, Destination(host, effective, port)
    return None


def refusal(rules: tuple[ProxyRuleSpec, ...], host: str, port: int | None, how: str) -> str:
    """Why a destination was refused, in one sentence that says what to do."""
    host = normal_host(host)
    shown = Destination(host, port or 443).address if port is not None else host
    by_host = [rule for rule in rules if any(p.matches(host) for p in rule.hosts)]
    if by_host:
        allowed = sorted({p for rule in by_host for p in rule.ports})
        return (
            f"{shown} is not in the proxy's rules: rule {by_host[0].name} covers {host} but only on port(s) "
            f"{', '.join(map(str, allowed))}; add the port to its ports"
        )
    return (
        f"{shown} is not in the proxy's rules, and the sidecar is no open relay: add a [[proxy.rules]] "
        f"whose hosts cover {host}"
    )


def destination_route(rule: ProxyRuleSpec, dest: Destination, proxy: ProxySpec, how: str) -> RouteSpec:
    """The route a destination of `rule` is reached by."""
    target_host, target_port = rule.connect or (dest.host, dest.port)
    protocol = "http" if how == HTTP else (rule.protocol or "tcp")
    host_header = None
    if protocol == "http":
        name = f"[{dest.host}]" if ":" in dest.host else dest.host
        host_header = name if dest.port == 443 else f"{name}:{dest.port}"
    return RouteSpec(
        name=dest.address,
        listen=proxy.listen,
        target_host=target_host,
        target_port=target_port,
        server_name=dest.host,
        ca_file=rule.ca_file,
        ca_dir=rule.ca_dir,
        identity=rule.identity,
        alpn=rule.alpn,
        connect_timeout=rule.connect_timeout,
        unsafe_listen=proxy.unsafe_listen,
        unsafe_skip_verify=rule.unsafe_skip_verify,
        pin_sha256=rule.pin_sha256,
        allowed_uri_sans=rule.allowed_uri_sans,
        allowed_common_names=rule.allowed_common_names,
        allowed_ous=rule.allowed_ous,
        allowed_dns_sans=rule.allowed_dns_sans,
        allowed_ip_sans=rule.allowed_ip_sans,
        revocation=rule.revocation,
        crl_file=rule.crl_file,
        protocol=protocol,
        postgres_negotiation=rule.postgres_negotiation,
        host_header=host_header,
        max_connections=rule.max_connections,
        idle_timeout=rule.idle_timeout,
        preconnect=rule.preconnect,
        preconnect_max_idle=rule.preconnect_max_idle,
        upstream_proxy=rule.upstream_proxy,
        upstream_proxy_auth_env=rule.upstream_proxy_auth_env,
    )


def http_base(dest: Destination) -> str:
    """The origin a proxied HTTP client asked for, `http://name[:port]`: where the target's own
    redirects are pointed back to, so that they come through the proxy again."""
    name = f"[{dest.host}]" if ":" in dest.host else dest.host
    if dest.asked_port in (None, 80):
        return f"http://{name}"
    if dest.asked_port == 443:  # it asked for https://name/ (a proxy client that leaves TLS to the proxy)
        return f"https://{name}"
    return f"http://{name}:{dest.asked_port}"


def proxy_url(listen: ListenAddress) -> str:
    host = f"[{listen.host}]" if ":" in listen.host else listen.host
    if host in ("0.0.0.0", "[::]"):
        host = "127.0.0.1"
    return f"http://{host}:{listen.port}"


def pac_file(proxy: ProxySpec) -> str:
    """A proxy auto-config script: the rules' hosts through the proxy, everything else DIRECT.

    A PAC script cannot see a rule's `ports`; the proxy refuses what they leave out.
    """
    address = proxy_url(proxy.listen).removeprefix("http://")
    tests = []
    for rule in proxy.rules:
        for pattern in rule.hosts:
            if pattern.name is not None:
                tests.append(f'host == "{pattern.name}"')
            elif pattern.suffix is not None:
                # one label, then the suffix: what the rule matches, no more
                first_dot = f"host.length - {len(pattern.suffix)}"
                tests.append(f'(dnsDomainIs(host, "{pattern.suffix}") && host.indexOf(".") == {first_dot})')
            elif pattern.network is not None and pattern.network.version == 4:
                v4 = pattern.network
                tests.append(f'(isIp4(host) && isInNet(host, "{v4.network_address}", "{v4.netmask}"))')
            elif pattern.network is not None:
                # IPv6: Chromium and Windows have isInNetEx (CIDR); elsewhere only an exact address matches
                net = pattern.network
                ip = net.network_address
                exact = f'host == "{ip}" || host == "[{ip}]" || ' if net.num_addresses == 1 else ""
                tests.append(f'({exact}inNet6(host, "{net}"))')
    lines = [
        "// mtls-sidecar: the hosts of the proxy's rules go through it; everything else DIRECT.",
        "function isIp4(host) { return /^[0-9]+\\.[0-9]+\\.[0-9]+\\.[0-9]+$/.test(host); }",
        "function inNet6(host, cidr) {",
        '  host = host.replace(/^\\[|\\]$/g, "");',
        '  return host.indexOf(":") >= 0 && typeof isInNetEx == "function" && isInNetEx(host, cidr);',
        "}",
        "function FindProxyForURL(url, host) {",
        '  host = host.toLowerCase().replace(/\\.$/, "");  // as rules compare names: no root dot',
    ]
    if tests:
        lines.append("  if (" + "\n      || ".join(tests) + f')\n    return "PROXY {address}";')
    lines += ['  return "DIRECT";', "}", ""]
    return "\n".join(lines)


def no_proxy_hosts() -> str:
    return "localhost,127.0.0.1,::1"


def env_lines(proxy: ProxySpec, shell: str = "sh") -> list[str]:
    """What to paste into a shell so that its programs use the proxy."""
    url = proxy_url(proxy.listen)
    socks = url.replace("http://", "socks5h://")
    values = [
        ("http_proxy", url),
        ("HTTP_PROXY", url),
        ("ALL_PROXY", socks),
        ("all_proxy", socks),
        ("NO_PROXY", no_proxy_hosts()),
        ("no_proxy", no_proxy_hosts()),
    ]
    if shell == "fish":
        return [f"set -gx {name} {value}" for name, value in values]
    if shell == "powershell":
        return [f'$env:{name} = "{value}"' for name, value in values]
    return [f"export {name}={value}" for name, value in values]
