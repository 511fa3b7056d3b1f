"""Making a site on disk, and revoking in it (without a broker; see the integration tests)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from cryptography import x509

from protocol.keys import load_private_key, public_key_from_b64
from provisioning import revoke
from siteca import pki, site
from siteca.errors import (
    InvalidName,
    ProvisioningError,
    SiteExists,
    SiteNotFound,
    UnknownCertificate,
)
from siteca.site import Site, init_site


def _snapshot(root: Path) -> dict[str, tuple[bytes, int, int]]:
    return {
        str(p.relative_to(root)): (
            p.read_bytes() if p.is_file() else b"",
            p.stat().st_mtime_ns,
            p.stat().st_mode,
        )
        for p in sorted(root.rglob("*"))
    }


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def made(tmp_path: Path) -> Site:
    init_site(tmp_path / "alpha", broker_names=["gw.alpha.example"], port=18883)
    return Site.open(tmp_path / "alpha")


def test_init_site_makes_ca_gateway_and_broker(made: Site) -> None:
    lay = made.layout
    assert made.info.name == "alpha" and made.gateway_id == "gw-alpha"
    for key in (lay.ca_key, lay.gateway_key, lay.gateway_tls_key):
        assert _mode(key) == 0o600, key
    assert _mode(lay.ca_dir) == 0o700 and _mode(lay.gateway_dir) == 0o700
    ca = made.ca()

    # the gateway's signing key, and the public half devices will be given
    signing = load_private_key(lay.gateway_key)
    assert public_key_from_b64(lay.gateway_pub.read_text().strip()) == signing.public_key()

    # the gateway's TLS identity is a CA-issued client certificate for its id
    gateway_cert = pki.read_cert(lay.gateway_cert)
    pki.verify_issued_by(ca.cert, gateway_cert)
    assert pki.common_name(gateway_cert) == "gw-alpha"
    assert pki.read_private_key(lay.gateway_tls_key).public_key() == gateway_cert.public_key()
    assert lay.issued_path(gateway_cert.serial_number).exists()
    assert lay.gateway_ca.read_bytes() == lay.ca_cert.read_bytes()

    files = lay.broker
    server = pki.read_cert(files.cert_file)
    pki.verify_issued_by(ca.cert, server)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "gw.alpha.example" in san.get_values_for_type(x509.DNSName)
    assert files.ca_file.read_bytes() == lay.ca_cert.read_bytes()
    crl = pki.read_crl(files.crl_file)
    assert crl.is_signature_valid(ca.key.public_key()) and len(list(crl)) == 0
    assert "user gw-alpha" in files.acl_file.read_text()
    conf = lay.broker_conf.read_text()
    assert f"acl_file {files.acl_file}" in conf and "listener 18883 0.0.0.0" in conf
    assert ".tmp-" not in conf  # paths point at the final site, not where it was built


def test_second_run_changes_nothing_and_says_so(made: Site) -> None:
    before = _snapshot(made.layout.root)
    again = init_site(made.layout.root)
    assert not again.created and again.files == []
    assert "already exists" in again.notes[0]
    # the same options given explicitly are no change either
    init_site(made.layout.root, site="alpha", broker_names=["gw.alpha.example"], port=18883)
    assert _snapshot(made.layout.root) == before


@pytest.mark.parametrize(
    "change", [{"site": "beta"}, {"port": 1883}, {"broker_names": ["other.example"]}]
)
def test_different_options_are_refused_without_force(made: Site, change: dict[str, object]) -> None:
    before = _snapshot(made.layout.root)
    with pytest.raises(SiteExists, match="--force") as caught:
        init_site(made.layout.root, **change)  # type: ignore[arg-type]
    assert isinstance(caught.value, FileExistsError)
    assert _snapshot(made.layout.root) == before


def test_force_replaces_the_whole_site(made: Site) -> None:
    old_ca = made.layout.ca_cert.read_bytes()
    result = init_site(made.layout.root, site="beta", force=True)
    assert result.created and "enrol every device again" in result.notes[0]
    fresh = Site.open(made.layout.root)
    assert fresh.info.name == "beta" and fresh.layout.ca_cert.read_bytes() != old_ca
    leftovers = [p.name for p in made.layout.root.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_a_directory_that_is_not_a_site_is_never_replaced(tmp_path: Path) -> None:
    target = tmp_path / "etc"
    target.mkdir()
    (target / "passwd").write_text("keep me")
    for force in (False, True):
        with pytest.raises(SiteExists, match="not a site"):
            init_site(target, site="alpha", force=force)
    assert (target / "passwd").read_text() == "keep me"


def test_an_empty_directory_becomes_a_site(tmp_path: Path) -> None:
    (tmp_path / "alpha").mkdir()
    assert init_site(tmp_path / "alpha").created


def test_an_interrupted_build_leaves_no_site_and_no_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def power_cut(*args: object, **kwargs: object) -> str:
        raise KeyboardInterrupt

    # late in the build: the CA and gateway keys already exist in the temporary directory
    monkeypatch.setattr(site, "render_acl", power_cut)
    with pytest.raises(KeyboardInterrupt):
        init_site(tmp_path / "alpha")
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_force_leaves_the_old_site_intact(
    made: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = _snapshot(made.layout.root)

    def power_cut(*args: object, **kwargs: object) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr(site, "render_acl", power_cut)
    with pytest.raises(KeyboardInterrupt):
        init_site(made.layout.root, force=True)
    assert _snapshot(made.layout.root) == before


def test_a_build_killed_outright_is_cleaned_up_by_the_next_run(tmp_path: Path) -> None:
    stale = tmp_path / ".alpha.tmp-abc123"
    (stale / "ca").mkdir(parents=True)
    (stale / "ca" / "ca.key").write_text("secret")
    init_site(tmp_path / "alpha")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alpha"]


def test_site_name_comes_from_the_directory_unless_given(tmp_path: Path) -> None:
    assert init_site(tmp_path / "Seoul_North").site.name == "seoul-north"
    with pytest.raises(InvalidName, match="--site"):
        init_site(tmp_path / "__")
    with pytest.raises(InvalidName):
        init_site(tmp_path / "x", site="Not Valid")


def test_opening_a_missing_or_incomplete_site_says_how_to_fix_it(
    tmp_path: Path, made: Site
) -> None:
    with pytest.raises(SiteNotFound, match="init-site"):
        Site.open(tmp_path / "nowhere")
    made.layout.broker.acl_file.unlink()
    with pytest.raises(SiteNotFound, match=r"incomplete \(missing broker/acl\)"):
        Site.open(made.layout.root)
    with pytest.raises(SiteNotFound):
        init_site(made.layout.root)


def test_issuing_records_the_certificate_and_refuses_gateway_ids(made: Site) -> None:
    cert = made.issue_client_cert("bell-0001", pki.generate_key().public_key())
    assert made.layout.issued_path(cert.serial_number).exists()
    assert {pki.common_name(c) for c in made.issued()} == {"gw-alpha", "bell-0001"}
    for reserved in ("gw-alpha", "gw-other"):
        with pytest.raises(InvalidName, match="reserved for gateways"):
            made.issue_client_cert(reserved, pki.generate_key().public_key())


def test_revoke_by_id_lists_every_certificate_and_denies_the_identity(made: Site) -> None:
    first = made.issue_client_cert("bell-0001", pki.generate_key().public_key())
    second = made.issue_client_cert("bell-0001", pki.generate_key().public_key())
    other = made.issue_client_cert("bell-0002", pki.generate_key().public_key())
    result = revoke.revoke_certificate(made.layout.root, "bell-0001", reason="stolen")
    assert {r.serial for r in result.revoked} == {first.serial_number, second.serial_number}
    assert result.denied_identities == ["bell-0001"]
    assert not result.reloaded and "not reloaded" in result.warnings[0]
    crl = pki.read_crl(made.layout.broker.crl_file)
    assert crl.is_signature_valid(made.ca().key.public_key())
    assert {r.serial_number for r in crl} == {first.serial_number, second.serial_number}
    assert crl.get_revoked_certificate_by_serial_number(other.serial_number) is None
    assert "user bell-0001\ntopic deny #" in made.layout.broker.acl_file.read_text()
    record = json.loads(made.layout.revocations_file.read_text())
    assert {r["reason"] for r in record["revoked"]} == {"stolen"}


def test_revoke_by_serial_keeps_an_identity_that_has_a_valid_certificate(made: Site) -> None:
    old = made.issue_client_cert("bell-0001", pki.generate_key().public_key())
    made.issue_client_cert("bell-0001", pki.generate_key().public_key())
    result = revoke.revoke_certificate(made.layout.root, f"{old.serial_number:X}")
    assert [r.serial for r in result.revoked] == [old.serial_number]
    assert result.denied_identities == []
    assert "bell-0001" not in made.layout.broker.acl_file.read_text()
    # the same by the explicit form, and by int: nothing new, a fresh CRL number
    again = revoke.revoke_certificate(made.layout.root, f"serial:{old.serial_number:x}")
    assert again.revoked == [] and [r.serial for r in again.already_revoked] == [old.serial_number]
    assert again.crl_number == result.crl_number + 1
    assert revoke.revoke_certificate(made.layout.root, old.serial_number).revoked == []


def test_revoke_refuses_what_the_ca_never_issued(made: Site) -> None:
    for target in ("bell-9999", "ABCDEF", "cn:bell-9999", "serial:1234", 1234):
        with pytest.raises(UnknownCertificate) as caught:
            revoke.revoke_certificate(made.layout.root, target)
        assert isinstance(caught.value, LookupError)
    # and wrote nothing
    assert len(list(pki.read_crl(made.layout.broker.crl_file))) == 0


def test_a_target_that_is_both_an_id_and_a_serial_must_be_spelled_out(made: Site) -> None:
    cert = made.issue_client_cert("bell-0001", pki.generate_key().public_key())
    # a device whose id reads as that serial in hex
    lookalike = f"{cert.serial_number:x}"
    made.issue_client_cert(lookalike, pki.generate_key().public_key())
    with pytest.raises(UnknownCertificate, match=f"cn:{lookalike} or serial:{lookalike}"):
        revoke.revoke_certificate(made.layout.root, lookalike)
    result = revoke.revoke_certificate(made.layout.root, f"cn:{lookalike}")
    assert result.denied_identities == [lookalike]


def test_init_site_writes_a_gateway_config_that_loads_and_points_at_the_site(
    tmp_path: Path,
) -> None:
    from ansimi.config import load_config
    from gateway.config import GatewayConfig

    init_site(tmp_path / "site", site="cfg", listen_host="0.0.0.0", port=18883)
    layout = Site.open(tmp_path / "site").layout
    config = load_config(layout.gateway_config, GatewayConfig)
    assert config.signing_key == layout.gateway_key
    assert config.enrol.site_dir == layout.root
    assert (config.mqtt.host, config.mqtt.port) == ("127.0.0.1", 18883)
    for path in (config.mqtt.ca_file, config.mqtt.cert_file, config.mqtt.key_file):
        assert path is not None and path.is_file()
    assert oct(layout.gateway_config.stat().st_mode & 0o777) == "0o600"
    # every district has a destination, or the gateway would refuse to start: the local
    # console (as the README starts it), with a secret of its own
    (central,) = config.centres
    assert (str(central.url), central.districts) == (site.LOCAL_CONSOLE_URL, ["*"])
    assert len(central.secret) == 64


def test_init_site_sends_the_alerts_to_the_centre_it_is_given(tmp_path: Path) -> None:
    from ansimi.config import load_config
    from gateway.config import GatewayConfig

    url = "https://central.example/ansimi/events"
    made = init_site(tmp_path / "site", site="cfg", centre_url=url)
    config = load_config(made.layout.gateway_config, GatewayConfig)
    assert [str(c.url) for c in config.centres] == [url]
    assert any(url in note for note in made.notes)
    with pytest.raises(ProvisioningError, match="--centre-url"):
        init_site(tmp_path / "other", site="cfg", centre_url='https://x.example/"\nid = "evil')
    assert not (tmp_path / "other").exists()


def test_init_site_writes_everything_a_gateway_needs_to_run_its_api_over_https(
    tmp_path: Path,
) -> None:
    # issue 19: the API had to be enabled by hand, with a token and an openssl certificate,
    # and the database and recordings stayed under /var/lib whatever the site
    from ansimi.config import load_config
    from ansimi.privacy import load_keyring
    from gateway.config import GatewayConfig

    made = init_site(tmp_path / "site", site="api", broker_names=["gw.api.example"])
    layout = made.layout
    config = load_config(layout.gateway_config, GatewayConfig)
    api = config.api
    assert api.enabled and (api.cert_file, api.key_file) == (layout.api_cert, layout.api_key)
    ca = pki.read_cert(layout.ca_cert)
    cert = pki.read_cert(layout.api_cert)
    pki.verify_issued_by(ca, cert)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "gw.api.example" in names.get_values_for_type(x509.DNSName)
    roles = {t.name: (t.role, t.districts) for t in api.tokens}
    assert roles == {"admin": ("admin", ["*"]), "central": ("operator", ["*"])}
    secrets_ = [t.secret for t in api.tokens]
    assert len(set(secrets_)) == 2 and all(len(s) >= 32 for s in secrets_)
    for path in (layout.api_key, layout.admin_token, layout.data_key):
        assert _mode(path) == 0o600, path
    assert len(load_keyring(config.privacy.key_file).keys) == 1
    assert config.store_url == f"sqlite://{layout.root / 'state' / 'gateway.db'}"
    assert config.video.recordings_dir == layout.root / "state" / "recordings"
    assert _mode(layout.state_dir) == 0o700
    assert made.site.api_url == "https://127.0.0.1:8480"


def test_a_system_site_keeps_the_gateway_state_in_var_lib(tmp_path: Path) -> None:
    from ansimi.config import load_config
    from gateway.config import GatewayConfig

    made = init_site(tmp_path / "site", site="sys", system=True, api_port=9443)
    config = load_config(made.layout.gateway_config, GatewayConfig)
    assert config.store_url == "sqlite:///var/lib/ansimi/gateway/gateway.db"
    assert config.video.recordings_dir == Path("/var/lib/ansimi/gateway/recordings")
    assert config.api.port == 9443 and not made.layout.state_dir.exists()
    with pytest.raises(SiteExists, match="API port"):
        init_site(made.layout.root, api_port=8480)
    assert not init_site(made.layout.root, system=True).created


def test_api_cert_renews_the_https_certificate_from_the_site_ca(tmp_path: Path) -> None:
    made = init_site(tmp_path / "site", site="renew")
    before = pki.read_cert(made.layout.api_cert)
    renewed = Site.open(made.layout.root).renew_api_cert()
    assert pki.read_cert(made.layout.api_cert).serial_number == renewed.serial_number
    assert renewed.serial_number != before.serial_number
    pki.verify_issued_by(pki.read_cert(made.layout.ca_cert), renewed)
    assert _mode(made.layout.api_key) == 0o600


def test_device_commands_with_the_site_find_its_gateway_and_admin_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # issue 19: `provision device add` as the README wrote it failed with "pass --gateway URL"
    import click

    from provisioning.device_cli import GatewayAccess

    for name in ("ANSIMI_GATEWAY_URL", "ANSIMI_ADMIN_TOKEN", "ANSIMI_ADMIN_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    made = init_site(tmp_path / "site", site="cli", api_port=9444)
    client = GatewayAccess(None, None, None).client(made.layout.root)
    assert client.base_url == "https://127.0.0.1:9444"
    with pytest.raises(click.UsageError, match="--dir SITE"):
        GatewayAccess(None, None, None).client(None)
