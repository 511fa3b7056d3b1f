"""A real PostgreSQL for tests: initdb and pg_ctl in a temporary folder, loopback only.

As root the server tools run as the `postgres` user (initdb refuses root), so the folder is
made under /tmp, which that user can reach (pytest's own temporary folders are root's alone).
"""

from __future__ import annotations

import glob
import os
import random
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from ansimi.broker import free_port

SUPERUSER = "ansimi"


def postgres_bin() -> Path | None:
    """The newest installed server's bin folder (Debian: /usr/lib/postgresql/N/bin)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/postgres"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    return Path(found[-1]).parent if found else None


def new_postgres() -> PgServer:
    """A new, started PostgreSQL; skips only when the server is not installed."""
    bin = postgres_bin()
    if bin is None:
        pytest.skip(
            "PostgreSQL server binaries absent (/usr/lib/postgresql/*/bin/postgres): "
            "`apt-get install -y postgresql` (scripts/system-deps.sh does)"
        )
    server = PgServer.create(bin)
    server.start()
    return server


def _as_postgres(*argv: str | Path) -> list[str]:
    command = [str(a) for a in argv]
    return ["runuser", "-u", "postgres", "--", *command] if os.getuid() == 0 else command


@dataclass
class PgServer:
    bin: Path
    folder: Path
    port: int

    @property
    def data(self) -> Path:
        return self.folder / "data"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    @classmethod
    def create(cls, bin: Path, *, fsync: bool = False) -> PgServer:
        """A new cluster, not yet started. `fsync` off makes tests quick; a bench keeps it."""
        folder = Path(tempfile.mkdtemp(prefix="ansimi-pg-", dir="/tmp"))
        if os.getuid() == 0:
            shutil.chown(folder, "postgres", "postgres")
        server = cls(bin, folder, free_port())
        subprocess.run(
            _as_postgres(
                bin / "initdb",
                "-D",
                server.data,
                "-A",
                "trust",
                "-U",
                SUPERUSER,
                "--no-sync",
                "-E",
                "UTF8",
            ),
            check=True,
            capture_output=True,
        )
        settings = (
            f"listen_addresses = '127.0.0.1'\nport = {server.port}\n"
            f"unix_socket_directories = '{folder}'\nmax_connections = 60\n"
            f"fsync = {'on' if fsync else 'off'}\n"
        )
        with (server.data / "postgresql.conf").open("a") as conf:
            conf.write(settings)
        return server

    def start(self) -> None:
        subprocess.run(
            _as_postgres(
                self.bin / "pg_ctl",
                "-D",
                self.data,
                "-l",
                self.folder / "server.log",
                "-w",
                "start",
            ),
            check=True,
            capture_output=True,
        )

    def stop(self, mode: str = "fast") -> None:
        subprocess.run(
            _as_postgres(self.bin / "pg_ctl", "-D", self.data, "-m", mode, "-w", "stop"),
            check=False,
            capture_output=True,
        )

    def psql(self, sql: str, database: str = "postgres") -> str:
        return subprocess.run(
            [
                "psql",
                "-X",
                "-q",
                "-t",
                "-A",
                "-v",
                "ON_ERROR_STOP=1",
                self.url(database),
                "-c",
                sql,
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout

    def new_database(self) -> str:
        """A fresh, empty database's URL: each test gets its own."""
        name = f"t{random.getrandbits(48):012x}"
        self.psql(f"CREATE DATABASE {name}")
        return self.url(name)

    def standby(self) -> PgServer:
        """A streaming standby of this (running) server, started, on a port of its own."""
        folder = Path(tempfile.mkdtemp(prefix="ansimi-pg-standby-", dir="/tmp"))
        if os.getuid() == 0:
            shutil.chown(folder, "postgres", "postgres")
        standby = PgServer(self.bin, folder, free_port())
        subprocess.run(
            _as_postgres(
                self.bin / "pg_basebackup",
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                SUPERUSER,
                "-D",
                standby.data,
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
            ),
            check=True,
            capture_output=True,
        )
        with (standby.data / "postgresql.conf").open("a") as conf:
            conf.write(f"port = {standby.port}\nunix_socket_directories = '{folder}'\n")
        standby.start()
        return standby

    def wait_for_replay(self, timeout_s: float = 10.0) -> None:
        """Until this standby has replayed all it has been sent (the test's rows are there)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            lag = self.psql(
                "SELECT pg_last_wal_receive_lsn() IS NOT NULL"
                " AND pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn()"
            )
            if lag.strip() == "t":
                return
            time.sleep(0.05)
        raise TimeoutError(f"standby on {self.port} did not catch up in {timeout_s} s")

    def promote(self) -> None:
        subprocess.run(
            _as_postgres(self.bin / "pg_ctl", "-D", self.data, "-w", "promote"),
            check=True,
            capture_output=True,
        )

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)
