"""`mtls-sidecar check`: observe one real connection (`observe`, I/O), then explain it (`explain`, pure)."""
