"""Store paths' REAPI nodes through the store's table: each path hashed once per store.

The first remote build that needs a path computes its node (`node_of`: every file read
and hashed) and keeps it in the store's database (`store/remotedigests.py`); every later
one reads it back and finds the path's blobs from the kept Tree without touching a file's
contents.  Blocking, and possibly long the first time: callers run it in a worker thread.
"""

from collections.abc import Iterable

from remote.digests import Blobs, PathNode, add_blobs_of, node_of
from store.remotedigests import RemoteDigests


def path_nodes(digests: RemoteDigests, paths: Iterable[str], blobs: Blobs) -> dict[str, PathNode]:
    """The node of each valid store path in `paths`, its blobs added to `blobs`; the nodes
    not yet in the table computed and kept.  NotRepresentable for a path REAPI cannot hold
    (nothing of it is kept)."""
    wanted = list(dict.fromkeys(paths))
    known = digests.get(wanted)
    for path, node in known.items():
        add_blobs_of(path, node, blobs)
    fresh = {path: node_of(path, blobs) for path in wanted if path not in known}
    digests.put(fresh)
    return {path: known.get(path) or fresh[path] for path in wanted}
