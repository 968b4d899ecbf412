"""The worker's bot session with the engine, and its leases (`docs/remote.md`, "The
worker", says what BuildGrid does with them and what the worker does).

One thread keeps the session: it reports each lease's state in UpdateBotSession and
starts a job thread for each lease it is given.  BuildGrid answers at once while the bot
holds a lease and holds the call (a long poll) while it holds none; a lease the engine
cancelled simply disappears from its answer, so polling is the only way to hear of a
cancel, and the keepalive that stops the engine from thinking the worker dead.
"""

import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import grpc

from remote.wire import bots_pb2, bots_pb2_grpc, reapi_pb2, status_pb2, worker_pb2

# A long poll's gRPC deadline.  BuildGrid holds the call for 80% of it and offers no lease
# at all when that is under its NETWORK_TIMEOUT (3 s); 10 s leaves margin both ways.
LONG_POLL_SECONDS = 10.0
# Between updates while a lease is held: how soon a cancel is heard (the build's own
# connection then closes within a second more) and the session's keepalive, far inside any
# sane `bot-session-keepalive-timeout`.
HELD_POLL_SECONDS = 0.25
# After an engine error, the wait before the next try, doubled up to the maximum: a
# restarting engine is back within seconds, a gone one should not be hammered.
RETRY_FIRST_SECONDS = 0.2
RETRY_MAX_SECONDS = 5.0
# How often a long poll looks whether the worker is stopping.
STOP_CHECK_SECONDS = 0.1
# How long a stopping worker waits for each stopped build's thread (a build ends within a
# second of its cancel; its daemon's grace covers the builder).
JOB_STOP_SECONDS = 30.0
# gRPC codes meaning the session itself is no longer known (expired, the engine's database
# reset): a new session is created, and leases of the old one are abandoned.
SESSION_LOST = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
)
BOT_OK = bots_pb2.BotStatus.Value("OK")
BOT_TERMINATING = bots_pb2.BotStatus.Value("BOT_TERMINATING")
ACTIVE = bots_pb2.LeaseState.Value("ACTIVE")
COMPLETED = bots_pb2.LeaseState.Value("COMPLETED")


