"""`store-run`: run a command in an environment computed from profiles, as `guix shell`
and `nix shell` do, with the environment applied by `execve` rather than by a sourced
script.

The daemon computes the environment (`runtime-start`, docs/store-run.md): the caller's
whole environment goes to it, the environment to exec comes back.  What the profiles
need is built first, on the same connection, so the daemon holds the outputs until the
runtime's own GC roots hold them.  Then the connection is closed and this process
becomes the command: the runtime the daemon registered is this pid, the exit status and
the terminal are the command's, and argv reaches it exactly as given, with no shell in
between.  `--print-env` asks for the same computation (`runtime-plan`) and prints it.
"""

import os
import sys

from daemon.cli.blocking import BlockingClient
from daemon.cli.common import COMMON, Command, CommandError, Flag, UsageError, connect, say

ENV_FROM = ("current", "parent", "pristine", "empty")
FORMATS = ("table", "sh")
# Exit codes of a command that cannot be run, as POSIX shells and env(1) give them, and
# of store-run's own failures (no daemon, a build failed, a refused profile), env(1)'s.
NOT_FOUND = 127
NOT_EXECUTABLE = 126
FAILED = 125
# Where a command is looked for when the new environment has no PATH: glibc's execvp's
# default (confstr _CS_PATH), as `env -i CMD` finds it.
DEFAULT_PATH = b"/bin:/usr/bin"
# The shell run when no command is given and the new environment names none.
DEFAULT_SHELL = b"/bin/sh"
# Characters a shell word needs no quotes for (shlex.quote's set; shlex itself imports re).
SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789@%+=:,./-_")

RUN = Command(
    "store-run",
    "[-p PROFILE[,PROFILE]]... [--env-from MODE] [--pure] [--keep VAR]...\n"
    "       [--unset VAR]... [--print-env [--json|--format sh]] [--durable] [--name NAME]\n"
    "       [-L] [-j N] [-- CMD ARGS...]",
    "Run CMD (default: $SHELL) in the environment the profiles make: each profile's\n"
    "members' bin, lib/pkgconfig, share/man, ... prepended to PATH, PKG_CONFIG_PATH,\n"
    "MANPATH, ..., then its own variables.  A PROFILE is a profile, any store path (a\n"
    "profile of that one path), a .drv (its outputs) or a recipe file.py[:name]; what is\n"
    "missing is built first.  The run is registered as a runtime (WEFT_RUNTIME, see\n"
    "store-runtime): its profiles stay GC roots while CMD runs.  MODE is where the\n"
    "environment starts: current (yours), parent (what the enclosing store-run's command\n"
    "got), pristine (what the outermost store-run was started from), empty.",
    (
        Flag("--profile", "add profiles (repeatable)", "PROFILE[,...]", "-p"),
        Flag("--env-from", "start from current|parent|pristine|empty", "MODE", default="current"),
        Flag("--pure", "drop all but HOME, USER, TERM, LANG, ... and --keep VARs"),
        Flag("--keep", "keep VAR (from your environment) with --pure (repeatable)", "VAR"),
        Flag("--unset", "remove VAR from the result (repeatable)", "VAR"),
        Flag("--print-env", "print the changes instead of running; register nothing"),
        Flag("--json", "with --print-env: the changes as JSON"),
        Flag("--format", "with --print-env: table, or sh for `eval`", "FMT", default="table"),
        Flag("--durable", "keep the runtime's GC roots after CMD exits, until forgotten"),
        Flag("--name", "a name for the runtime (store-runtime shows it)", "NAME"),
        Flag("--print-build-logs", "print what the builders write", short="-L"),
        Flag("--max-jobs", "how many builds may run at once", "N", "-j", "the daemon's max-jobs"),
    ),
)
REPEATED = ("--profile", "--keep", "--unset")


def parse(argv: list[str]) -> tuple[dict[str, str | bool], dict[str, list[str]], list[str]]:
    """The options, the repeatable ones' values in order, and the command after `--`.
    `Command.parse` keeps a flag's last value only, so each option is parsed on its own:
    one word, or two when it is exactly a flag that takes a value."""
    words, command = argv, []
    if "--" in argv:
        at = argv.index("--")
        words, command = argv[:at], argv[at + 1 :]
    takes_value = {n for f in (*RUN.flags, *COMMON) if f.value for n in (f.name, f.short) if n}
    opts: dict[str, str | bool] = {}
    repeated: dict[str, list[str]] = {name: [] for name in REPEATED}
    i = 0
    while i < len(words):
        width = 2 if words[i] in takes_value else 1
        one, rest = RUN.parse(words[i : i + width])
        if rest:
            raise UsageError(f"{rest[0]!r}: the command goes after `--` (store-run -- CMD ...)")
        for name, value in one.items():
            if name in repeated:
                repeated[name].append(str(value))
            else:
                opts[name] = value
        i += width
    return opts, repeated, command


