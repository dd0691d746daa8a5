"""Certificate lifecycle: when to renew (timing), what state we are in (state), who issues (providers)."""
