"""The side-by-side benchmark against stunnel, haproxy, nginx stream and socat (bench/README.md)."""
