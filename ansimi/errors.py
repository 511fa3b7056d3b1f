"""The root error of the shared plumbing.

Every error this package raises on purpose derives from `AnsimiError` (and, where one fits, from
the builtin a caller would naturally catch), so a caller can catch this package's alone.
"""

from __future__ import annotations


class AnsimiError(Exception):
    """Root of every error this package raises on purpose."""
