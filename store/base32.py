"""Nix's base-32 encoding of digests.

Nix prints hashes in base 32 with its own alphabet (no e, o, u, t, so no accidental
words) and its own bit order: the digest is read as one little-endian integer and
printed most significant 5-bit group first.  Store path hash parts use it, so ours
look, sort and validate like Nix's.
"""

import functools

ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
_INDEX = {c: i for i, c in enumerate(ALPHABET)}


def encoded_length(n_bytes: int) -> int:
    return (n_bytes * 8 - 1) // 5 + 1


# Every pair of digits, by the 10 bits they encode: a digest is a lookup per 10 bits.
_PAIRS = tuple(a + b for a in ALPHABET for b in ALPHABET)

# A store path's hash part: 20 bytes, exactly 32 digits.  Computed for every path a recipe
# makes and every `.drv` the daemon is sent, so it has a way of its own (`_spread`).
SPREAD_BYTES = 20
_SPREAD_DIGITS = encoded_length(SPREAD_BYTES)
# Each digit's value as its byte in the alphabet (the rest of the table unused).
_DIGIT_BYTES = ALPHABET.encode().ljust(256, b"\0")


def _spread_steps() -> tuple[tuple[int, int, int], ...]:
    """The steps of `_spread`: (bits kept, lane width, mask of the kept bits' lanes)."""
    steps = []
    width, lane, lanes = _SPREAD_DIGITS * 5, _SPREAD_DIGITS * 8, 1
    while width > 5:
        width, lane = width // 2, lane // 2
        mask = sum(((1 << width) - 1) << (i * 2 * lane) for i in range(lanes))
        steps.append((width, lane, mask))
        lanes *= 2
    return tuple(steps)


_SPREAD_STEPS = _spread_steps()


def _spread(value: int) -> str:
    """The 32 digits of a 160-bit value, five steps of a few big-integer operations instead
    of sixteen lookups: each step moves the upper half of every lane up into a lane of its
    own, until each 5-bit digit has a byte, most significant first, mapped to its letter."""
    for width, lane, mask in _SPREAD_STEPS:
        value = (value & mask) | (((value >> width) & mask) << lane)
    return value.to_bytes(_SPREAD_DIGITS, "big").translate(_DIGIT_BYTES).decode()


@functools.lru_cache(maxsize=8)  # a few lengths: 20 bytes (store paths), 32 (digests)
def _layout(n_bytes: int) -> tuple[int, tuple[int, ...]]:
    """For a digest of `n_bytes`: the shift of its single leading digit (-1: none, the
    digit count is even), and the shift of each following pair, most significant first."""
    n = encoded_length(n_bytes)
    # An odd digit count starts with a single digit, the most significant.
    head = 5 * (n - 1) if n % 2 else -1
    return head, tuple(range(5 * (n - n % 2) - 10, -1, -10))


def encode(digest: bytes) -> str:
    value = int.from_bytes(digest, "little")
    if len(digest) == SPREAD_BYTES:
        return _spread(value)
    head, pairs = _layout(len(digest))
    first = ALPHABET[(value >> head) & 31] if head >= 0 else ""
    return first + "".join([_PAIRS[(value >> shift) & 1023] for shift in pairs])


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
