from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import warnings
from collections.abc import Callable, Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hypothesis import example, given
from hypothesis import strategies as st
from joserfc import jws as jose_jws
from joserfc.errors import SecurityWarning
from joserfc.jwk import OKPKey
from protocol_testkit import DEVICE, DEVICE_KEY, GATEWAY_KEY, device_ids

from protocol import (
    MAX_TOKEN_BYTES,
    BadSignature,
    Malformed,
    Oversized,
    ProtocolError,
    Signer,
    UnknownSigner,
    Verified,
    peek_kid,
    verify,
)
from protocol.ids import check_id
from protocol.jws import _KID_BY_HEADER

Resolve = Callable[[str], Ed25519PublicKey]
PAYLOAD = b'{"hello":"world"}'


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: object, payload: bytes = PAYLOAD, key: Ed25519PrivateKey = DEVICE_KEY) -> str:
    """A token with any header, correctly Ed25519-signed, to isolate the header checks."""
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    signing_input = f"{b64(head)}.{b64(payload)}"
    return f"{signing_input}.{b64(key.sign(signing_input.encode()))}"


@pytest.fixture(autouse=True)
def _cold_header_cache() -> Iterator[None]:
    # each test sees the full header parse, not a result cached by an earlier one
    _KID_BY_HEADER.clear()
    yield
    _KID_BY_HEADER.clear()


@pytest.fixture
def no_jose_deprecation_warning() -> Iterator[None]:
    # joserfc flags "EdDSA" as superseded by "Ed25519" (RFC 9864); our profile still uses it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SecurityWarning)
        yield


# -- happy path --------------------------------------------------------------------------


def test_sign_verify(device_signer: Signer, resolve: Resolve) -> None:
    token = device_signer.sign(PAYLOAD)
    assert verify(token, resolve) == Verified(DEVICE, PAYLOAD, token)
    assert verify(token.encode(), resolve) == Verified(DEVICE, PAYLOAD, token)
    assert peek_kid(token) == DEVICE
    assert peek_kid(token.encode()) == DEVICE


def test_header_is_compact_with_fixed_key_order(device_signer: Signer) -> None:
    header_b64 = device_signer.sign(b"").split(".")[0]
    assert base64.urlsafe_b64decode(header_b64 + "==") == b'{"alg":"EdDSA","kid":"bell-0001"}'


def test_sign_is_deterministic_and_matches_the_primitive(device_signer: Signer) -> None:
    token = device_signer.sign(PAYLOAD)
    assert token == device_signer.sign(PAYLOAD)
    head, body, sig = token.split(".")
    assert base64.urlsafe_b64decode(sig + "==") == DEVICE_KEY.sign(f"{head}.{body}".encode())


def test_empty_payload(device_signer: Signer, resolve: Resolve) -> None:
    assert verify(device_signer.sign(b""), resolve).payload == b""


def test_signer_properties(device_signer: Signer) -> None:
    assert device_signer.kid == DEVICE
    assert device_signer.public_key == DEVICE_KEY.public_key()
    assert DEVICE in repr(device_signer)


def test_signer_refuses_bad_kid_and_key() -> None:
    with pytest.raises(Malformed, match="signer id"):
        Signer("Bad Kid", DEVICE_KEY)
    with pytest.raises(TypeError):
        Signer(DEVICE, DEVICE_KEY.public_key())  # type: ignore[arg-type]


def test_typ_header_is_allowed(resolve: Resolve) -> None:
    token = forge({"typ": "JOSE", "kid": DEVICE, "alg": "EdDSA"})
    assert verify(token, resolve).kid == DEVICE


def test_cached_header_gives_the_same_answers(device_signer: Signer, resolve: Resolve) -> None:
    token = device_signer.sign(PAYLOAD)
    first = verify(token, resolve)
    assert _KID_BY_HEADER  # the header is now cached
    assert verify(token, resolve) == first
    tampered = token[:-3] + ("B" if token[-3] == "A" else "A") + token[-2:]
    with pytest.raises(BadSignature):
        verify(tampered, resolve)


