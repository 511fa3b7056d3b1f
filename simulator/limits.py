"""Process limits for fleets: thousands of agents need thousands of file descriptors."""

from __future__ import annotations

import contextlib
import resource


def raise_open_files() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit; returns the soft limit now in force.

    Each agent holds a socket and its outbox's SQLite files (database, WAL, shared memory),
    and mosquitto, started as our child, inherits the limit: its own default of 1024 caps
    a broker near a thousand connections (FIELD-NOTES).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
