"""The weft worker (`store-worker`): a bot of a REAPI engine (BuildGrid's Remote Workers
API) that builds the leases it takes in a private weft store of its own (`docs/remote.md`).

A process of its own, like the store-* commands: no trio; grpc's blocking calls and a few
threads.
"""