def test_only_verified_headers_are_cached(device_signer: Signer, resolve: Resolve) -> None:
    """A header is remembered once its signature verifies: a flood of forged or unknown
    signers' headers cannot fill the cache, nor push the fleet's headers out of it."""
    forged = forge({"alg": "EdDSA", "kid": DEVICE}, key=GATEWAY_KEY)  # the wrong key
    with pytest.raises(BadSignature):
        verify(forged, resolve)
    unknown = forge({"alg": "EdDSA", "kid": "stranger"})
    with pytest.raises(UnknownSigner):
        verify(unknown, lambda kid: {DEVICE: DEVICE_KEY.public_key()}[kid])
    assert not _KID_BY_HEADER
    token = device_signer.sign(PAYLOAD)
    verify(token, resolve)
    assert list(_KID_BY_HEADER.values()) == [DEVICE]


def test_a_fleet_larger_than_4096_stays_cached() -> None:
    """Every device's heartbeat passes the gateway: a cache smaller than the fleet was
    emptied again and again, and each header parsed again (4,096 was the old bound)."""
    key = DEVICE_KEY.public_key()
    signers = [f"bell-{i:05d}" for i in range(5_000)]
    tokens = [forge({"alg": "EdDSA", "kid": kid}) for kid in signers]
    for token in tokens:
        verify(token, lambda _kid: key)
    assert len(_KID_BY_HEADER) == len(signers)


def test_a_signer_s_header_is_read_without_the_json_parser(
    device_signer: Signer, resolve: Resolve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each device's first message after a gateway starts (the bench's heartbeat phase:
    every message) has a header the cache has not seen; a JSON parse of it was ~10 % of
    the intake's time there."""
    parses: list[object] = []
    loads = json.loads
    monkeypatch.setattr(json, "loads", lambda *a, **k: parses.append(a) or loads(*a, **k))
    assert verify(device_signer.sign(PAYLOAD), resolve).kid == DEVICE
    assert parses == []
    # any other spelling of the same header still takes the JSON parser, and reads alike
    escaped = forge(b'{"alg":"EdDSA","kid":"bell\\u002d0001"}')
    assert verify(escaped, resolve).kid == DEVICE
    assert len(parses) == 1


# Between the signer's `{"alg":"EdDSA","kid":"` and `"}`: each character that matters to JSON
# (or to the kid grammar), and whole pieces of a forged header: a repeated alg or kid, a
# typ, another parameter, whitespace around a name, a kid spelled with escapes.
_KID_PIECES = st.one_of(
    st.sampled_from('ab1-."\\,:{}\n\t \x00\x7f\xe9\u2028'),
    st.sampled_from(
        [
            "bell-0001",
            '","alg":"none',
            '","alg":"EdDSA',
            '","kid":"bell-0002',
            '","typ":"JWT',
            '","crit":"x',
            '" , "kid" : "',
            "\\u0062ell-0001",
            '\\"',
            "\\\\",
        ]
    ),
)


def _json_kid(header: bytes) -> str | None:
    """The kid the full JSON reading accepts in `header`, None if it refuses the header."""
    try:
        params = json.loads(header, object_pairs_hook=_no_repeats)
        kid = params["kid"]
        check_id(kid, "kid")
    except (ValueError, KeyError, TypeError, ProtocolError):
        return None
    ok = (
        params.keys() <= {"alg", "kid", "typ"}
        and params["alg"] == "EdDSA"
        and isinstance(params.get("typ", ""), str)
    )
    return kid if ok else None


def _no_repeats(pairs: list[tuple[str, object]]) -> dict[str, object]:
    if len({name for name, _ in pairs}) != len(pairs):
        raise ValueError("a name repeated")
    return dict(pairs)


