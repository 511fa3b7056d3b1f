"""The gateway: intake, store, forwarding, supervision and HTTP API."""
