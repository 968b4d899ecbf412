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


# Every pair of digits, by the 10 bits they encode: a store path's hash part is 16 lookups.
_PAIRS = tuple(a + b for a in ALPHABET for b in ALPHABET)


def encode(digest: bytes) -> str:
    value = int.from_bytes(digest, "little")
    n = encoded_length(len(digest))
    # An odd digit count starts with a single digit, the most significant.
    head = ALPHABET[(value >> (5 * (n - 1))) & 31] if n % 2 else ""
    pairs = range(5 * (n - n % 2) - 10, -1, -10)
    return head + "".join([_PAIRS[(value >> shift) & 1023] for shift in pairs])


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