@given(st.lists(_KID_PIECES, max_size=6).map("".join))
@example('bell-0001","typ":"JWT')  # a valid header the shortcut must not refuse
@example('bell-0001","alg":"none')
@example('bell-0001","kid":"bell-0002')
def test_the_signer_s_header_form_reads_as_the_json_parser_reads_it(kid: str) -> None:
    """Whatever stands between `{"alg":"EdDSA","kid":"` and `"}`, the shortcut gives the
    JSON parser's answer: the same kid, or a refusal."""
    header = b'{"alg":"EdDSA","kid":"' + kid.encode() + b'"}'
    key = DEVICE_KEY.public_key()
    expected = _json_kid(header)
    _KID_BY_HEADER.clear()
    token = forge(header)
    if expected is None:
        with pytest.raises(ProtocolError):
            verify(token, lambda _kid: key)
    else:
        assert verify(token, lambda _kid: key).kid == expected


# -- interop with an independent JOSE implementation ---------------------------------------


@pytest.mark.usefixtures("no_jose_deprecation_warning")
def test_joserfc_verifies_our_tokens(device_signer: Signer) -> None:
    key = OKPKey.import_key(device_signer.public_key)
    token = device_signer.sign(PAYLOAD)
    obj = jose_jws.deserialize_compact(token, key, algorithms=["EdDSA"])
    assert obj.payload == PAYLOAD
    assert obj.headers() == {"alg": "EdDSA", "kid": DEVICE}


@pytest.mark.usefixtures("no_jose_deprecation_warning")
def test_joserfc_rejects_our_tokens_under_another_key(device_signer: Signer) -> None:
    other = OKPKey.import_key(GATEWAY_KEY.public_key())
    with pytest.raises(Exception, match="signature"):
        jose_jws.deserialize_compact(device_signer.sign(PAYLOAD), other, algorithms=["EdDSA"])


@pytest.mark.usefixtures("no_jose_deprecation_warning")
@pytest.mark.parametrize(
    "header",
    [
        {"alg": "EdDSA", "kid": "control-centre-1"},
        {"kid": "control-centre-1", "alg": "EdDSA", "typ": "JWT"},
    ],
)
def test_we_verify_joserfc_tokens(header: dict[str, str]) -> None:
    key = OKPKey.generate_key("Ed25519")
    token = jose_jws.serialize_compact(header, PAYLOAD, key, algorithms=["EdDSA"])
    public = key.public_key
    assert isinstance(public, Ed25519PublicKey)
    verified = verify(token, {"control-centre-1": public}.__getitem__)
    assert verified.payload == PAYLOAD
    assert verified.kid == "control-centre-1"


# -- refusals ----------------------------------------------------------------------------


def test_alg_none_is_refused(resolve: Resolve) -> None:
    header = b64(b'{"alg":"none","kid":"bell-0001"}')
    token = f"{header}.{b64(PAYLOAD)}."
    with pytest.raises(BadSignature, match="'none'"):
        verify(token, resolve)


def test_alg_hs256_key_confusion_is_refused(resolve: Resolve) -> None:
    # the classic attack: HMAC keyed with the public key bytes the verifier holds
    public = DEVICE_KEY.public_key().public_bytes_raw()
    header = b64(b'{"alg":"HS256","kid":"bell-0001"}')
    signing_input = f"{header}.{b64(PAYLOAD)}"
    mac = hmac.new(public, signing_input.encode(), hashlib.sha256).digest()
    with pytest.raises(BadSignature, match="HS256"):
        verify(f"{signing_input}.{b64(mac)}", resolve)


@pytest.mark.parametrize("alg", ["Ed25519", "eddsa", "EdDSA ", "ES256", "RS256", ""])
def test_other_algs_are_refused(alg: str, resolve: Resolve) -> None:
    with pytest.raises(BadSignature, match="only 'EdDSA'"):
        verify(forge({"alg": alg, "kid": DEVICE}), resolve)


