"""The daemon's remote executor: its one channel to the REAPI engine (`remote-endpoint`),
the engine's CAS and execution service over it, and the threads its calls run in.

The remote library (`remote/`) is synchronous gRPC, so every call goes to a worker
thread, under one limiter: `remote-max-jobs` builds hold an Execute stream each for as
long as they run, and a few more threads let the next builds upload their inputs
meanwhile.  How many remote builds run at once is the remote scheduler's business
(made in `daemon/compose.py`: admission by count alone, since their load is the farm's,
not this machine's).  The channel is opened on first use, in a thread: a daemon whose builds all
stay local never loads gRPC.
"""

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar, TypeVarTuple, Unpack

import trio

from daemon.remote.policy import Policy, effective
from daemon.settings import Settings

if TYPE_CHECKING:
    import grpc

    from remote.cas import Cas
    from remote.execution import Execution

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

# Threads beyond `remote-max-jobs`: while every running remote build holds one in its
# Execute stream, the next builds' uploads still get one each (a cancellation takes a
# thread outside the limiter: it must never wait for one).
UPLOAD_MARGIN = 4


@dataclass
class Engine:
    """The library's objects on one channel, made once."""

    channel: "grpc.Channel"
    cas: "Cas"
    execution: "Execution"


class RemoteExecutor:
    def __init__(self, settings: Settings) -> None:
        self.endpoint = settings.remote_endpoint
        self.instance = settings.remote_instance
        self.configured = settings.remote
        self.fallback = settings.remote_fallback
        self.platform = dict(settings.remote_platform)
        self.max_jobs = settings.remote_max_jobs
        self._limiter = trio.CapacityLimiter(self.max_jobs + UPLOAD_MARGIN)
        self._engine: Engine | None = None
        self._opening = threading.Lock()

    def policy(self, requested: Policy | None) -> Policy:
        """The remote policy in effect for a request."""
        return effective(requested, self.configured, self.endpoint)

    def engine(self) -> Engine:
        """The channel and services, opened on first use (in a worker thread)."""
        with self._opening:
            if self._engine is None:
                # Here, not at the top: gRPC and the wire modules take a while to load,
                # which a daemon without remote builds never pays.
                from remote.cas import Cas
                from remote.channel import open_channel
                from remote.execution import Execution

                channel = open_channel(self.endpoint)
                self._engine = Engine(
                    channel, Cas(channel, self.instance), Execution(channel, self.instance)
                )
            return self._engine

    async def call(self, fn: Callable[[Unpack[Ts]], T], *args: *Ts, abandon: bool = False) -> T:
        """`fn(*args)` in a worker thread under the limiter; with `abandon`, a
        cancellation returns at once and the thread finishes on its own (a blocking
        stream that the caller ends another way, by cancelling its operation)."""
        return await trio.to_thread.run_sync(
            fn, *args, limiter=self._limiter, abandon_on_cancel=abandon
        )

    def close(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.channel.close()
