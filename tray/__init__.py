"""mtls-sidecar-tray: the daemon's status at a glance, as a client of its control API."""