@pytest.mark.parametrize(
    "header",
    [
        {"alg": "EdDSA", "kid": DEVICE, "crit": ["exp"], "exp": 1},
        {"alg": "EdDSA", "kid": DEVICE, "b64": False},
        {"alg": "EdDSA", "kid": DEVICE, "jwk": {"kty": "OKP"}},
        {"alg": "EdDSA", "kid": DEVICE, "jku": "https://evil.example/keys"},
        {"alg": "EdDSA", "kid": DEVICE, "x5u": "https://evil.example/cert"},
        {"alg": "EdDSA", "kid": DEVICE, "typ": 1},
        {"alg": "EdDSA"},
        {"alg": "EdDSA", "kid": 7},
        {"alg": "EdDSA", "kid": "Bell-0001"},
        {"alg": "EdDSA", "kid": "bell-0001\n"},
        {"alg": 1, "kid": DEVICE},
        {"kid": DEVICE},
        {},
        [],
        "EdDSA",
        None,
        b'{"alg":"EdDSA","kid":"bell-0001"',
        b'{"alg":"none","alg":"EdDSA","kid":"bell-0001"}',  # repeated names: parsers disagree
        b'{"alg":"EdDSA","kid":"gw-seoul-1","kid":"bell-0001"}',
        b'\xef\xbb\xbf{"alg":"EdDSA","kid":"bell-0001"}',
        b'{"alg":"EdDSA","kid":"bell-0001"}\xff',
        b"[" * 5000,
    ],
)
def test_bad_headers_are_malformed(header: object, resolve: Resolve) -> None:
    with pytest.raises(Malformed):
        verify(forge(header), resolve)


def test_header_with_escaped_names_is_read_like_any_json(resolve: Resolve) -> None:
    # "\u0061lg" is "alg": other parsers read it so, and so must we
    token = forge(b'{"\\u0061lg":"none","kid":"bell-0001"}')
    with pytest.raises(BadSignature):
        verify(token, resolve)


def test_unknown_signer(resolve: Resolve) -> None:
    token = Signer("stranger", Ed25519PrivateKey.generate()).sign(PAYLOAD)
    with pytest.raises(UnknownSigner, match="stranger"):
        verify(token, resolve)


def test_unknown_signer_raised_by_resolver_passes_through() -> None:
    def resolver(kid: str) -> Ed25519PublicKey:
        raise UnknownSigner(f"{kid} was revoked")

    with pytest.raises(UnknownSigner, match="revoked"):
        verify(Signer(DEVICE, DEVICE_KEY).sign(PAYLOAD), resolver)


def test_resolver_bugs_are_not_disguised() -> None:
    def resolver(kid: str) -> Ed25519PublicKey:
        raise RuntimeError("database down")

    with pytest.raises(RuntimeError):
        verify(Signer(DEVICE, DEVICE_KEY).sign(PAYLOAD), resolver)


def test_signed_by_another_key(resolve: Resolve) -> None:
    impostor = Signer(DEVICE, GATEWAY_KEY)
    with pytest.raises(BadSignature, match="does not verify"):
        verify(impostor.sign(PAYLOAD), resolve)


def test_spliced_payload(device_signer: Signer, resolve: Resolve) -> None:
    a = device_signer.sign(b'{"n":1}').split(".")
    b = device_signer.sign(b'{"n":2}').split(".")
    with pytest.raises(BadSignature):
        verify(f"{a[0]}.{b[1]}.{a[2]}", resolve)


def test_oversized_is_refused_before_parsing() -> None:
    calls: list[str] = []

    def resolver(kid: str) -> Ed25519PublicKey:
        calls.append(kid)
        return DEVICE_KEY.public_key()

    with pytest.raises(Oversized, match="20480 bytes"):
        verify(b"\x00garbage" * 2560, resolver)
    with pytest.raises(Oversized):
        verify("é" * (MAX_TOKEN_BYTES + 1), resolver)
    # a genuine, validly signed token is still refused unread when it is too big
    big = Signer(DEVICE, DEVICE_KEY).sign(b"x" * MAX_TOKEN_BYTES)
    with pytest.raises(Oversized):
        verify(big, resolver)
    with pytest.raises(Oversized):
        peek_kid(big)
    assert calls == []


