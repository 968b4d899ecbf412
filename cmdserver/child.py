"""A command's process: a fork of the server that becomes the client's command.

It takes on what a process started by the client's shell would have had: the client's
standard streams (passed as descriptors), working directory, umask, environment and
resource limits, with the interpreter's default signal handling, and then runs the
command as `bin/store-client` does.  It dies with the server (PR_SET_PDEATHSIG), so
that no command outlives the process that reports its status.
"""

import contextlib
import ctypes
import io
import os
import resource
import signal
import sys
import traceback
from typing import NoReturn

from cmdserver.wire import Request

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
# Loaded while the server starts, so that no command pays for finding libc.
_LIBC = ctypes.CDLL(None, use_errno=True)
# The resource limits this interpreter knows, by number (the client sends all it knows).
_LIMITS = frozenset(getattr(resource, n) for n in dir(resource) if n.startswith("RLIMIT_"))
# The signals the server handles for itself; a command has the interpreter's defaults.
SERVER_SIGNALS = (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP)


def become(request: Request, streams: list[int], server: int) -> NoReturn:
    """Run `request` in this freshly forked process; never returns: nothing may unwind
    into the server's frames below."""
    try:
        # What ps and top show: the command, not a second server (the command line,
        # which /proc shows, stays the server's).
        _LIBC.prctl(_PR_SET_NAME, request.name.encode()[:15], 0, 0, 0)
        _die_with(server)
        _take_streams(streams)
        _take_process_state(request)
    except BaseException as e:  # the command cannot run: say why, once
        os.write(2, f"{request.name}: the command server could not start it: {e}\n".encode())
        os._exit(1)
    from daemon.cli.main import finish, run

    sys.argv = [request.name, *map(os.fsdecode, request.argv)]
    try:
        try:
            code = run(request.name, sys.argv[1:])
        except SystemExit as e:  # a recipe's sys.exit(), as the interpreter would end on it
            code = _exit_code(e)
        except BaseException:  # below this frame is the server's loop
            traceback.print_exc()
            code = 1
        finish(code)
    finally:
        os._exit(1)  # `finish` leaves; should it fail instead, nothing unwinds further


def _exit_code(e: SystemExit) -> int:
    if e.code is None or isinstance(e.code, int):
        return e.code or 0
    print(e.code, file=sys.stderr)
    return 1


def _die_with(server: int) -> None:
    if _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != server:  # it died before the line above
        os._exit(1)
    signal.set_wakeup_fd(-1)
    for sig in SERVER_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _take_streams(streams: list[int]) -> None:
    """The client's descriptors as 0, 1 and 2, and nothing else of the server's open;
    the interpreter's stream objects rebuilt on them (a terminal's stdout is line
    buffered, a pipe's is not, as at the interpreter's start).

    The server's own objects for its other descriptors (the listening socket, the other
    clients' connections) stay referenced by the server's frames below this one, so they
    are never collected here, and never close a number this process has reused."""
    olds = (sys.stdin, sys.stdout, sys.stderr)
    # The server's streams (on /dev/null) own descriptors 0 to 2: closed by them, once.
    for old in olds:
        old.close()
    for target, fd in enumerate(streams):
        os.dup2(fd, target)
    os.closerange(3, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    sys.stdin = sys.__stdin__ = _text(0, "r", olds[0])
    sys.stdout = sys.__stdout__ = _text(1, "w", olds[1])
    sys.stderr = sys.__stderr__ = _text(2, "w", olds[2], line_buffering=True)


def _text(
    fd: int, mode: str, like: io.TextIOWrapper, line_buffering: bool = False
) -> io.TextIOWrapper:
    raw = io.FileIO(fd, mode, closefd=False)
    buffered = io.BufferedReader(raw) if mode == "r" else io.BufferedWriter(raw)
    return io.TextIOWrapper(
        buffered,
        encoding=like.encoding,
        errors=like.errors,
        line_buffering=line_buffering or raw.isatty(),
    )


def _take_process_state(request: Request) -> None:
    os.chdir(request.cwd)
    os.umask(request.umask)
    os.environ.clear()
    for name, value in request.env.items():
        os.environb[name] = value
    for which, (soft, hard) in enumerate(request.limits):
        if which not in _LIMITS:
            continue
        # Above the server's own hard limit, a limit is refused, and the command keeps
        # the server's, which it could not have raised either had it started there.
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(which, (soft, hard))
