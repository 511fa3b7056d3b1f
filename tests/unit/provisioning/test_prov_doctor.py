"""`ansimi provision doctor` on a site with nothing running: what fails says the fix."""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from ansimi.broker import free_port
from provisioning.cli import provision
from provisioning.doctor import check_site
from siteca.site import Site, init_site


@pytest.fixture
def site_dir(tmp_path: Path) -> Path:
    made = init_site(
        tmp_path / "site",
        site="doc",
        listen_host="127.0.0.1",
        port=free_port(),
        api_port=free_port(),
        centre_url=f"http://127.0.0.1:{free_port()}/events",
    )
    return made.layout.root


def test_nothing_running_fails_each_service_with_the_command_that_starts_it(
    site_dir: Path,
) -> None:
    checks = check_site(site_dir, timeout_s=1.0)
    failed = {c.name.split(" ")[0]: c.detail for c in checks if not c.ok}
    assert set(failed) == {"broker", "gateway", "centre"}
    assert f"mosquitto -c {site_dir}/broker/mosquitto.conf" in failed["broker"]
    assert f"ansimi gateway run --config {site_dir}/gateway/gateway.toml" in failed["gateway"]
    assert "gateway.toml" in failed["centre"]
    assert all(c.ok for c in checks if c.name.startswith(("certificate", "file modes")))
    result = CliRunner().invoke(provision, ["doctor", "--dir", str(site_dir)])
    assert result.exit_code == 1 and "FAIL" in result.output and "pass" in result.output


def test_a_key_readable_by_others_fails_with_the_chmod_that_fixes_it(site_dir: Path) -> None:
    token = site_dir / "gateway" / "tokens" / "admin.token"
    token.chmod(0o644)
    (modes,) = [c for c in check_site(site_dir, timeout_s=1.0) if c.name == "file modes"]
    assert not modes.ok and f"chmod 600 {token}" in modes.detail


def test_a_certificate_near_expiry_fails_naming_the_renewal(site_dir: Path) -> None:
    api_cert_end = dt.datetime.now(dt.UTC) + dt.timedelta(days=10 * 365)
    checks = check_site(site_dir, now=api_cert_end - dt.timedelta(days=5), timeout_s=1.0)
    (api,) = [c for c in checks if c.name == "certificate gateway/api.crt"]
    assert not api.ok and f"ansimi provision api-cert --dir {site_dir}" in api.detail
    (ca,) = [c for c in checks if c.name == "certificate ca/ca.crt"]
    assert ca.ok  # the CA lives twenty years


def test_no_site_is_one_failed_check_naming_init_site(tmp_path: Path) -> None:
    (only,) = check_site(tmp_path / "nowhere")
    assert not only.ok and "ansimi provision init-site" in only.detail


def test_another_program_on_the_broker_port_is_named_not_taken_for_a_stopped_broker(
    site_dir: Path,
) -> None:
    # issue 19: a port taken by another program is not fixed by "start it"
    site = Site.open(site_dir)
    host, port = site.local_broker_address()
    api_port = site.info.api_port
    with another_program(host, port), another_program("127.0.0.1", api_port):
        checks = {c.name.split(" ")[0]: c for c in check_site(site_dir, timeout_s=2.0)}
    broker, api = checks["broker"], checks["gateway"]
    assert not broker.ok
    assert f"something listens on {host}:{port} but is not this site's broker" in broker.detail
    assert f"ss -ltnp 'sport = :{port}'" in broker.detail
    assert not api.ok
    assert f"something listens on port {api_port} but is not this site's gateway API" in api.detail
    assert f"ss -ltnp 'sport = :{api_port}'" in api.detail and "[api] port" in api.detail


@contextlib.contextmanager
def another_program(host: str, port: int) -> Iterator[None]:
    """A plain HTTP server on host:port, as another program on the machine might be."""
    server = ThreadingHTTPServer((host, port), BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