def test_max_bytes_is_adjustable(device_signer: Signer, resolve: Resolve) -> None:
    token = device_signer.sign(PAYLOAD)
    with pytest.raises(Oversized):
        verify(token, resolve, max_bytes=len(token) - 1)
    assert verify(token, resolve, max_bytes=len(token)).payload == PAYLOAD


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t + ".",
        lambda t: t + ".e30",
        lambda t: t.replace(".", "", 1),
        lambda t: t.replace(".", ".."),
        lambda t: t + "=",
        lambda t: t.replace(".", "=.", 1),
        lambda t: t + "\n",
        lambda t: " " + t,
        lambda t: t[:20] + "\n" + t[20:],
        lambda t: t[:-2],  # signature no longer 64 bytes
        lambda t: t[:-1],  # signature text of impossible length
        lambda t: t.rsplit(".", 1)[0] + "." + b64(b"\x00" * 65),
        lambda t: t.rsplit(".", 1)[0] + ".",
        lambda t: t.replace("-", "+").replace("_", "/"),
        lambda t: t[:10] + "é" + t[11:],
        lambda t: "",
        lambda t: "..",
    ],
)
def test_structure_is_malformed(mangle: Callable[[str], str], resolve: Resolve) -> None:
    token = Signer(DEVICE, DEVICE_KEY).sign(b"\xfb\xff" * 8)  # payload text with - and _
    assert "-" in token and "_" in token
    with pytest.raises(Malformed):
        verify(mangle(token), resolve)


def test_non_canonical_signature_text_is_refused(device_signer: Signer, resolve: Resolve) -> None:
    token = device_signer.sign(PAYLOAD)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(token[-1])
    assert last % 16 == 0  # 86 characters for 64 bytes: the last one has 4 unused bits
    sibling = token[:-1] + alphabet[last + 1]
    # a lenient decoder sees the very same signature bytes...
    assert base64.urlsafe_b64decode(sibling.split(".")[2] + "==") == base64.urlsafe_b64decode(
        token.split(".")[2] + "=="
    )
    # ...so only the canonical-text rule stops this altered token from verifying
    with pytest.raises(Malformed, match="canonical"):
        verify(sibling, resolve)


def test_error_messages_stay_short(resolve: Resolve) -> None:
    with pytest.raises(BadSignature) as info:
        verify(forge({"alg": "A" * 5000, "kid": DEVICE}), resolve)
    assert len(str(info.value)) < 200
    with pytest.raises(Malformed) as info2:
        verify(forge({"alg": "EdDSA", "kid": DEVICE, "x" * 5000: 1}), resolve)
    assert len(str(info2.value)) < 200


# -- properties --------------------------------------------------------------------------


def _must_refuse(token: str | bytes, resolve: Resolve) -> None:
    with pytest.raises(ProtocolError):
        verify(token, resolve)


def test_every_single_bit_flip_is_refused(device_signer: Signer, resolve: Resolve) -> None:
    token = device_signer.sign(PAYLOAD).encode()
    for i in range(len(token)):
        for bit in range(8):
            flipped = bytearray(token)
            flipped[i] ^= 1 << bit
            _must_refuse(bytes(flipped), resolve)


def test_every_truncation_is_refused(device_signer: Signer, resolve: Resolve) -> None:
    token = device_signer.sign(PAYLOAD)
    for end in range(len(token)):
        _must_refuse(token[:end], resolve)
        _must_refuse(token[end + 1 :], resolve)


keys = st.binary(min_size=32, max_size=32).map(Ed25519PrivateKey.from_private_bytes)


