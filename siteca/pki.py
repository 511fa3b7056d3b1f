"""The site's certificate authority: X.509 for the broker's mutual TLS, and its CRL.

One CA per site signs three kinds of certificate: the broker's server certificate, and a
client certificate for each device and for the gateway whose common name (CN) is the
device or gateway id. The broker takes that CN as the MQTT username
(`use_identity_as_username`), and the ACL grants topics by it: a certificate's CN is an
identity, so the CA only ever writes CNs it chose itself and never copies anything else
from a CSR.

Keys are Ed25519 by default, like the wire signatures (verified against mosquitto 2.0.11 and
Python's ssl with TLS 1.2 and 1.3); ECDSA P-256 is accepted for a client's public key and
can be chosen for a new CA, for hardware key stores that only do P-256.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Final, Literal, NamedTuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protocol.errors import Malformed
from protocol.ids import check_id
from siteca.errors import CsrRejected, InvalidName, PemError
from siteca.files import Owner, write_atomic

KeyType = Literal["ed25519", "p256"]
PrivateKey = Ed25519PrivateKey | ec.EllipticCurvePrivateKey
PublicKey = Ed25519PublicKey | ec.EllipticCurvePublicKey

# A CA that expires bricks every device at once, and nothing renews device certificates
# yet: long lifetimes, with revocation as the way to end one early.
CA_DAYS: Final = 20 * 365
SERVER_DAYS: Final = 10 * 365
CLIENT_DAYS: Final = 10 * 365
# A Raspberry Pi has no battery clock: until NTP answers it may believe it is hours or days
# in the past, and would reject a certificate "not yet valid". Backdating costs nothing.
BACKDATE: Final = dt.timedelta(days=1)
ORGANIZATION: Final = "Ansimi Edge"
ALWAYS_SERVER_NAMES: Final = ("localhost", "127.0.0.1")
_HOSTNAME_RE: Final = re.compile(
    r"(?=.{1,253}\Z)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


class CertAuthority(NamedTuple):
    """The CA's key and certificate; unpacks as `(key, cert)`."""

    key: PrivateKey
    cert: x509.Certificate


def _now(now: dt.datetime | None) -> dt.datetime:
    return now if now is not None else dt.datetime.now(dt.UTC)


def generate_key(key_type: KeyType = "ed25519") -> PrivateKey:
    if key_type == "ed25519":
        return Ed25519PrivateKey.generate()
    return ec.generate_private_key(ec.SECP256R1())


def _hash_for(key: PrivateKey) -> hashes.SHA256 | None:
    # Ed25519 hashes internally and cryptography wants None for it
    return None if isinstance(key, Ed25519PrivateKey) else hashes.SHA256()


def _check_public_key(public_key: object, what: str) -> PublicKey:
    if isinstance(public_key, Ed25519PublicKey):
        return public_key
    if isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(
        public_key.curve, ec.SECP256R1
    ):
        return public_key
    raise CsrRejected(
        f"{what} has a {type(public_key).__name__} key; the site CA signs only Ed25519 or "
        "ECDSA P-256 keys: generate one of those on the device"
    )


def check_identity(value: str, what: str = "common name") -> str:
    """A certificate CN becomes the MQTT username, an ACL line and a topic level: device-id
    grammar only (lowercase letters, digits, '-'), so none of those places needs escaping and
    no CN can smuggle '/', '+', '#' or a newline into a topic or the ACL file."""
    try:
        return check_id(value, what)
    except Malformed as exc:
        raise InvalidName(str(exc)) from None


def create_ca(
    site_name: str,
    *,
    key_type: KeyType = "ed25519",
    days: int = CA_DAYS,
    now: dt.datetime | None = None,
) -> CertAuthority:
    check_identity(site_name, "site name")
    key = generate_key(key_type)
    start = _now(now) - BACKDATE
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{site_name} site CA"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        # path_length=0: this CA signs leaf certificates only, never another CA
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, _hash_for(key))
    )
    return CertAuthority(key, cert)


