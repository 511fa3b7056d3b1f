"""SMS-SUBMIT PDUs for text outside the GSM alphabet (Korean): 3GPP TS 23.040, UCS-2.

A modem in PDU mode (`AT+CMGF=0`) takes each message as hex: `AT+CMGS=<n>`, where n is
the TPDU's length in octets (the SMSC part not counted), then the hex and Ctrl-Z.

The fields, in order (TS 23.040 9.2.2.2 and 9.2.3):
- SMSC: one octet 00, "the SIM's service centre" (not part of the TPDU);
- first octet: TP-MTI 01 (SMS-SUBMIT), TP-VPF 00 (no validity period), TP-UDHI (0x40)
  when the user data starts with a header (a concatenated message);
- TP-MR 00 (the modem numbers it);
- TP-DA: the count of digits, the type (91 international with +, 81 otherwise), the digits
  as swapped semi-octets, an odd count padded with F;
- TP-PID 00; TP-DCS 08 (UCS-2, 16 bits a character, big-endian);
- TP-UDL: the user data's length in octets (header included, for UCS-2);
- TP-UD: the optional header, then the text in UTF-16BE.

One message holds 140 octets: 70 UCS-2 characters. Longer text goes in parts of 67, each
with a concatenation header (IEI 00, 8-bit reference, 9.2.3.24.1: `05 00 03 ref total
seq`) so the phone shows one message. A character outside the BMP (two UTF-16 units) is
never split between parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

UCS2_SINGLE_OCTETS: Final = 140
# 140 octets less the 6-octet concatenation header: 134, so 67 UTF-16 units a part
UCS2_PART_OCTETS: Final = 134
MAX_PARTS: Final = 255
_SUBMIT: Final = 0x01
_UDHI: Final = 0x40
_DCS_UCS2: Final = 0x08
_CONCAT_8BIT: Final = 0x00


@dataclass(frozen=True, slots=True)
class Pdu:
    """One SMS-SUBMIT, as the modem takes it."""

    hex: str  # SMSC octet and TPDU, upper-case hex
    tpdu_octets: int  # what AT+CMGS=<n> says


def _address(number: str) -> bytes:
    digits = number.removeprefix("+")
    kind = 0x91 if number.startswith("+") else 0x81
    padded = digits + ("F" if len(digits) % 2 else "")
    swapped = "".join(padded[i + 1] + padded[i] for i in range(0, len(padded), 2))
    return bytes([len(digits), kind]) + bytes.fromhex(swapped)


def _parts(text: str) -> list[bytes]:
    data = text.encode("utf-16-be")
    if len(data) <= UCS2_SINGLE_OCTETS:
        return [data]
    parts: list[bytes] = []
    while data:
        cut = min(UCS2_PART_OCTETS, len(data))
        # a high surrogate at the end of a part would leave half a character on each side
        if cut < len(data) and 0xD8 <= data[cut - 2] <= 0xDB:
            cut -= 2
        parts.append(data[:cut])
        data = data[cut:]
    return parts


def submit_pdus(number: str, text: str, reference: int) -> list[Pdu]:
    """The PDUs that send `text` to `number` (already checked, see `check_number`).

    `reference` (0..255) ties the parts of one concatenated message together; it is unused
    for a text that fits one message.
    """
    parts = _parts(text)
    if len(parts) > MAX_PARTS:
        raise ValueError(f"text of {len(text)} characters needs over {MAX_PARTS} SMS parts")
    address = _address(number)
    pdus = []
    for seq, user_data in enumerate(parts, start=1):
        header = b""
        if len(parts) > 1:
            header = bytes([5, _CONCAT_8BIT, 3, reference % 256, len(parts), seq])
        first = _SUBMIT | (_UDHI if header else 0)
        ud = header + user_data
        tpdu = bytes([first, 0x00]) + address + bytes([0x00, _DCS_UCS2, len(ud)]) + ud
        pdus.append(Pdu(hex=("00" + tpdu.hex()).upper(), tpdu_octets=len(tpdu)))
    return pdus


@dataclass(frozen=True, slots=True)
class Submitted:
    """What one SMS-SUBMIT of ours says (the fake modem reads them back with this)."""

    number: str
    text: str
    # (reference, total, sequence) of a concatenated message's part; None for a whole one
    part: tuple[int, int, int] | None


def read_submit(hex_text: str) -> Submitted:
    """The inverse of `submit_pdus` for one PDU; ValueError for anything else."""
    data = bytes.fromhex(hex_text)
    smsc = data[0]
    tpdu = data[1 + smsc :]
    first, digits, kind = tpdu[0], tpdu[2], tpdu[3]
    if first & 0x03 != _SUBMIT:
        raise ValueError(f"not an SMS-SUBMIT (first octet {first:02X})")
    address_octets = (digits + 1) // 2
    semi = tpdu[4 : 4 + address_octets].hex().upper()
    number = "".join(semi[i + 1] + semi[i] for i in range(0, len(semi), 2))[:digits]
    rest = tpdu[4 + address_octets :]
    if rest[1] != _DCS_UCS2:
        raise ValueError(f"data coding {rest[1]:02X} is not UCS-2")
    ud = rest[3 : 3 + rest[2]]
    part = None
    if first & _UDHI:
        header = ud[: 1 + ud[0]]
        if header[1] == _CONCAT_8BIT:
            part = (header[3], header[4], header[5])
        ud = ud[len(header) :]
    return Submitted(
        ("+" if kind == 0x91 else "") + number, ud.decode("utf-16-be", "replace"), part
    )
