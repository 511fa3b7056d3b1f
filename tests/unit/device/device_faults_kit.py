"""Faults for the device's unit tests: storage that refuses to write.

A plain module (not conftest) so the tests import it by a name no other test tree uses.
"""

from __future__ import annotations

import sqlite3
from typing import Any


class FullDisk:
    """The outbox's connection, refusing every write with SQLITE_FULL while `full`."""

    WRITES = ("INSERT", "UPDATE", "DELETE", "BEGIN", "REPLACE")

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self.full = False

    def _check(self, sql: str) -> None:
        if self.full and sql.lstrip().upper().startswith(self.WRITES):
            raise sqlite3.OperationalError("database or disk is full")

    def execute(self, sql: str, args: Any = ()) -> sqlite3.Cursor:
        self._check(sql)
        return self._db.execute(sql, args)

    def executemany(self, sql: str, rows: Any) -> sqlite3.Cursor:
        self._check(sql)
        return self._db.executemany(sql, rows)

    def close(self) -> None:
        self._db.close()
