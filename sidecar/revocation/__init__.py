"""Revocation of server certificates: `judge` (pure) and `checker` (fetching, caching)."""
