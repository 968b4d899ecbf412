"""Garbage collection: find the roots, mark what they reach, delete the rest.

Roots are symlinks under `var/gcroots/` and the pins of live clients and running builds
(`store.gc.roots`, `store.pins`); marking walks references from them in one snapshot of the
database (`store.gc.marking`); deletion takes the rest referrers first, deciding again for
each path in the transaction that unregisters it (`store.gc.deletion`, with the paths moved
out of the store beside it by `store.gc.moving`), and the space comes back as the moved-out
paths are removed (`store.gc.reclaim`).  docs/gc.md tells why a collection is safe while
clients add, pin and build.

Every function blocks; the daemon runs them in a worker thread.  Callers use the package:
`from store import gc; gc.delete(store, gc.plan(store))`.
"""

from store.gc.deletion import BATCH_SIZE, GCResult, delete, remove_unused_links
from store.gc.marking import Graph, Plan, StillAlive, load_graph, mark, plan, restrict, simulate
from store.gc.reclaim import Reclaimer
from store.gc.roots import Root, add_indirect_root, find_roots

__all__ = [
    "BATCH_SIZE",
    "GCResult",
    "Graph",
    "Plan",
    "Reclaimer",
    "Root",
    "StillAlive",
    "add_indirect_root",
    "delete",
    "find_roots",
    "load_graph",
    "mark",
    "plan",
    "remove_unused_links",
    "restrict",
    "simulate",
]
