"""The Command, Platform and Action of a remote build, in REAPI's canonical form.

Two daemons that would build a derivation alike must produce byte-identical Actions, or
the action cache never shares a result between them: so environment variables and
platform properties are sorted by name (REAPI requires it), output paths sorted, and the
messages serialized deterministically (`remote.digests.serialize`).

The platform says where a build can run: a worker takes an action only if it advertises
the same properties, among them `weft-store-dir`, since a store path's name depends on
the store dir it lives in.
"""

import os
from collections.abc import Iterable, Mapping, Sequence

from google.protobuf.duration_pb2 import Duration

from remote.digests import Blobs, Digest, DigestLike, to_proto
from remote.inputs import BUILD_DIR
from remote.wire import reapi_pb2

STORE_DIR_PROPERTY = "weft-store-dir"
OS_FAMILY_PROPERTY = "OSFamily"
ISA_PROPERTY = "ISA"
OS_FAMILY = "linux"


def platform_properties(store_dir: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The properties an action of this store asks for, and a worker of it advertises:
    the store dir, the OS and the machine (`os.uname().machine`), plus `extra`
    (weft.toml's `remote-platform`), which may not replace the store dir."""
    properties = {OS_FAMILY_PROPERTY: OS_FAMILY, ISA_PROPERTY: os.uname().machine}
    properties.update(extra or {})
    if STORE_DIR_PROPERTY in properties:
        raise ValueError(f"the platform property {STORE_DIR_PROPERTY} is weft's own")
    properties[STORE_DIR_PROPERTY] = store_dir
    return properties


def platform_for(store_dir: str, extra: Mapping[str, str] | None = None) -> reapi_pb2.Platform:
    platform = reapi_pb2.Platform()
    for name, value in sorted(platform_properties(store_dir, extra).items()):
        platform.properties.add(name=name, value=value)
    return platform


def output_path(store_path: str) -> str:
    """The REAPI output path of a store path: relative to the input root."""
    return store_path.lstrip("/")


def command_for(
    arguments: Sequence[str],
    environment: Mapping[str, str],
    outputs: Iterable[str],
    platform: reapi_pb2.Platform,
) -> reapi_pb2.Command:
    """The Command running `arguments` (builder first) in `environment`, producing the
    store paths `outputs`, in the input root's `build/`."""
    command = reapi_pb2.Command(
        arguments=list(arguments),
        output_paths=sorted({output_path(p) for p in outputs}),
        working_directory=BUILD_DIR,
    )
    for name in sorted(environment):
        command.environment_variables.add(name=name, value=environment[name])
    # Deprecated for Action.platform, but engines before REAPI 2.2 match on this one.
    command.platform.CopyFrom(platform)
    return command


def action_for(
    command_digest: DigestLike,
    root_digest: DigestLike,
    timeout: float | None,
    platform: reapi_pb2.Platform,
) -> reapi_pb2.Action:
    """The Action; `timeout` in seconds (None or 0: the engine's default).  Cached: the
    worker never reports a failed build in a way the engine would cache it."""
    action = reapi_pb2.Action(
        command_digest=to_proto(command_digest),
        input_root_digest=to_proto(root_digest),
        do_not_cache=False,
    )
    action.platform.CopyFrom(platform)
    if timeout:
        action.timeout.CopyFrom(_duration(timeout))
    return action


def add_action(
    blobs: Blobs,
    command: reapi_pb2.Command,
    root_digest: DigestLike,
    timeout: float | None,
) -> Digest:
    """Add `command` and its Action to `blobs`; the Action's digest (what Execute takes)."""
    command_digest = blobs.add_message(command)
    return blobs.add_message(action_for(command_digest, root_digest, timeout, command.platform))


def _duration(seconds: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(round(seconds * 1e9))
    return duration
