"""A blocking client for scripts and the store-* commands: plain sockets, no trio.

It imports only what a command needs (the protocol core, msgpack, the C socket module),
because every store-* process pays for its imports before it can say anything.
"""

import _socket
import os
from collections.abc import Callable, Iterable

from daemon.wire import protocol as p

# One read from the daemon's socket: a quarter of a data chunk (`MAX_CHUNK`) or a few
# thousand small replies, in one call; what a command needs, without a large buffer.
RECV_SIZE = 256 << 10

# How often a client waiting on a quiet daemon calls `on_tick`: a status line's clock then
# moves once a second, as people expect a running clock to.
TICK_SECONDS = 1.0


class DaemonError(Exception):
    """An error reply: `code` is stable, `message` is for people."""

    def __init__(self, code: str, message: str, details: dict[str, object] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or {}


class NoDaemon(ConnectionError):
    """Nothing is listening on the socket."""


def chunk_reader(chunks: Iterable[bytes]) -> Callable[[int], bytes]:
    """A `read(n)` over an iterable of byte strings, for `BlockingClient.upload`."""
    it = iter(chunks)
    pending = b""

    def read(n: int) -> bytes:
        nonlocal pending
        while not pending:
            pending = next(it, None)
            if pending is None:
                pending = b""
                return b""
        out, pending = pending[:n], pending[n:]
        return out

    return read


def _default_log(event: p.Log) -> None:
    os.write(2, f"{event.message}\n".encode())


def _nothing() -> None:
    pass


class BlockingClient:
    def __init__(self, sock_path: str, on_log: Callable[[p.Log], None] = _default_log) -> None:
        self.on_log = on_log
        # Called before each wait for the daemon: what `on_log` gathered is written then,
        # once per batch of events the daemon sent together rather than once per event.
        self.on_idle: Callable[[], None] = _nothing
        # Called each TICK_SECONDS the daemon is silent, when set.
        self.on_tick: Callable[[], None] | None = None
        self._sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            self._sock.connect(sock_path)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            self._sock.close()
            raise NoDaemon(f"no daemon at {sock_path}: {e.strerror}") from None
        except BaseException:
            self._sock.close()
            raise
        self._proto = p.Connection(p.Role.CLIENT)
        self._next_id = 0
        # The hello goes out with the first request, and its answer is read before that
        # request's: a command makes one round trip, not two.
        self._unsent = self._proto.send(p.Hello(agent="weft-client"))

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "BlockingClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, event: p.Event) -> None:
        self._sendall(self._proto.send(event))

    def _sendall(self, data: bytes) -> None:
        if self._unsent:
            data, self._unsent = self._unsent + data, b""
        self._sock.sendall(data)

    def _next_event(self) -> p.Event:
        while True:
            event = self._proto.next_event()
            if event is not None:
                return event
            self.on_idle()
            data = self._recv()
            if not data:
                raise ConnectionError("the daemon closed the connection")
            self._proto.receive_data(data)

    def _recv(self) -> bytes:
        if self.on_tick is None:
            return self._sock.recv(RECV_SIZE)
        # The timeout only while waiting here: a send never gives up half-way.
        self._sock.settimeout(TICK_SECONDS)
        try:
            while True:
                try:
                    return self._sock.recv(RECV_SIZE)
                except TimeoutError:
                    self.on_tick()
        finally:
            self._sock.settimeout(None)

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _finish(self, event: p.Event) -> object:
        if isinstance(event, p.Error):
            raise DaemonError(event.code, event.message, event.details)
        assert isinstance(event, p.Reply)
        return event.result

    def _wait_reply(self, rid: int, on_event: Callable[[p.Event], None] | None = None) -> object:
        while True:
            event = self._next_event()
            if isinstance(event, p.Log):
                self.on_log(event)
            elif isinstance(event, p.Reply | p.Error) and event.id in (rid, None):
                return self._finish(event)
            elif on_event is not None:
                on_event(event)

    def call(self, op: str, **args: object) -> object:
        rid = self._new_id()
        self._send(p.Request(rid, op, args))
        return self._wait_reply(rid)

    def call_many(self, calls: list[tuple[str, dict[str, object]]]) -> list[object]:
        """Send every request before reading any reply; errors come back as DaemonError."""
        first = self._next_id + 1
        self._sendall(
            b"".join(self._proto.send(p.Request(self._new_id(), op, a)) for op, a in calls)
        )
        results: dict[int, object] = {}
        while len(results) < len(calls):
            event = self._next_event()
            if isinstance(event, p.Log):
                self.on_log(event)
            elif isinstance(event, p.Reply):
                results[event.id] = event.result
            elif isinstance(event, p.Error):
                if event.id is None:
                    raise DaemonError(event.code, event.message, event.details)
                results[event.id] = DaemonError(event.code, event.message, event.details)
        return [results[first + i] for i in range(len(calls))]

    def upload(self, op: str, read: Callable[[int], bytes], **args: object) -> object:
        """A request whose data the client streams, as fast as the daemon's credit allows."""
        rid = self._new_id()
        self._send(p.Request(rid, op, args))
        eof = False
        while True:
            credit = self._proto.send_credit(rid)
            if credit and not eof:
                chunk = read(min(credit, p.MAX_CHUNK))
                if chunk:
                    self._send(p.Data(rid, chunk))
                else:
                    eof = True
                    self._send(p.End(rid))
                continue
            event = self._next_event()
            if isinstance(event, p.Log):
                self.on_log(event)
            elif isinstance(event, p.Reply | p.Error) and event.id in (rid, None):
                return self._finish(event)

    def download(self, op: str, write: Callable[[bytes], object], **args: object) -> object:
        """A request whose data the daemon streams; each chunk is written, then credited."""
        rid = self._new_id()
        self._send(p.Request(rid, op, args))
        self._send(p.Credit(rid, p.DEFAULT_WINDOW))

        def on_event(event: p.Event) -> None:
            if isinstance(event, p.Data) and event.id == rid:
                write(event.data)
                self._send(p.Credit(rid, len(event.data)))

        return self._wait_reply(rid, on_event)
