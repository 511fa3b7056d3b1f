"""The device's root error.

Every error the device raises on purpose derives from `DeviceError` and from the builtin a
caller would naturally catch. None is a click exception: the CLI turns them into exit codes
at its edge (`device/enrol.py`'s command, for one).
"""

from __future__ import annotations


class DeviceError(Exception):
    """Root of every error this package raises on purpose."""
