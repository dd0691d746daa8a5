"""The control API: HTTP/1.1 + JSON on a Unix socket (mode 0600) in the runtime folder."""