def say(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


class JobState(Enum):
    RUNNING = "running"
    DONE = "done"  # finished, its completed lease not yet acknowledged
    ABANDONED = "abandoned"  # cancelled or its session lost: nothing to report


@dataclass
class Job:
    lease_id: str
    cancelled: threading.Event = field(default_factory=threading.Event)
    state: JobState = JobState.RUNNING
    completed: bots_pb2.Lease | None = None
    thread: threading.Thread | None = None


# What runs a lease: the lease offered and its cancel flag in, the completed lease (status,
# and an ActionResult packed in Any) out.
Runner = Callable[[bots_pb2.Lease, threading.Event], bots_pb2.Lease]


def device_properties(properties: dict[str, str]) -> worker_pb2.Worker:
    device = worker_pb2.Device(handle="primary")
    for key in sorted(properties):
        device.properties.add(key=key, value=properties[key])
    return worker_pb2.Worker(devices=[device])


class BotSession:
    """The session and its jobs.  `run` keeps it until `stop` is set; the jobs run in
    threads of their own, at most `capacity` at once (BuildGrid offers no more)."""

    def __init__(
        self,
        channel: grpc.Channel,
        instance: str,
        name: str,
        properties: dict[str, str],
        capacity: int,
        run_lease: Runner,
        stop: threading.Event,
    ) -> None:
        self.stub = bots_pb2_grpc.BotsStub(channel)
        self.instance = instance
        self.name = name
        self.worker = device_properties(properties)
        self.worker.configs.add(key="capacity", value=str(capacity))
        self.capacity = capacity
        self.run_lease = run_lease
        self.jobs: dict[str, Job] = {}
        self.changed = threading.Event()
        self.session: bots_pb2.BotSession | None = None
        self.stop = stop

    def run(self) -> None:
        stop = self.stop
        delay = RETRY_FIRST_SECONDS
        while not stop.is_set():
            try:
                if self.session is None:
                    self.session = self._create()
                    say(f"store-worker {self.name}: session {self.session.name}")
                    # Creating waits for work too: its answer may already hold a lease,
                    # which BuildGrid counts as delivered.
                    self._reconcile(self.session.leases)
                self._update(BOT_OK)
                delay = RETRY_FIRST_SECONDS
            except grpc.RpcError as e:
                code = e.code()  # type: ignore[attr-defined]
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    continue
                say(f"store-worker {self.name}: engine: {code.name}: {e.details()}")  # type: ignore[attr-defined]
                if code in SESSION_LOST:
                    self._lose_session()
                stop.wait(delay)
                delay = min(delay * 2, RETRY_MAX_SECONDS)
            if any(j.state != JobState.ABANDONED for j in self.jobs.values()):
                self.changed.wait(HELD_POLL_SECONDS)
                self.changed.clear()
        self._shut_down()

    def _create(self) -> bots_pb2.BotSession:
        session = bots_pb2.BotSession(bot_id=self.name, status=BOT_OK, worker=self.worker)
        request = bots_pb2.CreateBotSessionRequest(parent=self.instance, bot_session=session)
        return self.stub.CreateBotSession(request, timeout=LONG_POLL_SECONDS)

    def _update(self, status: int) -> None:
        assert self.session is not None
        session = bots_pb2.BotSession()
        session.CopyFrom(self.session)
        session.status = status  # type: ignore[assignment]
        del session.leases[:]
        session.leases.extend(self._reported())
        request = bots_pb2.UpdateBotSessionRequest(name=session.name, bot_session=session)
        call = self.stub.UpdateBotSession.future(request, timeout=LONG_POLL_SECONDS)
        if status == BOT_OK:
            # A long poll gives way to a stop: the worker is not kept up to 10 s longer.
            answered = threading.Event()
            call.add_done_callback(lambda _: answered.set())
            while not answered.wait(STOP_CHECK_SECONDS):
                if self.stop.is_set():
                    call.cancel()
                    return
        answer = call.result()
        self.session = answer
        self._reconcile(answer.leases)

    def _reported(self) -> list[bots_pb2.Lease]:
        leases = []
        for job in list(self.jobs.values()):
            if job.state == JobState.RUNNING:
                leases.append(bots_pb2.Lease(id=job.lease_id, state=ACTIVE))
            elif job.state == JobState.DONE and job.completed is not None:
                leases.append(job.completed)
        return leases

    def _reconcile(self, leases: "list[bots_pb2.Lease]") -> None:
        offered = {lease.id: lease for lease in leases}
        for lease_id, job in list(self.jobs.items()):
            if lease_id in offered:
                continue
            if job.state == JobState.RUNNING:
                say(f"store-worker {self.name}: lease {lease_id} cancelled by the engine")
                job.cancelled.set()
            job.state = JobState.ABANDONED
            del self.jobs[lease_id]
        for lease_id, lease in offered.items():
            if lease_id in self.jobs or lease.state != ACTIVE:
                continue
            running = sum(j.state == JobState.RUNNING for j in self.jobs.values())
            if running < self.capacity:
                self._start(lease)
            else:
                # BuildGrid offers no more than the capacity; an engine that does gets the
                # lease back at once (UNAVAILABLE: given to another bot), not a thread more.
                self._refuse(lease)

    def _start(self, lease: bots_pb2.Lease) -> None:
        job = Job(lease.id)
        self.jobs[lease.id] = job
        job.thread = threading.Thread(
            target=self._run_job, args=(job, lease), name=f"lease {lease.id}", daemon=True
        )
        job.thread.start()

    def _refuse(self, lease: bots_pb2.Lease) -> None:
        say(f"store-worker {self.name}: lease {lease.id}: over capacity, handed back")
        status = status_pb2.Status(code=grpc.StatusCode.UNAVAILABLE.value[0], message="busy")
        job = Job(lease.id, state=JobState.DONE, completed=completed_lease(lease.id, status, None))
        self.jobs[lease.id] = job

    def _run_job(self, job: Job, lease: bots_pb2.Lease) -> None:
        try:
            completed = self.run_lease(lease, job.cancelled)
        except Exception as e:
            # Whatever went wrong, the lease must end: one kept ACTIVE is never given again.
            say(f"store-worker {self.name}: lease {lease.id}: {e!r}")
            status = status_pb2.Status(code=grpc.StatusCode.INTERNAL.value[0], message=repr(e))
            completed = completed_lease(lease.id, status, None)
        if not job.cancelled.is_set() and job.state == JobState.RUNNING:
            job.completed = completed
            job.state = JobState.DONE
        self.changed.set()

    def _lose_session(self) -> None:
        """The engine no longer knows the session: it gave its leases to other bots."""
        self.session = None
        for job in self.jobs.values():
            job.cancelled.set()
            job.state = JobState.ABANDONED
        self.jobs.clear()

    def _shut_down(self) -> None:
        """Stopping: running builds are stopped and their leases handed back as UNAVAILABLE,
        which BuildGrid retries on another bot at once; finished ones are still reported."""
        running = [j for j in self.jobs.values() if j.state == JobState.RUNNING]
        for job in running:
            job.cancelled.set()
            job.completed = bots_pb2.Lease(
                id=job.lease_id,
                state=COMPLETED,
                status=status_pb2.Status(code=grpc.StatusCode.UNAVAILABLE.value[0]),
            )
            job.state = JobState.DONE
        if self.session is not None and self.jobs:
            try:
                self._update(BOT_TERMINATING)
            except grpc.RpcError as e:
                say(f"store-worker {self.name}: could not hand back leases: {e}")
        for job in running:
            if job.thread is not None:
                job.thread.join(timeout=JOB_STOP_SECONDS)


def completed_lease(
    lease_id: str, status: status_pb2.Status, result: reapi_pb2.ActionResult | None
) -> bots_pb2.Lease:
    lease = bots_pb2.Lease(id=lease_id, state=COMPLETED, status=status)
    if result is not None:
        lease.result.Pack(result)
    return lease
