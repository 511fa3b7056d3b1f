"""systemd notifications from the event loop never block it, even when nobody reads them."""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ansimi import sdnotify


@pytest.fixture
def unread_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    folder = Path(tempfile.mkdtemp(prefix="ansimi-notify-"))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(folder / "notify"))
    monkeypatch.setenv("NOTIFY_SOCKET", str(folder / "notify"))
    try:
        yield sock
    finally:
        sock.close()
        shutil.rmtree(folder, ignore_errors=True)


def test_a_reader_that_stops_reading_costs_notifications_not_a_frozen_loop(
    unread_socket: socket.socket,
) -> None:
    # the kernel queues only a few datagrams for an unread AF_UNIX socket; a blocking send
    # would hang here, on the event loop, forever
    results = [sdnotify.notify("WATCHDOG=1") for _ in range(1000)]
    assert results[0] is True
    assert results[-1] is False
    assert unread_socket.recv(64) == b"WATCHDOG=1"


def test_no_socket_means_not_under_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