@given(keys, device_ids, st.binary(max_size=500), st.data())
def test_any_byte_change_is_refused(
    key: Ed25519PrivateKey, kid: str, payload: bytes, data: st.DataObject
) -> None:
    token = Signer(kid, key).sign(payload).encode()
    resolve = {kid: key.public_key()}.__getitem__
    assert verify(token, resolve).payload == payload
    i = data.draw(st.integers(0, len(token) - 1))
    new = data.draw(st.integers(0, 255).filter(lambda b: b != token[i]))
    _must_refuse(token[:i] + bytes([new]) + token[i + 1 :], resolve)


@given(keys, device_ids, st.binary(max_size=500), st.data())
def test_any_character_change_or_cut_is_refused(
    key: Ed25519PrivateKey, kid: str, payload: bytes, data: st.DataObject
) -> None:
    token = Signer(kid, key).sign(payload)
    resolve = {kid: key.public_key()}.__getitem__
    i = data.draw(st.integers(0, len(token) - 1))
    new = data.draw(st.characters().filter(lambda c: c != token[i]))
    _must_refuse(token[:i] + new + token[i + 1 :], resolve)
    _must_refuse(token[:i], resolve)
    _must_refuse(token[:i] + data.draw(st.text(min_size=1, max_size=5)) + token[i:], resolve)


@given(st.binary(max_size=2000))
def test_random_bytes_raise_only_protocol_errors(junk: bytes) -> None:
    _must_refuse(junk, {DEVICE: DEVICE_KEY.public_key()}.__getitem__)
    with contextlib.suppress(ProtocolError):
        peek_kid(junk)


@given(st.text(max_size=2000))
def test_random_text_raises_only_protocol_errors(junk: str) -> None:
    _must_refuse(junk, {DEVICE: DEVICE_KEY.public_key()}.__getitem__)


@given(st.lists(st.text(alphabet="AQgw-_ab9=+/.", max_size=100), min_size=1, max_size=4))
def test_random_segments_raise_only_protocol_errors(parts: list[str]) -> None:
    _must_refuse(".".join(parts), {DEVICE: DEVICE_KEY.public_key()}.__getitem__)


header_values = st.none() | st.booleans() | st.integers() | st.text(max_size=8) | st.just(DEVICE)


@given(
    st.dictionaries(
        st.sampled_from(["alg", "kid", "typ", "crit", "b64", "jwk"]),
        st.sampled_from(["EdDSA", "none", "HS256"]) | header_values,
        max_size=4,
    )
)
def test_random_headers_raise_only_protocol_errors(header: dict[str, object]) -> None:
    token = forge(header)
    resolve = {DEVICE: DEVICE_KEY.public_key()}.__getitem__
    try:
        verify(token, resolve)
    except ProtocolError:
        return
    # the only headers that pass are the ones the profile allows
    assert header.get("alg") == "EdDSA"
    assert header.get("kid") == DEVICE
    assert set(header) <= {"alg", "kid", "typ"}


ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@given(st.text(alphabet=ALPHABET, max_size=40))
def test_canonical_base64url_rule_is_re_encoding(text: str) -> None:
    from protocol._b64 import b64url_decode, b64url_encode

    try:
        decoded = b64url_decode(text.encode(), "x")
    except Malformed:
        accepted = False
    else:
        accepted = True
        assert b64url_encode(decoded) == text.encode()
    if len(text) % 4 != 1:
        lenient = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        assert accepted == (b64(lenient) == text)


@pytest.mark.parametrize("text", ["not.a.jws", "hello.world.again", "eyJ.e30.AA"])
def test_text_that_is_no_jws_is_told_so(text: str, resolve: Resolve) -> None:
    """Not the base64 detail that happens to fail first ('unused trailing bits')."""
    with pytest.raises(Malformed, match="not a JWS: its first segment") as caught:
        verify(text, resolve)
    assert "trailing bits" not in str(caught.value).split("(")[0]
