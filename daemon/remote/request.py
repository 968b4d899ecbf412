"""What a remote build sends (docs/remote.md), made in one worker-thread trip: each path
of the closure as a REAPI node (from the store's digest table, computed and kept there
on a path's first remote use), the input root laid out at the store paths, the Command
with the exact environment a local build gets, and the Action with the timeout and the
platform.  Every blob met goes into one `Blobs`, of which only what the CAS lacks is
sent.
"""

from dataclasses import dataclass

from daemon.build.request import DEFAULT_TIMEOUT, BuildOptions
from daemon.build.variables import build_environment
from remote.action import action_for, command_for, platform_for
from remote.digests import Blobs, Digest
from remote.inputs import input_root
from remote.storenodes import path_nodes
from store.derivation import Derivation
from store.remotedigests import RemoteDigests
from store.store import Store


@dataclass
class Prepared:
    closure: list[str]  # the input closure: the candidates of the reference scan
    blobs: Blobs  # every blob the action needs
    action_digest: Digest


def prepare(
    store: Store,
    drv_path: str,
    drv: Derivation,
    closure: list[str],
    sent: list[str],
    cores: str,
    opts: BuildOptions,
    extra_platform: dict[str, str],
) -> Prepared:
    """The action of this build (in a worker thread): `sent` is every path the worker
    registers, `closure` the input closure."""
    blobs = Blobs()
    nodes = path_nodes(RemoteDigests(store.db), sent, blobs)
    root = input_root(store.store_dir, nodes, drv_path, blobs)
    platform = platform_for(store.store_dir, extra_platform)
    command = command_for(
        [drv.builder, *drv.args],
        build_environment(drv, store.store_dir, cores),
        [o.path for o in drv.outputs.values()],
        platform,
    )
    # Only a timeout the request set: the default is this daemon's bound on every build,
    # which the worker's daemon applies as well.
    timeout = opts.timeout if opts.timeout != DEFAULT_TIMEOUT else None
    action = action_for(blobs.add_message(command), root, timeout, platform)
    return Prepared(closure, blobs, blobs.add_message(action))
