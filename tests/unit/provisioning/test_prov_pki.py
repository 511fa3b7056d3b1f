"""The site CA: what it signs, what it refuses, and its CRL."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from siteca import pki
from siteca.errors import CsrRejected, InvalidName, PemError, ProvisioningError

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def ca() -> pki.CertAuthority:
    return pki.create_ca("testsite", now=NOW)


def _eku(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


@pytest.mark.parametrize("key_type", ["ed25519", "p256"])
def test_ca_is_a_self_signed_ca_that_signs_only_leaves(key_type: pki.KeyType) -> None:
    key, cert = pki.create_ca("testsite", key_type=key_type, now=NOW)
    pki.verify_issued_by(cert, cert)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    assert cert.not_valid_after_utc - NOW > dt.timedelta(days=19 * 365)
    assert key.public_key() == cert.public_key()


@pytest.mark.parametrize(
    "client_key", [Ed25519PrivateKey.generate(), ec.generate_private_key(ec.SECP256R1())]
)
def test_client_cert_chains_to_the_ca_with_cn_and_client_auth(
    ca: pki.CertAuthority, client_key: pki.PrivateKey
) -> None:
    cert = pki.issue_client_cert(ca, "bell-0001", client_key.public_key(), 30, now=NOW)
    pki.verify_issued_by(ca.cert, cert)
    assert pki.common_name(cert) == "bell-0001"
    assert cert.public_key() == client_key.public_key()
    assert _eku(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # backdated for devices whose clock lags until NTP answers
    assert cert.not_valid_before_utc == NOW - pki.BACKDATE
    assert cert.not_valid_after_utc == NOW - pki.BACKDATE + dt.timedelta(days=30)


def test_leaf_never_outlives_the_ca(ca: pki.CertAuthority) -> None:
    key = pki.generate_key()
    cert = pki.issue_client_cert(ca, "bell-0001", key.public_key(), 100 * 365, now=NOW)
    assert cert.not_valid_after_utc == ca.cert.not_valid_after_utc


def test_certificate_from_another_ca_does_not_verify(ca: pki.CertAuthority) -> None:
    other = pki.create_ca("othersite", now=NOW)
    cert = pki.issue_client_cert(other, "bell-0001", pki.generate_key().public_key(), now=NOW)
    with pytest.raises(ValueError, match="not issued by"):
        pki.verify_issued_by(ca.cert, cert)


def test_server_cert_always_names_localhost_and_loopback(ca: pki.CertAuthority) -> None:
    key, cert = pki.issue_server_cert(ca, ["broker.example.net", "10.0.0.5"], now=NOW)
    pki.verify_issued_by(ca.cert, cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.example.net", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("127.0.0.1"),
    ]
    assert _eku(cert) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert pki.common_name(cert) == "broker.example.net"
    assert key.public_key() == cert.public_key()


@pytest.mark.parametrize("name", ["*.example.net", "two words", "bad_name.example", ""])
def test_server_cert_refuses_names_that_are_not_hosts(ca: pki.CertAuthority, name: str) -> None:
    with pytest.raises(InvalidName):
        pki.issue_server_cert(ca, [name], now=NOW)


@pytest.mark.parametrize(
    "cn", ["Bell-1", "a/b-c", "ab+c", "ab#c", "bell\nuser gw-x", "ab", "-bell", "bell é"]
)
def test_client_cert_refuses_a_cn_that_is_not_an_id(ca: pki.CertAuthority, cn: str) -> None:
    with pytest.raises(InvalidName) as caught:
        pki.issue_client_cert(ca, cn, pki.generate_key().public_key(), now=NOW)
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, ProvisioningError)


def test_sign_csr_issues_the_key_in_the_csr_for_the_expected_cn(ca: pki.CertAuthority) -> None:
    key = pki.generate_key()
    cert = pki.sign_csr(ca, pki.make_csr(key, "bell-0002"), "bell-0002", now=NOW)
    pki.verify_issued_by(ca.cert, cert)
    assert pki.common_name(cert) == "bell-0002"
    assert cert.public_key() == key.public_key()


def test_sign_csr_refuses_a_cn_mismatch(ca: pki.CertAuthority) -> None:
    csr = pki.make_csr(pki.generate_key(), "bell-0002")
    with pytest.raises(CsrRejected, match=r"'bell-0002'.*'bell-0003'") as caught:
        pki.sign_csr(ca, csr, "bell-0003", now=NOW)
    assert isinstance(caught.value, ValueError)


def test_sign_csr_refuses_a_bad_signature(ca: pki.CertAuthority) -> None:
    der = x509.load_pem_x509_csr(pki.make_csr(pki.generate_key(), "bell-0002")).public_bytes(
        serialization.Encoding.DER
    )
    # the Ed25519 signature is the last 64 bytes: flip one bit of it
    tampered = x509.load_der_x509_csr(der[:-1] + bytes([der[-1] ^ 1]))
    pem = tampered.public_bytes(serialization.Encoding.PEM)
    with pytest.raises(CsrRejected, match="signature does not verify"):
        pki.sign_csr(ca, pem, "bell-0002", now=NOW)


def test_sign_csr_refuses_a_csr_signed_by_another_key(ca: pki.CertAuthority) -> None:
    # subject and key of one CSR, signature of another: the CSR proves no possession
    a = x509.load_pem_x509_csr(pki.make_csr(pki.generate_key(), "bell-0002"))
    b = x509.load_pem_x509_csr(pki.make_csr(pki.generate_key(), "bell-0002"))
    der_a, der_b = (c.public_bytes(serialization.Encoding.DER) for c in (a, b))
    spliced = x509.load_der_x509_csr(der_a[:-64] + der_b[-64:])
    with pytest.raises(CsrRejected, match="signature"):
        pki.sign_csr(ca, spliced.public_bytes(serialization.Encoding.PEM), "bell-0002")


@pytest.mark.parametrize("text", [b"", b"hello", b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"])
def test_sign_csr_refuses_what_is_not_a_csr(ca: pki.CertAuthority, text: bytes) -> None:
    with pytest.raises(CsrRejected, match="not a PEM certificate signing request"):
        pki.sign_csr(ca, text, "bell-0002")


def test_sign_csr_refuses_two_common_names(ca: pki.CertAuthority) -> None:
    key = pki.generate_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, "bell-0002"),
                    x509.NameAttribute(NameOID.COMMON_NAME, "gw-testsite"),
                ]
            )
        )
        .sign(key, None)
    )
    with pytest.raises(CsrRejected, match="exactly one common name"):
        pki.sign_csr(ca, csr.public_bytes(serialization.Encoding.PEM), "bell-0002")


def test_sign_csr_copies_no_requested_extension(ca: pki.CertAuthority) -> None:
    key = pki.generate_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bell-0002")]))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("evil.example")]), False)
        .sign(key, None)
    )
    cert = pki.sign_csr(ca, csr.public_bytes(serialization.Encoding.PEM), "bell-0002")
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_sign_csr_refuses_key_types_other_than_ed25519_and_p256(ca: pki.CertAuthority) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bell-0002")]))
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(CsrRejected, match="Ed25519 or ECDSA P-256"):
        pki.sign_csr(ca, csr.public_bytes(serialization.Encoding.PEM), "bell-0002")


def test_crl_lists_the_revoked_serials_and_is_signed_by_the_ca(ca: pki.CertAuthority) -> None:
    revoked_at = NOW - dt.timedelta(hours=1)
    crl = pki.build_crl(ca, {1234: revoked_at, 99: revoked_at}, crl_number=7, now=NOW)
    assert crl.is_signature_valid(ca.key.public_key())
    assert crl.get_revoked_certificate_by_serial_number(1234) is not None
    assert crl.get_revoked_certificate_by_serial_number(99) is not None
    assert crl.get_revoked_certificate_by_serial_number(5) is None
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 7
    entry = crl.get_revoked_certificate_by_serial_number(1234)
    assert entry is not None and entry.revocation_date_utc == revoked_at


def test_crl_stays_valid_as_long_as_the_ca(ca: pki.CertAuthority) -> None:
    # OpenSSL refuses every client once the CRL is past next-update: it must never expire first
    crl = pki.build_crl(ca, [], now=NOW)
    assert crl.next_update_utc == ca.cert.not_valid_after_utc
    assert crl.last_update_utc is not None and crl.last_update_utc <= NOW
    assert len(list(crl)) == 0


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_openssl_agrees_chain_and_crl(ca: pki.CertAuthority, tmp_path: Path) -> None:
    """An independent implementation checks the chain and the revocation."""
    good = pki.issue_client_cert(ca, "bell-0001", pki.generate_key().public_key())
    bad = pki.issue_client_cert(ca, "bell-0002", pki.generate_key().public_key())
    pki.write_cert(tmp_path / "ca.crt", ca.cert)
    (tmp_path / "crl.pem").write_bytes(pki.crl_to_pem(pki.build_crl(ca, [bad.serial_number])))
    for name, cert in (("good", good), ("bad", bad)):
        pki.write_cert(tmp_path / f"{name}.crt", cert)

    def verify(name: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["openssl", "verify", "-CAfile", "ca.crt", "-crl_check", "-CRLfile", "crl.pem",
             "-purpose", "sslclient", f"{name}.crt"],
            cwd=tmp_path, capture_output=True, text=True, check=False,
        )  # fmt: skip

    assert verify("good").returncode == 0, verify("good").stderr
    refused = verify("bad")
    assert refused.returncode != 0
    assert "certificate revoked" in refused.stdout + refused.stderr


def test_private_key_file_is_0600_and_replaced_atomically(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    old_umask = os.umask(0)
    try:
        pki.write_private_key(path, pki.generate_key())
        first = path.read_bytes()
        pki.write_private_key(path, pki.generate_key())
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() != first
    assert [p.name for p in tmp_path.iterdir()] == ["k.key"]  # no temporary file left
    assert isinstance(pki.read_private_key(path), Ed25519PrivateKey)


def test_pem_readers_name_the_file_at_fault(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not pem\n")
    for reader in (pki.read_cert, pki.read_private_key, pki.read_crl):
        with pytest.raises(PemError, match=str(junk)):
            reader(junk)
    with pytest.raises(PemError, match="no certificate at"):
        pki.read_cert(tmp_path / "missing.crt")


def test_load_ca_refuses_a_key_that_is_not_the_cas(ca: pki.CertAuthority, tmp_path: Path) -> None:
    pki.write_cert(tmp_path / "ca.crt", ca.cert)
    pki.write_private_key(tmp_path / "ca.key", pki.generate_key())
    with pytest.raises(PemError, match="not the key of the CA"):
        pki.load_ca(tmp_path / "ca.key", tmp_path / "ca.crt")
