"""weft's side of the Remote Execution API (REAPI v2): the library both the daemon's remote
executor and the store-worker use to talk to a remote-execution engine such as BuildGrid.

Like `store/`, a plain library: synchronous gRPC calls, no trio and no knowledge of the daemon;
callers run these calls in their own threads. The wire messages are our own subset of the
public .proto files, generated into `remote.wire` by install.sh.
"""
