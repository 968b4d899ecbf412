"""The command server: a per-user process that runs the store-* commands with their imports
done.

A store-* command is Python, and before it evaluates the first line of a recipe it has
paid the interpreter's start and the imports of weft's evaluator: about 55 ms, more than
Nix's whole no-op `nix-build` of 200 derivations.  The server pays them once: it imports
the command's modules, then forks a child per command, which takes on the client's
working directory, umask, environment, resource limits and standard streams (passed as
file descriptors) and runs the command as `bin/store-client` would.  The client
(`client.c`, installed as every store-* command but store-run and store-runtime) is a small
C program that only forwards.

Mercurial's chg is the model: a fork per command keeps commands as isolated from each
other as separate processes are (a recipe may change its directory, its environment or
sys.path), and a server whose code changed on disk declines and stops, so that a command
never runs stale code.  docs/cmdserver.md says what differs from a direct run.
"""
