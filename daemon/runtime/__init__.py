"""Runtimes: the programs `store-run` starts in environments computed from store paths,
their captured environments and lineage, and the GC roots of their profiles while they
live (docs/store-run.md, docs/protocol.md)."""
