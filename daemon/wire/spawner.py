"""The spawner's protocol: what the daemon (`daemon/proc/spawner.py`) and the spawner
(`spawner/server.py`) say to each other, written once for both ends.

Each message is one packet (`daemon.wire.packets`): a msgpack map with the request's id.

    daemon -> spawner  the fields of a `SpawnRequest`  + the write end of the build's log pipe
    spawner -> daemon  {status: ok, pid, cgroup}
                       {status: error, step, errno, path, message}

An error reply is also what the spare program writes to its status pipe when a step of
the sandbox fails (`spawner/spare.c`), without an id: the spawner passes it on.
"""

from dataclasses import dataclass, field

from daemon.wire.packets import Fields


@dataclass
class SpawnRequest:
    builder: str
    root: str  # a directory of the build slot's: <root>/<store_dir> is the store dir it sees
    build_dir: str  # bound read-write at /build
    store_dir: str
    host_uid: int  # what the build user maps to outside
    host_gid: int
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)  # store paths, bound read-only
    sandbox_paths: list[str] = field(default_factory=list)  # host paths, bound read-only
    network: bool = False  # True: share the host's network (fixed-output builds)
    # False: a network namespace made for this build alone, never one a finished build
    # left (spawner/networks.py).
    reuse_network: bool = True
    # The daemon's freezer directory: the builder's tree runs in a cgroup of its own in
    # it (best effort: the reply names it, or "").
    freezer: str = ""


@dataclass(frozen=True)
class Spawned:
    """The builder has exec'd: its pid (the daemon's child, by adoption) and its cgroup."""

    pid: int
    cgroup: str  # "" if it runs in none of its own (the daemon pauses it with signals)


@dataclass(frozen=True)
class SetupFailure:
    """A step of the sandbox setup failed: which step, which errno, which path, and what
    the error said.  The spawner raises it as `SetupError`, the daemon as `SpawnError`."""

    step: str
    errno: int
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.step}: {self.message}" + (f" ({self.path})" if self.path else "")


SpawnReply = Spawned | SetupFailure


def encode_request(request: SpawnRequest) -> Fields:
    return dict(vars(request))


def decode_request(fields: Fields) -> SpawnRequest:
    """A field missing or unknown raises TypeError, as the constructor does."""
    return SpawnRequest(**fields)


def encode_reply(reply: SpawnReply) -> Fields:
    if isinstance(reply, Spawned):
        return {"status": "ok", "pid": reply.pid, "cgroup": reply.cgroup}
    return {
        "status": "error",
        "step": reply.step,
        "errno": reply.errno,
        "path": reply.path,
        "message": reply.message,
    }


def decode_reply(fields: Fields) -> SpawnReply:
    if fields.get("status") == "ok":
        return Spawned(int(fields["pid"]), str(fields.get("cgroup") or ""))
    return decode_failure(fields)


def decode_failure(fields: Fields) -> SetupFailure:
    """An error reply, or the spare program's report of one."""
    return SetupFailure(
        str(fields.get("step")),
        int(fields.get("errno") or 0),
        str(fields.get("path") or ""),
        str(fields.get("message")),
    )
