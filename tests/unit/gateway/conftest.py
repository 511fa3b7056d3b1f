"""The gateway unit tests' shared fixtures (defined in gw_testkit.py)."""

from gw_testkit import env  # noqa: F401  (a fixture: pytest finds it here)
