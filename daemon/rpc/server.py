"""The trio layer's top: accept clients, check who they are, serve each on its connection,
and drain at shutdown.  The connection itself is `connection.py`; the operations,
`ops/`."""

import contextlib
import logging
from collections.abc import Callable

import trio

from daemon.rpc.auth import identify, peer_credentials, refusal
from daemon.rpc.connection import ClientConnection, Serving
from daemon.rpc.context import STREAM_IDLE, Operation
from daemon.rpc.services import Services
from daemon.wire import protocol as p

log = logging.getLogger("weft.daemon")
# How long a refused client gets to write its hello and read why it is refused; the
# daemon holds nothing for it meanwhile but the task and the socket.
REFUSAL_WAIT = 1.0
# What is read of it: a hello and a small first request, the rest left unread.
REFUSAL_READ = 4096


class Daemon:
    """Accepts clients on a listener and serves them until shutdown is requested."""

    def __init__(
        self,
        services: Services,
        operations: dict[str, Operation],
        stream_idle: float = STREAM_IDLE,
    ) -> None:
        self.services = services
        self.serving = Serving(services, operations, stream_idle)
        self.connections: set[ClientConnection] = set()
        self._socket_path = ""

    @property
    def shutdown_requested(self) -> trio.Event:
        return self.serving.shutdown_requested

    async def serve(
        self,
        listener: trio.SocketListener,
        grace: float = 10.0,
        on_draining: Callable[[], object] = lambda: None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until `shutdown_requested` is set, then drain for up to `grace` seconds."""
        async with trio.open_nursery() as nursery:
            self._socket_path = str(listener.socket.getsockname())
            nursery.start_soon(self._accept_loop, listener, nursery)
            if self.services.builder is not None:
                nursery.start_soon(self.services.builder.load.run)
            task_status.started()
            await self.shutdown_requested.wait()
            self.serving.draining = True
            await listener.aclose()
            on_draining()
            with trio.move_on_after(grace):
                while self.serving.in_flight:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except trio.ClosedResourceError:
                return
            except OSError as e:
                # EMFILE and friends: back off rather than spin or die.
                log.warning("accept failed: %s", e)
                await trio.sleep(0.1)
                continue
            nursery.start_soon(self._serve_client, stream)

    async def _serve_client(self, stream: trio.SocketStream) -> None:
        pid, uid, gid = peer_credentials(stream.socket)  # type: ignore[arg-type]
        peer = identify(pid, uid, gid, self.services.settings)
        if peer is None:
            config = str(self.services.state.settings_path)
            allowed = self.services.settings.allowed_users
            await _refuse(stream, refusal(uid, self._socket_path, config, allowed))
            return
        conn = ClientConnection(self.serving, stream, peer)
        self.connections.add(conn)
        try:
            await conn.serve()
        except Exception:
            # A fault boundary: whatever one connection meets ends that connection only.
            log.exception("%s: connection failed", conn)
        finally:
            self.connections.discard(conn)


async def _refuse(stream: trio.SocketStream, message: str) -> None:
    """Tell a client it may not connect, and close.  Its first write (the hello, with its
    first request) is read first: a client that has not written yet would otherwise find
    the connection closed as it writes, and never read why."""
    with trio.move_on_after(REFUSAL_WAIT):
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.receive_some(REFUSAL_READ)
            refused = p.Error(None, p.Code.PERMISSION, message)
            try:
                frame = p.Connection(p.Role.SERVER).send(refused)
            except p.FrameTooLarge:
                # An allowed-users list of thousands of names: a raise here would end the
                # accept loop's nursery, and with it the daemon.
                refused = p.Error(None, p.Code.PERMISSION, message[: p.KEPT_MESSAGE])
                frame = p.Connection(p.Role.SERVER).send(refused)
            await stream.send_all(frame)
    await stream.aclose()
