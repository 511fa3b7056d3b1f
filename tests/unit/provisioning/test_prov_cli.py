"""`ansimi provision ...` through the real top-level command."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from click.testing import CliRunner

from ansimi_edge.cli import cli
from siteca import pki
from siteca.site import Site


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["provision", *args])
    return result.exit_code, result.output


def test_init_site_json_then_again_changes_nothing(tmp_path: Path) -> None:
    target = tmp_path / "alpha"
    code, out = _run("init-site", "--dir", str(target), "--port", "18883", "--json")
    assert code == 0, out
    made = json.loads(out)
    assert made["created"] is True
    assert made["site"]["gateway_id"] == "gw-alpha"
    modes = {Path(f["path"]).name: f["mode"] for f in made["files"]}
    assert modes["ca.key"] == "0600" and modes["gateway.key"] == "0600"

    code, out = _run("init-site", "--dir", str(target), "--json")
    assert code == 0 and json.loads(out)["created"] is False

    code, out = _run("init-site", "--dir", str(target))
    assert code == 0 and "Nothing changed" in out


def test_init_site_prints_what_it_made(tmp_path: Path) -> None:
    code, out = _run("init-site", "--dir", str(tmp_path / "alpha"), "--site", "north-1")
    assert code == 0, out
    assert "Created site north-1" in out and "gw-north-1" in out
    assert "ca/ca.key" in out and "0600" in out


def test_init_site_refuses_to_replace_without_force(tmp_path: Path) -> None:
    target = tmp_path / "alpha"
    assert _run("init-site", "--dir", str(target))[0] == 0
    code, out = _run("init-site", "--dir", str(target), "--site", "beta")
    assert code == 1 and "--force" in out
    code, out = _run("init-site", "--dir", str(target), "--site", "beta", "--force", "--json")
    assert code == 0 and json.loads(out)["site"]["name"] == "beta"


def test_revoke_without_reload_reports_what_it_wrote(tmp_path: Path) -> None:
    target = tmp_path / "alpha"
    assert _run("init-site", "--dir", str(target))[0] == 0
    cert = Site.open(target).issue_client_cert("bell-0001", pki.generate_key().public_key())
    code, out = _run("revoke", "--dir", str(target), "bell-0001", "--no-reload", "--json")
    assert code == 0, out
    report = json.loads(out)
    assert [r["serial"] for r in report["revoked"]] == [f"{cert.serial_number:X}"]
    assert report["denied_identities"] == ["bell-0001"] and report["reloaded"] is False
    code, out = _run("revoke", "--dir", str(target), "bell-0404", "--no-reload")
    assert code == 1 and "issued no certificate" in out


def test_diagnostic_issues_a_read_only_identity_that_a_revocation_keeps_in_the_acl(
    tmp_path: Path,
) -> None:
    site_dir = tmp_path / "alpha"
    assert _run("init-site", "--dir", str(site_dir), "--port", "18883")[0] == 0
    code, out = _run(
        "diagnostic", "--dir", str(site_dir), "kim", "--out", str(tmp_path / "kim"),
        "--device", "bell-0001", "--no-reload", "--json",
    )  # fmt: skip
    assert code == 0, out
    issued = json.loads(out)
    assert issued["identity"] == "diag-kim" and issued["reads"] == "ansimi/v1/bell-0001/#"
    assert "mosquitto_sub" in issued["command"] and issued["reloaded"] is False
    cert = pki.read_cert(Path(issued["cert_file"]))
    assert pki.common_name(cert) == "diag-kim"
    acl = Site.open(site_dir).layout.broker.acl_file
    assert "user diag-kim\n" in acl.read_text()
    # another identity's revocation rewrites the ACL: the installer's grant stays
    key = pki.generate_key()
    Site.open(site_dir).issue_client_cert("bell-0002", key.public_key())
    assert _run("revoke", "--dir", str(site_dir), "bell-0002", "--no-reload")[0] == 0
    assert "topic read ansimi/v1/bell-0001/#" in acl.read_text()
    # and its own revocation shuts it out
    assert _run("revoke", "--dir", str(site_dir), "diag-kim", "--no-reload")[0] == 0
    text = acl.read_text()
    assert "topic read ansimi/v1/bell-0001/#" not in text
    assert "user diag-kim\ntopic deny #" in text


def test_init_site_warns_when_its_ports_are_taken_now(tmp_path: Path) -> None:
    # issue 19: said while a rebuild costs nothing, not when the broker will not start
    with socket.socket() as broker_port, socket.socket() as api_port:
        for held in (broker_port, api_port):
            held.bind(("127.0.0.1", 0))
            held.listen()
        ports = [str(s.getsockname()[1]) for s in (broker_port, api_port)]
        result = CliRunner().invoke(
            cli,
            ["provision", "init-site", "--dir", str(tmp_path / "alpha"), "--listen", "127.0.0.1",
             "--port", ports[0], "--api-port", ports[1]],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        for port, option in zip(ports, ("--port", "--api-port"), strict=True):
            (warning,) = [w for w in result.stderr.splitlines() if f"port {port} " in w]
            assert warning.startswith("WARNING:") and f"ss -ltnp 'sport = :{port}'" in warning
            assert f"{option} N --force" in warning
        code, out = _run("init-site", "--dir", str(tmp_path / "beta"), "--json",
                         "--listen", "127.0.0.1", "--port", ports[0])  # fmt: skip
        assert code == 0 and f"port {ports[0]} " in json.loads(out)["ports_taken"][0]