def _leaf(
    ca: CertAuthority,
    common_name: str,
    public_key: PublicKey,
    validity: tuple[dt.datetime, dt.datetime],
    usage: x509.ObjectIdentifier,
    san: x509.SubjectAlternativeName | None = None,
) -> x509.Certificate:
    start, end = validity
    # a leaf outliving its CA would fail verification from the day the CA expires anyway
    end = min(end, ca.cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                    x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                ]
            )
        )
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    return builder.sign(ca.key, _hash_for(ca.key))


def _validity(days: int, now: dt.datetime | None) -> tuple[dt.datetime, dt.datetime]:
    start = _now(now) - BACKDATE
    return start, start + dt.timedelta(days=days)


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    if not _HOSTNAME_RE.fullmatch(name):
        raise InvalidName(
            f"broker name {name!r} is neither an IP address nor a host name "
            "(letters, digits, '-' and '.'; no wildcards)"
        )
    return x509.DNSName(name.lower())


def issue_server_cert(
    ca: CertAuthority,
    names: Sequence[str] = (),
    *,
    days: int = SERVER_DAYS,
    key_type: KeyType = "ed25519",
    now: dt.datetime | None = None,
) -> tuple[PrivateKey, x509.Certificate]:
    """A new key and certificate for the broker, valid for `names` plus localhost/127.0.0.1.

    Devices check the broker's name against these subject alternative names, so list every
    name and address they will dial.
    """
    ordered: list[str] = []
    for name in [*names, *ALWAYS_SERVER_NAMES]:
        if name not in ordered:
            ordered.append(name)
    san = x509.SubjectAlternativeName([_general_name(n) for n in ordered])
    key = generate_key(key_type)
    cert = _leaf(
        ca,
        ordered[0],
        key.public_key(),
        _validity(days, now),
        ExtendedKeyUsageOID.SERVER_AUTH,
        san,
    )
    return key, cert


def issue_client_cert(
    ca: CertAuthority,
    common_name: str,
    public_key: PublicKey,
    days: int = CLIENT_DAYS,
    *,
    now: dt.datetime | None = None,
    lifetime: dt.timedelta | None = None,
) -> x509.Certificate:
    """A TLS client certificate whose CN (the device or gateway id) is its MQTT identity.

    `lifetime` replaces `days` for a short-lived certificate (valid from five minutes ago),
    such as the one revocation uses once to take over a revoked client's connection.
    """
    check_identity(common_name)
    public_key = _check_public_key(public_key, f"the key for {common_name!r}")
    if lifetime is None:
        validity = _validity(days, now)
    else:
        start = _now(now) - dt.timedelta(minutes=5)
        validity = (start, _now(now) + lifetime)
    return _leaf(ca, common_name, public_key, validity, ExtendedKeyUsageOID.CLIENT_AUTH)


