"""Personal data sealed at rest: AES-256-GCM field encryption with a per-site data key.

A victim's address, floor, phone numbers and notes are stored only as `seal()`ed text:
`v1.<key id>.<base64url(nonce || ciphertext || tag)>`. The nonce is 96 random bits per
seal. The associated data binds each ciphertext to its place (table, field, row id), so a
ciphertext copied into another victim's row, or into another field, fails to open instead
of showing the wrong person's address. Opening raises, never returns a bool or None.

The data key lives apart from the data: a key file readable by the service user only
(0600), or a systemd credential (`LoadCredential=NAME:/path`, read from
`$CREDENTIALS_DIRECTORY/NAME`). The file is a keyring: one key per line, `<kid> <key>`,
the first one current. Rotation puts a new key first, re-seals every field with it, and
only then drops the old keys, so a crash half-way leaves every field readable.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import secrets
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ansimi.errors import AnsimiError
from ansimi.files import write_atomic

PREFIX = "v1"
NONCE_BYTES = 12
KEY_BYTES = 32
HEADER = "# ansimi privacy keyring: <key id> <base64url key>, current key first. Keep secret.\n"


class PrivacyError(AnsimiError):
    """Root of the privacy module's errors."""


class KeyFileError(PrivacyError, OSError):
    """The data key cannot be read, is not safe, or is malformed; the message says the fix."""


class SealError(PrivacyError, ValueError):
    """A sealed value cannot be opened: tampered, moved, or sealed with an unknown key."""


@dataclass(frozen=True, slots=True)
class DataKey:
    kid: str
    key: bytes = field(repr=False)

    @classmethod
    def generate(cls) -> DataKey:
        return cls(secrets.token_hex(4), AESGCM.generate_key(bit_length=256))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def associated_data(table: str, column: str, row: str) -> bytes:
    # JSON, not "a|b|c": no choice of names can make two places share associated data
    return json.dumps([PREFIX, table, column, row], separators=(",", ":")).encode()


class Keyring:
    """Data keys by id; the first seals, any of them opens."""

    def __init__(self, keys: Sequence[DataKey], *, source: str = "the keyring") -> None:
        if not keys:
            raise KeyFileError(f"{source} holds no key: create one with `rotate` or `init`")
        self.keys = list(keys)
        self.source = source
        self._aead = {k.kid: AESGCM(k.key) for k in self.keys}

    @property
    def current(self) -> DataKey:
        return self.keys[0]

    def seal(self, plaintext: str, *, table: str, column: str, row: str) -> str:
        nonce = os.urandom(NONCE_BYTES)
        kid = self.current.kid
        ciphertext = self._aead[kid].encrypt(
            nonce, plaintext.encode("utf-8"), associated_data(table, column, row)
        )
        return f"{PREFIX}.{kid}.{_b64(nonce + ciphertext)}"

    def open(self, sealed: str, *, table: str, column: str, row: str) -> str:
        where = f"{table}.{column} of {row}"
        version, _, rest = sealed.partition(".")
        kid, _, body = rest.partition(".")
        if version != PREFIX or not kid or not body:
            raise SealError(f"{where}: not a sealed value (expected {PREFIX}.<kid>.<data>)")
        aead = self._aead.get(kid)
        if aead is None:
            raise SealError(
                f"{where}: sealed with key {kid}, which {self.source} does not hold: "
                "restore the key file that was in use, or re-enter the data"
            )
        try:
            raw = _unb64(body)
        except (binascii.Error, ValueError):
            raise SealError(f"{where}: sealed value is not base64url") from None
        nonce, ciphertext = raw[:NONCE_BYTES], raw[NONCE_BYTES:]
        try:
            plaintext = aead.decrypt(nonce, ciphertext, associated_data(table, column, row))
        except InvalidTag:
            # deliberately one message for both: tampering and a value moved from elsewhere
            raise SealError(
                f"{where}: authentication failed (altered, or copied from another row or field)"
            ) from None
        return plaintext.decode("utf-8")

    def kid_of(self, sealed: str) -> str:
        return sealed.split(".", 2)[1] if sealed.count(".") >= 2 else ""

    def render(self) -> str:
        return HEADER + "".join(f"{k.kid} {_b64(k.key)}\n" for k in self.keys)

    @classmethod
    def parse(cls, text: str, source: str) -> Keyring:
        keys: list[DataKey] = []
        for number, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            kid, _, encoded = line.partition(" ")
            try:
                key = _unb64(encoded.strip())
            except (binascii.Error, ValueError):
                key = b""
            if not kid or len(key) != KEY_BYTES:
                # the line itself is never quoted: it is the secret
                raise KeyFileError(
                    f"{source}: line {number} is not `<key id> <base64url 32-byte key>`: "
                    "restore the file from its backup"
                )
            keys.append(DataKey(kid, key))
        return cls(keys, source=source)


