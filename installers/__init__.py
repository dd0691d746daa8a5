"""Launch-at-login templates, one folder per platform.

Installed as the package `sidecar.installers` (see pyproject.toml), so `mtls-sidecar
autostart install` finds them in a wheel or pipx install as well as in a checkout. The
placeholders (`$name`) are filled in by `sidecar.autostart.plan`.
"""