def make_csr(key: PrivateKey, cn: str) -> bytes:
    """A PEM CSR for `cn`, signed by `key` (what a device sends to be enrolled)."""
    check_identity(cn)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .sign(key, _hash_for(key))
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def sign_csr(
    ca: CertAuthority,
    csr_pem: bytes,
    expected_cn: str,
    days: int = CLIENT_DAYS,
    *,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """Issue a client certificate for the key in `csr_pem`, if it is for `expected_cn`.

    The CSR proves possession of the key and says which identity it asks for; the installer
    says which identity it should have. Only the public key is taken from the CSR: its other
    attributes and requested extensions are ignored, never copied.
    """
    check_identity(expected_cn, "expected common name")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError:
        raise CsrRejected(
            "not a PEM certificate signing request (expected '-----BEGIN CERTIFICATE "
            "REQUEST-----'); create one with `ansimi device enrol`"
        ) from None
    try:
        valid = csr.is_signature_valid
    except UnsupportedAlgorithm:
        valid = False
    if not valid:
        raise CsrRejected(
            f"CSR for {expected_cn!r}: its signature does not verify with the key it contains "
            "(corrupted in transit, or not made with that key); create a fresh CSR on the device"
        )
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1:
        raise CsrRejected(
            f"CSR must name exactly one common name, found {len(cns)}; expected {expected_cn!r}"
        )
    cn = cns[0].value
    if cn != expected_cn:
        shown = cn if isinstance(cn, str) else cn.decode(errors="replace")
        raise CsrRejected(
            f"CSR asks for common name {shown[:80]!r} but this enrolment is for {expected_cn!r}: "
            "check you are enrolling the right device"
        )
    public_key = _check_public_key(csr.public_key(), f"CSR for {expected_cn!r}")
    return issue_client_cert(ca, expected_cn, public_key, days, now=now)


def build_crl(
    ca: CertAuthority,
    revoked_serials: Iterable[int] | Mapping[int, dt.datetime],
    *,
    crl_number: int = 1,
    now: dt.datetime | None = None,
) -> x509.CertificateRevocationList:
    """A CRL listing `revoked_serials` (with their revocation times, when given as a mapping).

    Its next-update time is the CA's own expiry: mosquitto (OpenSSL) refuses *every* client
    once the CRL it holds is past next-update, and this CRL is only ever read by our own
    broker, which gets a new one whenever anything is revoked. A short validity would be a
    time bomb for the whole site.
    """
    moment = _now(now)
    times: Mapping[int, dt.datetime] = (
        revoked_serials if isinstance(revoked_serials, Mapping) else {}
    )
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(moment - BACKDATE)
        .next_update(ca.cert.not_valid_after_utc)
        .add_extension(x509.CRLNumber(crl_number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    for serial in sorted(set(revoked_serials)):
        entry = (
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(times.get(serial, moment))
            .build()
        )
        builder = builder.add_revoked_certificate(entry)
    return builder.sign(ca.key, _hash_for(ca.key))


def verify_issued_by(ca_cert: x509.Certificate, cert: x509.Certificate) -> None:
    """Raise ValueError unless `ca_cert` signed `cert` (raises, never returns a bool)."""
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        issuer = ca_cert.subject.rfc4514_string()
        raise ValueError(
            f"certificate {cert.serial_number:X} was not issued by {issuer}: "
            f"{exc or type(exc).__name__}"
        ) from None


def common_name(cert: x509.Certificate) -> str:
    values = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = values[0].value if values else ""
    return value if isinstance(value, str) else value.decode(errors="replace")


# ---- PEM -----------------------------------------------------------------------------------


def key_to_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def key_from_pem(data: bytes, where: str = "key") -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise PemError(
            f"{where}: not an unencrypted PEM private key ('-----BEGIN PRIVATE KEY-----')"
        ) from None
    if isinstance(key, Ed25519PrivateKey) or (
        isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)
    ):
        return key
    raise PemError(f"{where}: holds a {type(key).__name__}; expected Ed25519 or ECDSA P-256")


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def cert_from_pem(data: bytes, where: str = "certificate") -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise PemError(f"{where}: not a PEM certificate ('-----BEGIN CERTIFICATE-----')") from None


def crl_to_pem(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.PEM)


def crl_from_pem(data: bytes, where: str = "CRL") -> x509.CertificateRevocationList:
    try:
        return x509.load_pem_x509_crl(data)
    except ValueError:
        raise PemError(f"{where}: not a PEM CRL ('-----BEGIN X509 CRL-----')") from None


def write_private_key(path: Path, key: PrivateKey, *, owner: Owner | None = None) -> None:
    """Write `key` as PKCS#8 PEM, 0600 (0640 when a group `owner` must read it), atomically."""
    write_atomic(path, key_to_pem(key), mode=0o600 if owner is None else 0o640, owner=owner)


def write_cert(path: Path, cert: x509.Certificate, *, owner: Owner | None = None) -> None:
    write_atomic(path, cert_to_pem(cert), mode=0o644, owner=owner)


def read_private_key(path: Path) -> PrivateKey:
    return key_from_pem(_read(path, "private key"), str(path))


def read_cert(path: Path) -> x509.Certificate:
    return cert_from_pem(_read(path, "certificate"), str(path))


def read_crl(path: Path) -> x509.CertificateRevocationList:
    return crl_from_pem(_read(path, "CRL"), str(path))


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PemError(f"no {what} at {path}") from None
    except PermissionError:
        raise PemError(f"cannot read the {what} at {path}: run as its owner (or root)") from None


def load_ca(key_path: Path, cert_path: Path) -> CertAuthority:
    ca = CertAuthority(read_private_key(key_path), read_cert(cert_path))
    if ca.key.public_key() != ca.cert.public_key():
        raise PemError(f"{key_path} is not the key of the CA certificate {cert_path}")
    return ca
