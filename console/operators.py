"""Operators, their sessions, the alerts' stages, and the audit log, in the console's SQLite.

Passwords: `hashlib.scrypt` from the standard library (n=2**14, r=8, p=1: ~16 MiB and tens
of milliseconds per check), a 16-byte random salt each, compared in constant time. No
dependency for it, and the parameters are stored with each hash so they can be raised later.

Sessions: a 32-byte random token in an HttpOnly, SameSite=Strict cookie. Only its SHA-256
is stored, so a copy of the database does not hand out live sessions. Each session has its
own CSRF token, which the page sends back in a header on every POST.

Districts: each operator serves some districts (comma-separated codes, `*` for all, the
central centre's desks); every view and action of the console is limited to them.

Audit: every sign-in, every view of personal data (a device's address) or video, and every
action, with who, when and what; exported as CSV. Rows are only ever added.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import secrets
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ansimi.districts import UnknownDistrict, check_district
from ansimi.files import private_database
from console.errors import ConsoleError
from protocol.clock import wall_ms

SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SESSION_IDLE_S = 12 * 3600  # a night shift, then sign in again
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")

SCHEMA = """
CREATE TABLE IF NOT EXISTS operators (
    name        TEXT PRIMARY KEY,
    pw_hash     TEXT NOT NULL,       -- scrypt$n$r$p$salt_hex$hash_hex
    created_ms  INTEGER NOT NULL,
    disabled    INTEGER NOT NULL DEFAULT 0,
    districts   TEXT NOT NULL DEFAULT '*'  -- comma-separated district codes; * is all
);
CREATE TABLE IF NOT EXISTS sessions (
    token_sha256 TEXT PRIMARY KEY,
    operator     TEXT NOT NULL REFERENCES operators(name),
    csrf         TEXT NOT NULL,
    created_ms   INTEGER NOT NULL,
    seen_ms      INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms    INTEGER NOT NULL,
    operator TEXT NOT NULL,
    action   TEXT NOT NULL,
    target   TEXT NOT NULL,
    detail   TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS stages (
    event_id TEXT NOT NULL,
    stage    TEXT NOT NULL,
    at_ms    INTEGER NOT NULL,
    operator TEXT NOT NULL,
    PRIMARY KEY (event_id, stage)
);
"""


class OperatorError(ConsoleError):
    """Root of the console's operator errors."""


class BadOperatorName(OperatorError, ValueError):
    pass


class WeakPassword(OperatorError, ValueError):
    pass


class OperatorExists(OperatorError, ValueError):
    pass


class BadDistrict(OperatorError, ValueError):
    pass


ALL_DISTRICTS = ("*",)


@dataclass(frozen=True, slots=True)
class Session:
    operator: str
    csrf: str
    districts: tuple[str, ...] = ALL_DISTRICTS

    @property
    def sees_all(self) -> bool:
        return "*" in self.districts

    def sees(self, district: str) -> bool:
        return self.sees_all or district in self.districts


def hash_password(password: str, salt: bytes | None = None) -> str:
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode("utf-8", "surrogatepass"),
        salt=salt,
        n=SCRYPT_N,
        r=SCRYPT_R,
        p=SCRYPT_P,
        dklen=32,
    )
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${digest.hex()}"