def _check_private(path: Path) -> None:
    mode = path.stat().st_mode
    if stat.S_IMODE(mode) & 0o077:
        raise KeyFileError(
            f"data key {path} can be read by other users (mode {stat.S_IMODE(mode):o}): "
            f"run `chmod 600 {path}` and make the service user its owner"
        )


def key_source(
    key_file: Path, credential: str | None, env: Mapping[str, str] | None = None
) -> tuple[Path, bool]:
    """Where the key comes from: (path, is a systemd credential)."""
    env = os.environ if env is None else env
    directory = env.get("CREDENTIALS_DIRECTORY")
    if credential and directory:
        candidate = Path(directory) / credential
        if candidate.exists():
            return candidate, True
    return key_file, False


INIT_HINT = "ansimi gateway privacy-key init --config FILE"


def load_keyring(
    key_file: Path,
    *,
    credential: str | None = None,
    env: Mapping[str, str] | None = None,
    init_hint: str = INIT_HINT,
) -> Keyring:
    """The data keys, from the systemd credential if there is one, else from `key_file`.

    `init_hint` is the command that makes the key, for the error when there is none.
    """
    path, from_credential = key_source(key_file, credential, env)
    try:
        if not from_credential:
            # systemd makes credentials 0400 for the service itself; a file we must check
            _check_private(path)
        text = path.read_text()
    except FileNotFoundError:
        raise KeyFileError(
            f"no data key at {path}: create it with `{init_hint}` "
            "(or provide it with LoadCredential=)"
        ) from None
    except PermissionError:
        raise KeyFileError(
            f"cannot read data key {path}: make the service user its owner (mode 600)"
        ) from None
    return Keyring.parse(text, str(path))


def write_keyring(path: Path, keyring: Keyring) -> None:
    """Write atomically with mode 0600: the file is never readable by others, not even briefly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, keyring.render().encode(), mode=0o600)


def create_key_file(path: Path) -> Keyring:
    """A new keyring with one fresh key; refuses to replace an existing key file."""
    if path.exists():
        raise KeyFileError(
            f"{path} already exists: it may seal data that needs it. Use `rotate` to change the key"
        )
    keyring = Keyring([DataKey.generate()], source=str(path))
    write_keyring(path, keyring)
    return keyring


def load_or_create(path: Path) -> Keyring:
    """For a bell's own key: made on first use, like its signing key."""
    if not path.exists():
        return create_key_file(path)
    return load_keyring(path)


Reseal = Callable[[Keyring], int]


def rotate(
    key_file: Path,
    reseal: Reseal,
    *,
    credential: str | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[str, int]:
    """Make a new key, re-seal everything with it (`reseal`), then retire the old keys.

    `reseal(keyring)` must open every sealed value with `keyring` and seal it again (the
    new key is its current one), in one transaction, and return how many it re-sealed.
    Returns (new key id, count).
    """
    path, from_credential = key_source(key_file, credential, env)
    if from_credential:
        raise KeyFileError(
            f"the data key comes from the systemd credential {path}, which is read-only: "
            f"rotate a copy with `--key-file`, install it in the credential store, restart"
        )
    old = load_keyring(path)
    new_key = DataKey.generate()
    both = Keyring([new_key, *old.keys], source=str(path))
    # step 1: the new key on disk before any value uses it, old keys kept to open the rest
    write_keyring(path, both)
    count = reseal(both)
    # step 2: only once every value is sealed with the new key may the old ones go
    write_keyring(path, Keyring([new_key], source=str(path)))
    return new_key.kid, count