def sh_quote(word: str) -> str:
    """`word` as one shell word: as it is when safe, else in single quotes."""
    if word and all(c in SAFE for c in word):
        return word
    return "'" + word.replace("'", "'\\''") + "'"


def _check(opts: dict[str, str | bool], command: list[str]) -> None:
    if opts.get("--env-from", "current") not in ENV_FROM:
        raise UsageError(f"--env-from takes one of {', '.join(ENV_FROM)}")
    if opts.get("--format", "table") not in FORMATS:
        raise UsageError(f"--format takes one of {', '.join(FORMATS)}")
    if "--print-env" in opts:
        if command:
            raise UsageError("--print-env runs nothing: give no command")
        for flag in ("--durable", "--name"):
            if flag in opts:
                raise UsageError(f"{flag} is for a runtime; --print-env registers none")
        if "--json" in opts and "--format" in opts:
            raise UsageError("give --json or --format, not both")
    else:
        for flag in ("--json", "--format"):
            if flag in opts:
                raise UsageError(f"{flag} is for --print-env")


def _targets(values: list[str]) -> list[str]:
    targets = [t for value in values for t in value.split(",")]
    if "" in targets:
        raise UsageError("an empty PROFILE in -p (PROFILE[,PROFILE]...)")
    return targets


def _profiles(client: BlockingClient, opts: dict[str, str | bool], targets: list[str]) -> list[str]:
    """The store paths the targets name, in order, a derivation's outputs built first
    (store-build's progress on stderr)."""
    if not targets:
        return []
    from daemon.cli.storegraph import resolve

    store_dir = str(client.call("store-dir"))
    paths = [resolve(t, store_dir) for t in targets]
    # A recipe is a file of the user's; a store path named `*.py` is a profile member.
    recipes = [
        not p.startswith(store_dir + "/") and t.partition(":")[0].endswith(".py")
        for t, p in zip(targets, paths, strict=True)
    ]
    if not any(recipes) and not any(p.endswith(".drv") for p in paths):
        # Store paths only: store-build's machinery (a tenth of the command's time) is
        # not loaded.
        return paths
    return _build_targets(client, opts, targets, paths, recipes)


def _build_targets(
    client: BlockingClient,
    opts: dict[str, str | bool],
    targets: list[str],
    paths: list[str],
    recipes: list[bool],
) -> list[str]:
    from daemon.cli.build import build, build_args, evaluate, progress_of, report, watch

    progress = progress_of(opts)
    watch(client, progress)
    named: list[list[str] | str] = []  # per target: its derivations, or a store path
    for target, path, recipe in zip(targets, paths, recipes, strict=True):
        if recipe:
            named.append(evaluate(target, client))
        else:
            named.append([path] if path.endswith(".drv") else path)
    drvs = list(dict.fromkeys(d for n in named if isinstance(n, list) for d in n))
    results = build(client, progress, drvs, build_args(opts))
    _, failed = report(results)
    if failed:
        raise CommandError(f"error: {failed} of the profiles' derivations failed to build")
    outputs = {r["drv"]: list(r["outputs"].values()) for r in results}
    return [p for n in named for p in ([n] if isinstance(n, str) else _all(outputs, n))]


def _all(outputs: dict[str, list[str]], drvs: list[str]) -> list[str]:
    return [p for d in drvs for p in outputs[d]]


def caller_environment() -> list[tuple[bytes, bytes]]:
    """The environment this process was started with.  Not `os.environb`: Python adds
    `LC_CTYPE=C.UTF-8` to it at start-up when the locale is C (PEP 538), and that is no
    part of what the caller had.  The kernel's copy of the exec-time block is."""
    try:
        with open("/proc/self/environ", "rb") as f:
            block = f.read()
    except OSError:
        return list(os.environb.items())
    pairs = []
    for entry in block.split(b"\0"):
        name, eq, value = entry.partition(b"=")
        if eq and name:
            pairs.append((name, value))
    return pairs


def _text(value: str, what: str) -> str:
    """A name or label the daemon gets as text: refused if not UTF-8."""
    try:
        value.encode()
    except UnicodeEncodeError:
        raise UsageError(f"{what} {value!r} is not UTF-8") from None
    return value


def _request(
    opts: dict[str, str | bool],
    repeated: dict[str, list[str]],
    command: list[bytes],
    environment: list[tuple[bytes, bytes]],
) -> dict[str, object]:
    """The arguments `runtime-plan` and `runtime-start` share, but the profiles."""
    parent = dict(environment).get(b"WEFT_RUNTIME", b"")
    return {
        "env": [list(pair) for pair in environment],
        # An id is hex: anything else is no runtime of the caller's, and says so as text.
        "parent": parent.decode(errors="replace") or None,
        "env_from": str(opts.get("--env-from", "current")),
        "pure": "--pure" in opts,
        "keep": [_text(v, "--keep") for v in repeated["--keep"]],
        "unset": [_text(v, "--unset") for v in repeated["--unset"]],
        "argv": command,
        "cwd": os.getcwdb(),
    }


