"""Just enough of Nix's worker protocol (what `nix-store` speaks to nix-daemon) to time
one operation against it: the handshake, and `wopQueryPathInfo` with its reply read whole.

The load generator (`loadgen.py`) sends Nix's daemon the very bytes `nix path-info` sends,
and learns from one reply read here how many bytes each reply is, so that it can time
thousands of them without parsing any.  Integers are 64-bit little-endian; a string is
its length, its bytes, and zeros to a multiple of eight.
"""

import socket
import struct

WORKER_MAGIC_1 = 0x6E697863
WORKER_MAGIC_2 = 0x6478696F
STDERR_LAST = 0x616C7473
STDERR_NEXT = 0x6F6C6D67
STDERR_ERROR = 0x63787470
OP_ADD_TEMP_ROOT = 11
OP_QUERY_PATH_INFO = 26
# Where the client version's fields change what is sent: the daemon's version string
# after the handshake (33), its trust in the client (35); below 17 a missing path is an
# error rather than a "no" (Nix's worker-protocol.hh and daemon.cc).
SENDS_VERSION = 33
SENDS_TRUST = 35
_U64 = struct.Struct("<Q")
DEFAULT_SOCKET = "/nix/var/nix/daemon-socket/socket"


class NixProtocolError(Exception):
    """The daemon answered something this module does not read."""


def u64(n: int) -> bytes:
    return _U64.pack(n)


def string(s: str | bytes) -> bytes:
    data = s.encode() if isinstance(s, str) else s
    return u64(len(data)) + data + b"\0" * (-len(data) % 8)


class Reader:
    """Reads a blocking socket, and keeps every byte read for `taken`."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.pos = 0

    def exact(self, n: int) -> bytes:
        while len(self.buf) - self.pos < n:
            more = self.sock.recv(65536)
            if not more:
                raise NixProtocolError("nix-daemon closed the connection")
            self.buf += more
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        return _U64.unpack(self.exact(8))[0]

    def string(self) -> bytes:
        n = self.int()
        data = self.exact(n + (-n % 8))
        return data[:n]

    def strings(self) -> list[bytes]:
        return [self.string() for _ in range(self.int())]

    def taken(self) -> bytes:
        """What was read since the last call; the buffer must hold nothing more."""
        if self.pos != len(self.buf):
            raise NixProtocolError("nix-daemon sent more than one reply")
        out, self.buf, self.pos = self.buf, b"", 0
        return out


def _logs_until_last(r: Reader) -> None:
    while (msg := r.int()) != STDERR_LAST:
        if msg == STDERR_NEXT:
            r.string()
        elif msg == STDERR_ERROR:
            raise NixProtocolError("nix-daemon reported an error")
        else:
            raise NixProtocolError(f"unexpected message {msg:#x} from nix-daemon")


def handshake(path: str = DEFAULT_SOCKET) -> socket.socket:
    """A connection to nix-daemon past its greeting, as the version of Nix it runs makes
    it: the daemon forks its worker for the connection here."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    r = Reader(s)
    s.sendall(u64(WORKER_MAGIC_1))
    if r.int() != WORKER_MAGIC_2:
        raise NixProtocolError("not a nix-daemon")
    version = r.int()
    minor = version & 0xFF
    s.sendall(u64(version) + u64(0) + u64(0))  # no CPU affinity; reserveSpace off
    if minor >= SENDS_VERSION:
        r.string()
    if minor >= SENDS_TRUST:
        r.int()
    _logs_until_last(r)
    r.taken()
    return s


def add_temp_roots(s: socket.socket, paths: list[str]) -> None:
    """Keep `paths` alive while `s` is open (`wopAddTempRoot`, as `nix-store --add`'s own
    connection does): another bench's garbage collection may run meanwhile."""
    r = Reader(s)
    for path in paths:
        s.sendall(u64(OP_ADD_TEMP_ROOT) + string(path))
        _logs_until_last(r)
        r.int()
    r.taken()


def query_path_info(path: str) -> bytes:
    return u64(OP_QUERY_PATH_INFO) + string(path)


def read_path_info_reply(s: socket.socket) -> bytes:
    """The bytes of one whole reply to `query_path_info` of a valid path."""
    r = Reader(s)
    _logs_until_last(r)
    if r.int() != 1:
        raise NixProtocolError("the path is not valid in Nix's store")
    r.string()  # deriver
    r.string()  # narHash
    r.strings()  # references
    r.int()  # registrationTime
    r.int()  # narSize
    r.int()  # ultimate
    r.strings()  # sigs
    r.string()  # ca
    return r.taken()
