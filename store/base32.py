"""Nix's base-32 encoding of digests.

Nix prints hashes in base 32 with its own alphabet (no e, o, u, t, so no accidental
words) and its own bit order: the digest is read as one little-endian integer and
printed most significant 5-bit group first.  Store path hash parts use it, so ours
look, sort and validate like Nix's.
"""

ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
_INDEX = {c: i for i, c in enumerate(ALPHABET)}


def encoded_length(n_bytes: int) -> int:
    return (n_bytes * 8 - 1) // 5 + 1


def encode(digest: bytes) -> str:
    value = int.from_bytes(digest, "little")
    n = encoded_length(len(digest))
    return "".join(ALPHABET[(value >> (5 * i)) & 31] for i in range(n - 1, -1, -1))


def decode(text: str, n_bytes: int) -> bytes:
    if len(text) != encoded_length(n_bytes):
        raise ValueError(f"base-32 string {text!r} has the wrong length for {n_bytes} bytes")
    value = 0
    for c in text:
        try:
            value = (value << 5) | _INDEX[c]
        except KeyError:
            raise ValueError(f"invalid base-32 character {c!r} in {text!r}") from None
    if value >> (n_bytes * 8):
        raise ValueError(f"base-32 string {text!r} overflows {n_bytes} bytes")
    return value.to_bytes(n_bytes, "little")


_CHARS = frozenset(ALPHABET)


def is_valid(text: str) -> bool:
    return _CHARS.issuperset(text)