def password_matches(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt_hex, hash_hex = stored.split("$")
        if scheme != "scrypt":
            return False
        digest = hashlib.scrypt(
            # JSON may carry a lone surrogate ("\udcb2"): it must cost a check, not a 500
            password.encode("utf-8", "surrogatepass"),
            salt=bytes.fromhex(salt_hex),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(hash_hex) // 2,
        )
    except ValueError:
        return False
    return hmac.compare_digest(digest.hex(), hash_hex)


# checked when the name is unknown, so a wrong name costs as long as a wrong password
_DUMMY_HASH = hash_password("not a password", salt=b"\0" * 16)


def check_hash(password: str, stored: str | None) -> bool:
    """`stored` None (no such operator) costs as long as a wrong password."""
    matches = password_matches(password, stored or _DUMMY_HASH)
    return stored is not None and matches


def valid_name(name: str) -> bool:
    return 1 <= len(name) <= 64 and set(name) <= NAME_CHARS


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Operators:
    def __init__(self, path: Path | str, *, clock_ms: Callable[[], int] | None = None) -> None:
        self._db = sqlite3.connect(private_database(path), isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
        self._migrate()
        self._clock_ms = clock_ms or wall_ms

    def _migrate(self) -> None:
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(operators)")}
        if "districts" not in columns:
            # operators from before districts served all of them: keep it so, explicitly
            self._db.execute("ALTER TABLE operators ADD COLUMN districts TEXT NOT NULL DEFAULT '*'")

    # ---- accounts ---------------------------------------------------------------------

    def add(self, name: str, password: str, districts: Sequence[str] = ALL_DISTRICTS) -> None:
        if not valid_name(name):
            raise BadOperatorName(f"operator name {name!r}: use 1-64 of a-z, 0-9, '-', '_' and '.'")
        if len(password) < 10:
            raise WeakPassword("the password must have at least 10 characters")
        try:
            codes = [check_district(d, allow_all=True) for d in districts]
        except UnknownDistrict as exc:
            raise BadDistrict(str(exc)) from None
        if not codes:
            raise BadDistrict("an operator needs at least one district ('*' for all)")
        try:
            self._db.execute(
                "INSERT INTO operators (name, pw_hash, created_ms, districts) VALUES (?, ?, ?, ?)",
                (name, hash_password(password), self._clock_ms(), ",".join(codes)),
            )
        except sqlite3.IntegrityError:
            raise OperatorExists(f"operator {name} exists already: choose another name") from None
        self.audit("console", "add_operator", name, districts=codes)

    def names(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT name FROM operators ORDER BY name")]

    def password_hash(self, name: str) -> str | None:
        """The stored hash of an enabled operator; check it with `check_hash` (slow: off
        the event loop)."""
        row = self._db.execute(
            "SELECT pw_hash FROM operators WHERE name = ? AND disabled = 0", (name,)
        ).fetchone()
        return str(row[0]) if row else None

    def check_password(self, name: str, password: str) -> bool:
        return check_hash(password, self.password_hash(name))

    # ---- sessions ---------------------------------------------------------------------

    def open_session(self, name: str) -> tuple[str, Session]:
        token = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(32)
        now = self._clock_ms()
        self._db.execute(
            "INSERT INTO sessions VALUES (?, ?, ?, ?, ?)", (_sha(token), name, csrf, now, now)
        )
        return token, Session(name, csrf, self._districts(name))

    def _districts(self, name: str) -> tuple[str, ...]:
        row = self._db.execute("SELECT districts FROM operators WHERE name = ?", (name,)).fetchone()
        return tuple(str(row[0]).split(",")) if row else ()

    def session(self, token: str | None) -> Session | None:
        if not token or not token.isascii():  # ours are; a stray byte is no session, no 500
            return None
        now = self._clock_ms()
        key = _sha(token)
        row = self._db.execute(
            "SELECT s.operator, s.csrf, s.seen_ms, o.districts FROM sessions s JOIN operators o"
            " ON o.name = s.operator WHERE s.token_sha256 = ? AND o.disabled = 0",
            (key,),
        ).fetchone()
        if row is None:
            return None
        operator, csrf, seen_ms, districts = row
        if now - seen_ms > SESSION_IDLE_S * 1000:
            self._db.execute("DELETE FROM sessions WHERE token_sha256 = ?", (key,))
            return None
        if now - seen_ms > 60_000:  # one write a minute per session, not one per request
            self._db.execute("UPDATE sessions SET seen_ms = ? WHERE token_sha256 = ?", (now, key))
        return Session(operator, csrf, tuple(str(districts).split(",")))

    def close_session(self, token: str) -> None:
        self._db.execute("DELETE FROM sessions WHERE token_sha256 = ?", (_sha(token),))

    # ---- stages -----------------------------------------------------------------------

    def set_stage(self, event_id: str, stage: str, operator: str) -> int:
        at = self._clock_ms()
        self._db.execute(
            "INSERT OR IGNORE INTO stages VALUES (?, ?, ?, ?)", (event_id, stage, at, operator)
        )
        return at

    def stages(self, event_ids: list[str]) -> dict[str, list[dict[str, Any]]]:
        found: dict[str, list[dict[str, Any]]] = {}
        for start in range(0, len(event_ids), 500):
            chunk = event_ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                f"SELECT event_id, stage, at_ms, operator FROM stages"  # noqa: S608 (only ?s)
                f" WHERE event_id IN ({marks}) ORDER BY at_ms",
                chunk,
            )
            for event_id, stage, at_ms, operator in rows:
                found.setdefault(event_id, []).append(
                    {"stage": stage, "at_ms": at_ms, "operator": operator}
                )
        return found

    # ---- audit ------------------------------------------------------------------------

    def audit(self, operator: str, action: str, target: str, **detail: Any) -> None:
        self._db.execute(
            "INSERT INTO audit (at_ms, operator, action, target, detail) VALUES (?, ?, ?, ?, ?)",
            (self._clock_ms(), operator, action, target, json.dumps(detail, sort_keys=True)),
        )

    def audit_rows(self) -> list[tuple[int, int, str, str, str, str]]:
        return list(self._db.execute("SELECT * FROM audit ORDER BY seq"))

    def audit_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["seq", "at_utc", "at_ms", "operator", "action", "target", "detail"])
        for seq, at_ms, operator, action, target, detail in self.audit_rows():
            at = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at_ms / 1000))
            # a cell starting with = + - @ would be a formula in a spreadsheet: defuse it
            cells = [_cell(c) for c in (operator, action, target, detail)]
            writer.writerow([seq, f"{at}.{at_ms % 1000:03d}Z", at_ms, *cells])
        return out.getvalue()

    def close(self) -> None:
        self._db.close()


def _cell(text: str) -> str:
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text
