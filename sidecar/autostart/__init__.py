"""Launch at login: `plan` renders what to install (pure), `manage` installs, removes and
inspects it; the CLI's `autostart` command and the tray's "Start at login" both use them."""
