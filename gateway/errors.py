"""The gateway's root error.

Every error the gateway raises on purpose derives from `GatewayError` and from the builtin a
caller would naturally catch (`ValueError`, `LookupError`, ...), so code that knows nothing
of the gateway still handles it sensibly, and code that does can catch the gateway's alone.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Root of every error this package raises on purpose."""
