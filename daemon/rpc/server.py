"""The trio layer's top: accept clients, check who they are, serve each on its connection,
and drain at shutdown.  The connection itself is `connection.py`; the operations,
`ops/`."""

import contextlib
import logging
from collections.abc import Callable

import trio

from daemon.rpc.auth import identify, peer_credentials
from daemon.rpc.connection import ClientConnection, Serving
from daemon.rpc.context import Operation
from daemon.rpc.services import Services
from daemon.wire import protocol as p

log = logging.getLogger("weft.daemon")


class Daemon:
    """Accepts clients on a listener and serves them until shutdown is requested."""

    def __init__(self, services: Services, operations: dict[str, Operation]) -> None:
        self.services = services
        self.serving = Serving(services, operations)
        self.connections: set[ClientConnection] = set()

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
            conn = p.Connection(p.Role.SERVER)
            message = f"user {uid} is not in allowed-users"
            with trio.move_on_after(1):
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await stream.send_all(conn.send(p.Error(None, p.Code.PERMISSION, message)))
            await stream.aclose()
            return
        conn = ClientConnection(self.serving, stream, peer)
        self.connections.add(conn)
        try:
            await conn.serve()
        finally:
            self.connections.discard(conn)
