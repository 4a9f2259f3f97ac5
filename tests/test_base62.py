"""storage.base62: EMQX's emqx_base62 and the Redis plugin's message ids."""

from __future__ import annotations

import os
import random

import pytest

from storage.base62 import Base62Error, b62_to_msgid, decode, encode, msgid_to_b62

# Vectors from /work/shared/emqx-facts.md (computed from emqx_base62's description).
VECTORS = [
    ("0005F1B4C2D1E2F30A0B0C0D0E0F1011", "MzA4NjM4NjYzNzAyMzU4OTgwNDM2MTUzMDM4MTA2MTczNjB"),
    ("000614A2B7C8D9E0F440000012340001", "MzE1NzIzMjExODQxODAxNzQ0Mjg5NDgwNTY3MTczOTM5MjB"),
]

_ALPHA = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz012345678"


def _ref_encode(data: bytes) -> bytes:
    """Straight transcription of emqx_base62:encode/2 over a bit string."""
    bits = "".join(f"{b:08b}" for b in data)
    out = []
    while bits:
        if len(bits) >= 24:
            groups, bits = [bits[0:6], bits[6:12], bits[12:18], bits[18:24]], bits[24:]
        elif len(bits) == 16:
            groups, bits = [bits[0:6], bits[6:12], bits[12:16]], ""
        else:
            assert len(bits) == 8
            groups, bits = [bits[0:6], bits[6:8]], ""
        for g in groups:
            v = int(g, 2)
            out.append(_ALPHA[v] if v < 61 else "9" + chr(ord("A") + v - 61))
    return "".join(out).encode()


def _ref_decode(text: bytes) -> bytes:
    """Straight transcription of emqx_base62:decode/2 over a bit string."""
    acc = ""
    i = 0
    while i < len(text):
        ch = chr(text[i])
        if len(text) - i - 1 >= 1:
            if ch == "9":
                v = 61 + text[i + 1] - ord("A")
                i += 2
            else:
                v = _ALPHA.index(ch)
                i += 1
            acc += f"{v:08b}"[2:]
        else:
            v = _ALPHA.index(ch)
            right = 8 - len(acc) % 8
            acc += f"{v:08b}"[8 - right:]
            i += 1
    return int(acc, 2).to_bytes(len(acc) // 8, "big") if acc else b""


@pytest.mark.parametrize(("hexid", "b62"), VECTORS)
def test_vectors(hexid: str, b62: str) -> None:
    assert msgid_to_b62(hexid) == b62
    assert msgid_to_b62(hexid.lower()) == b62
    assert b62_to_msgid(b62) == hexid
    assert b62_to_msgid(b62.encode()) == hexid
    assert decode(b62) == str(int(hexid, 16)).encode()


def test_matches_reference_implementation() -> None:
    rng = random.Random(7)
    for n in range(0, 64):
        for _ in range(40):
            data = bytes(rng.randrange(256) for _ in range(n))
            assert encode(data) == _ref_encode(data), data
            assert decode(encode(data)) == data
            assert _ref_decode(encode(data)) == data


def test_high_groups_use_two_characters() -> None:
    assert encode(b"\xff\xff\xff") == b"9C9C9C9C"
    assert encode(b"\xf7\xdf\x7d") == b"9A9A9A9A"  # 61 61 61 61
    assert decode(b"9C9C9C9C") == b"\xff\xff\xff"
    assert encode(b"") == b"" and decode(b"") == b""
    assert encode("é") == encode("é".encode())


def test_random_bytes_round_trip() -> None:
    for n in range(0, 100):
        data = os.urandom(n)
        assert decode(encode(data)) == data


def test_msgid_round_trip() -> None:
    rng = random.Random(11)
    for _ in range(2000):
        hexid = f"{rng.getrandbits(128):032X}"
        assert b62_to_msgid(msgid_to_b62(hexid)) == hexid
    assert b62_to_msgid(msgid_to_b62("0" * 32)) == "0" * 32
    assert b62_to_msgid(msgid_to_b62("F" * 32)) == "F" * 32


def test_invalid_input() -> None:
    with pytest.raises(Base62Error):
        decode("ab$c")
    with pytest.raises(Base62Error):
        decode("9Z11")
    with pytest.raises(Base62Error):
        msgid_to_b62("not-hex")
    with pytest.raises(Base62Error):
        msgid_to_b62("1" + "0" * 32)  # 132 bits
    with pytest.raises(Base62Error):
        b62_to_msgid(encode(b"12a4"))  # not a decimal number
