"""The proxy (`[proxy]`): one local port that speaks HTTP proxy, CONNECT, SOCKS 4a/5 and serves a
PAC file, and sends each destination a `[[proxy.rules]]` covers to it over mutual TLS.

`hosts` (host patterns), `rules` (which rule covers a destination, the route it is reached by,
the PAC file), `greeting` (the client's first words and the proxy's answers) and `stage` (the
stage in front of a CONNECT or SOCKS tunnel) are pure; `listener` is the asyncio port.
"""
