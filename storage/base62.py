"""EMQX's ``emqx_base62`` and the Redis plugin's message-id encoding.

``emqx_base62`` (emqx/emqx ``apps/emqx/src/emqx_base62.erl``) is not a radix-62
number encoding: it reads the input bytes MSB-first as 6-bit groups (3 bytes -> 4
symbols; a trailing 2 bytes give 6+6+4 bits, a trailing byte 6+2 bits, no padding)
and maps a group value ``v`` to ``A``-``Z`` (0-25), ``a``-``z`` (26-51), ``0``-``8``
(52-60) and, for 61/62/63, the two characters ``9A``/``9B``/``9C``. Decoding reads
6 bits per symbol, except the final symbol, which contributes only the bits needed
to complete a byte (``8 - bits_so_far mod 8``).

The plugin's message id (``emqx_omp_redis:to_b62``) is ``emqx_base62`` applied to
the *decimal text* of the 128-bit GUID: ``msgid_to_b62`` / ``b62_to_msgid`` do that
from / to the 32 uppercase hex digits the exhook protocol carries.
"""

from __future__ import annotations

__all__ = ["Base62Error", "b62_to_msgid", "decode", "encode", "msgid_to_b62"]


class Base62Error(ValueError):
    """Input that ``emqx_base62`` would not have produced."""


_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz012345678"
# symbol for every 6-bit value (61, 62, 63 take two characters)
_SYMBOL: tuple[bytes, ...] = (*(c.encode() for c in _ALPHABET), b"9A", b"9B", b"9C")
_VALUE: dict[int, int] = {ord(c): i for i, c in enumerate(_ALPHABET)}
# the two symbols of every 12-bit value (half of a 3-byte group)
_PAIR: tuple[bytes, ...] = tuple(_SYMBOL[i >> 6] + _SYMBOL[i & 63] for i in range(4096))


def encode(data: bytes | str) -> bytes:
    """``emqx_base62:encode/1`` of ``data`` (a str is taken as UTF-8)."""
    raw = data.encode() if isinstance(data, str) else bytes(data)
    out = bytearray()
    full = len(raw) - len(raw) % 3
    pair = _PAIR
    for i in range(0, full, 3):
        n = (raw[i] << 16) | (raw[i + 1] << 8) | raw[i + 2]
        out += pair[n >> 12]
        out += pair[n & 4095]
    rest = len(raw) - full
    if rest == 2:
        n = (raw[full] << 8) | raw[full + 1]
        out += _SYMBOL[n >> 10] + _SYMBOL[(n >> 4) & 63] + _SYMBOL[n & 15]
    elif rest == 1:
        n = raw[full]
        out += _SYMBOL[n >> 2] + _SYMBOL[n & 3]
    return bytes(out)


def decode(data: bytes | str) -> bytes:
    """``emqx_base62:decode/1``: the original bytes. Raises ``Base62Error`` on a
    character outside the alphabet or a bit count that is not whole bytes."""
    raw = data.encode("ascii", "replace") if isinstance(data, str) else bytes(data)
    acc = 0
    nbits = 0
    i = 0
    end = len(raw)
    value = _VALUE
    while i < end:
        ch = raw[i]
        if i + 1 < end:  # not the last character: a full 6-bit group
            if ch == 0x39:  # '9' + 'A'..'C'
                nxt = raw[i + 1]
                if not 0x41 <= nxt <= 0x43:
                    raise Base62Error(f"invalid base62 sequence '9{chr(nxt)}'")
                v = 61 + nxt - 0x41
                i += 2
            else:
                v = value.get(ch, -1)
                if v < 0:
                    raise Base62Error(f"invalid base62 character {chr(ch)!r}")
                i += 1
            acc = (acc << 6) | v
            nbits += 6
        else:  # the last character completes the current byte
            v = value.get(ch, -1)
            if v < 0:
                raise Base62Error(f"invalid base62 character {chr(ch)!r}")
            width = 8 - nbits % 8
            acc = (acc << width) | (v & ((1 << width) - 1))
            nbits += width
            i += 1
    if nbits % 8:
        raise Base62Error("base62 text does not decode to whole bytes")
    return acc.to_bytes(nbits // 8, "big")


def msgid_to_b62(msgid: str) -> str:
    """The plugin's Redis id of a message: base62 of the GUID's decimal text.

    ``msgid`` is the GUID as hex digits (32, any case)."""
    try:
        number = int(msgid, 16)
    except ValueError:
        raise Base62Error(f"message id is not hex: {msgid!r}") from None
    if number >> 128:
        raise Base62Error(f"message id is longer than 128 bits: {msgid!r}")
    return encode(str(number).encode()).decode()


def b62_to_msgid(b62: str | bytes) -> str:
    """Inverse of ``msgid_to_b62``: the GUID as 32 uppercase hex digits."""
    text = decode(b62)
    if not text.isdigit():
        raise Base62Error(f"base62 id does not decode to a decimal number: {b62!r}")
    number = int(text)
    if number >> 128:
        raise Base62Error(f"base62 id is larger than 128 bits: {b62!r}")
    return f"{number:032X}"