def store_run(argv: list[str]) -> int:
    """`store-run`; its own failures exit `FAILED`, as env(1)'s do, so that a caller can
    tell them from the command's exit status (127 and 126 are the shell's, below)."""
    from daemon.cli.blocking import DaemonError

    try:
        return _run(argv)
    except CommandError as e:
        say(str(e))
    except DaemonError as e:
        say(f"error: {e.message}")
    except (OSError, ConnectionError) as e:
        say(f"error: {e}")
    return FAILED


def _run(argv: list[str]) -> int:
    opts, repeated, words = parse(argv)
    _check(opts, words)
    targets = _targets(repeated["--profile"])
    environment = caller_environment()
    # With no command, the shell: the caller's as recorded; the one the new environment
    # names is what runs (the same unless a profile sets SHELL).
    shell = dict(environment).get(b"SHELL") or DEFAULT_SHELL
    command = [os.fsencode(w) for w in words] or [shell]
    with connect(opts) as client:
        args = _request(opts, repeated, command, environment)
        args["profiles"] = _profiles(client, opts, targets)
        if "--print-env" in opts:
            changes = client.call("runtime-plan", **args)["changes"]
            return _print_changes(opts, changes)
        args["durable"] = "--durable" in opts
        args["name"] = _text(str(opts["--name"]), "--name") if opts.get("--name") else None
        env = dict(client.call("runtime-start", **args)["env"])
    if not words:
        command = [env.get(b"SHELL") or DEFAULT_SHELL]
    return _exec(command, env)


def _find(name: bytes, path: bytes) -> bytes | None:
    """Where `name` is on `path`, as execvp looks: the first executable file, else the
    first file (for exec to say why it cannot run it, as a shell would), else None."""
    if b"/" in name:
        return name
    unusable = None
    for entry in path.split(b":"):
        candidate = os.path.join(entry or b".", name)
        if os.path.isfile(candidate):
            if os.access(candidate, os.X_OK):
                return candidate
            unusable = unusable or candidate
    return unusable


def _exec(command: list[bytes], env: dict[bytes, bytes]) -> int:
    """Become the command; if it cannot be run, the shell's message and exit code."""
    # The C module: `signal` itself imports enum and functools, 3.6 ms of a 30 ms run.
    import _signal
    import errno

    program = _find(command[0], env.get(b"PATH", DEFAULT_PATH))
    if program is None:
        os.write(2, b"store-run: " + command[0] + b": command not found\n")
        return NOT_FOUND
    # Python ignores these two; an ignored signal stays ignored across exec, and a
    # command in a pipeline must die of SIGPIPE as it would started from a shell.
    for sig in (_signal.SIGPIPE, _signal.SIGXFSZ):
        _signal.signal(sig, _signal.SIG_DFL)
    try:
        try:
            os.execve(program, command, env)
        except OSError as e:
            if e.errno != errno.ENOEXEC:
                raise
            # A script with no `#!` line: execvp and env(1) hand it to the shell.
            os.execve(DEFAULT_SHELL, [DEFAULT_SHELL, program, *command[1:]], env)
    except OSError as e:
        os.write(2, b"store-run: " + command[0] + f": {e.strerror}\n".encode())
        return NOT_FOUND if isinstance(e, FileNotFoundError) else NOT_EXECUTABLE


def _print_changes(opts: dict[str, str | bool], changes: list[dict]) -> int:
    if "--json" in opts:
        from daemon.cli.common import print_json

        print_json(changes)
    elif opts.get("--format") == "sh":
        sys.stdout.buffer.write(b"".join(_sh_line(c) for c in changes))
    else:
        sys.stdout.write(_table(changes))
    return 0


def _sh_line(change: dict) -> bytes:
    name, new = change["name"], change["new"]
    if not (name.isascii() and name.isidentifier()):
        # A name from the captured environment that no shell can set or unset (`A-B`):
        # a line for it would make the whole `eval` fail.
        return b""
    if new is None:
        return f"unset {name}\n".encode()
    # Changes are text: a value's bytes that are not UTF-8 arrive as U+FFFD, so only the
    # real run (whose environment travels as bytes) gets such a value exactly.
    return f"export {name}={sh_quote(new)}\n".encode()


COLUMNS = ("name", "type", "op", "old", "value", "new")


def _cell(value: str | None) -> str:
    """A value as the table shows it: unset and empty told apart, control characters
    escaped so that one change stays one line."""
    if value is None:
        return "(unset)"
    if value == "":
        return "''"
    return value if value.isprintable() else repr(value)[1:-1]


def _table(changes: list[dict]) -> str:
    rows = [list(COLUMNS), *([_cell(c[k]) for k in COLUMNS] for c in changes)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS) - 1)]
    out = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        out.append("  ".join([*cells, row[-1]]).rstrip() + "\n")
    return "".join(out)
