"""`store-build TARGET...`: build derivations through the daemon; print their outputs.

A target is a `.drv` store path or a recipe file `file.py[:name]`: without a name, the
module's `default`, else every top-level derivation.  Recipes are evaluated here, against
the daemon (sources and `.drv` files are added through it), and the daemon builds.  A
recipe's mistake is the user's to fix, so it is reported as `file:line: message` of the
recipe, not as a traceback through weft.
"""

import os
import sys
from types import TracebackType

from daemon.cli.blocking import BlockingClient, DaemonError
from daemon.cli.common import Command, CommandError, Flag, UsageError, absolute, connect
from daemon.cli.progress import Progress
from daemon.cli.recipestore import DaemonRecipeStore
from daemon.cli.snapflags import FLAGS as SNAPSHOT_FLAGS
from daemon.cli.snapflags import check_resumed, commit, snapshot_args

_DAEMONS = "the daemon's"
# `--remote`'s words (daemon/remote/policy.py's `Policy`, not imported: a command loads
# little).
REMOTE_POLICIES = ("all", "overflow", "none")

BUILD = Command(
    "store-build",
    "[OPTION...] TARGET... | --commit DRV [--on-commit SCOPE]",
    "Build derivations through the daemon; print their output paths.  A TARGET is a .drv\n"
    "store path or a recipe file.py[:name]: the recipe's `default`, else every derivation\n"
    "it defines, unless `:name` picks one.\n"
    "-o LINK links LINK to the first target's `out`, LINK-NAME to its output NAME, and\n"
    "LINK-2, LINK-2-NAME, ... to the next targets' outputs; each link is a GC root.\n"
    "--commit DRV snapshots DRV's running build instead (docs/snapshots.md).",
    (
        Flag("--max-jobs", "how many builds may run at once", "N", "-j", "the daemon's max-jobs"),
        Flag("--print-build-logs", "print what the builders write", short="-L"),
        Flag("--keep-going", "when a build fails, still build what does not need it"),
        Flag("--keep-failed", "keep a failed build's directory and say where", short="-K"),
        Flag("--check", "build valid outputs again and compare them"),
        Flag("--dry-run", "print what would be built and what is already valid; build nothing"),
        Flag("--out-link", "link the outputs as LINK, LINK-NAME, LINK-2 (above)", "LINK", "-o"),
        Flag("--timeout", "stop a build running longer", "SECONDS", default=_DAEMONS),
        Flag("--max-silent-time", "stop a build silent longer", "SECONDS", default=_DAEMONS),
        Flag("--retries", "retry a failed build up to N times", "N", default=_DAEMONS),
        Flag("--no-retry", "never retry a failed build"),
        Flag(
            "--remote",
            "which builds go to the remote engine: all, overflow (when local slots are full) "
            "or none",
            "POLICY",
            default="remote-policy in weft.toml",
        ),
        *SNAPSHOT_FLAGS,
    ),
)


def _store_dir(client: BlockingClient) -> str:
    return str(client.call("store-dir"))


# Where code that is not the user's lives: weft's packages and the standard library.  A
# traceback's deepest frame outside these, under the recipe's directory, is the line of
# the recipe (or of a module beside it) that went wrong.
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOT_THE_USERS = (
    *(os.path.join(_ROOT, package) + os.sep for package in ("daemon", "store")),
    os.path.dirname(os.__file__) + os.sep,
)


def _where(tb: TracebackType | None, recipe_dir: str) -> str | None:
    """`file:line` of the deepest frame in the user's code."""
    found = None
    while tb is not None:
        file = tb.tb_frame.f_code.co_filename
        if file.startswith(recipe_dir) and not file.startswith(NOT_THE_USERS):
            found = f"{file}:{tb.tb_lineno}"
        tb = tb.tb_next
    return found


def _run_recipe(path: str) -> dict[str, object]:
    """The recipe's top-level names, with the modules beside it importable while it runs
    (its directory first on sys.path, as `python file.py` has it, and taken off after)."""
    import runpy

    here = os.path.dirname(path)
    sys.path.insert(0, here)
    try:
        return runpy.run_path(path, run_name="__recipe__")
    except SyntaxError as e:
        raise CommandError(f"{e.filename}:{e.lineno}: SyntaxError: {e.msg}") from None
    except Exception as e:
        if isinstance(e, OSError) and e.filename == path:
            raise CommandError(f"error: cannot read {path}: {e.strerror}") from None
        where = _where(e.__traceback__, here + os.sep) or path
        what = e.message if isinstance(e, DaemonError) else f"{type(e).__name__}: {e}"
        raise CommandError(f"{where}: {what}") from None
    finally:
        if here in sys.path:  # unless the recipe took it off itself
            sys.path.remove(here)


def evaluate(target: str, client: BlockingClient) -> list[str]:
    """The `.drv` paths a target names."""
    file, _, name = target.partition(":")
    if not file.endswith(".py"):
        return [absolute(target)]
    # Only here: the recipe machinery (the store's hashing and paths) takes longer to
    # import than a build of a `.drv` path takes, start to finish.
    from store import recipe

    recipes = DaemonRecipeStore(client, _store_dir(client), batch=True)
    with recipes, recipe.using(recipes):
        module = _run_recipe(os.path.abspath(file))
    made = {k: v for k, v in module.items() if isinstance(v, recipe.Derivation)}
    if name:
        if name not in made:
            raise UsageError(f"{file} has no derivation named {name!r}")
        return [made[name].path]
    if "default" in made:
        return [made["default"].path]
    if not made:
        raise UsageError(f"{file} defines no derivation")
    return [d.path for d in made.values()]


def _drv_name(drv: str) -> str:
    # Imported only here, where a name is shown: the store's derivation module costs a
    # command ~40 ms to import.
    from store.derivation import drv_name

    return drv_name(drv)


def _link(client: BlockingClient, link: str, target: str) -> None:
    """`link` -> `target`, replaced atomically, and an indirect GC root for it."""
    link = os.path.abspath(link)
    tmp = f"{link}.tmp-{os.getpid()}"
    os.symlink(target, tmp)
    os.replace(tmp, link)
    client.call("add-root", link=link)


def _count(opts: dict[str, str | bool], flag: str) -> int | None:
    value = opts.get(flag)
    if value is None:
        return None
    if not str(value).isdigit():
        raise UsageError(f"{flag} takes a whole number, not {value!r}")
    return int(str(value))


def _seconds(opts: dict[str, str | bool], flag: str) -> float | None:
    value = opts.get(flag)
    if value is None:
        return None
    try:
        seconds = float(str(value))
    except ValueError:
        seconds = 0.0
    # Also refuses NaN, which compares false with everything.
    if not 0 < seconds < float("inf"):
        raise UsageError(f"{flag} takes a number of seconds above 0, not {value!r}")
    return seconds


def build_args(opts: dict[str, str | bool]) -> dict[str, object]:
    """The `build` request's options from the command's."""
    args: dict[str, object] = {
        "keep_going": "--keep-going" in opts,
        "keep_failed": "--keep-failed" in opts,
        "check": "--check" in opts,
    }
    jobs, retries = _count(opts, "--max-jobs"), _count(opts, "--retries")
    if jobs is not None:
        args["max_jobs"] = jobs
    if retries is not None and "--no-retry" in opts:
        raise UsageError("give --retries or --no-retry, not both")
    if retries is not None or "--no-retry" in opts:
        args["retries"] = retries or 0
    remote = opts.get("--remote")
    if remote is not None:
        if remote not in REMOTE_POLICIES:
            raise UsageError(f"--remote takes one of {', '.join(REMOTE_POLICIES)}, not {remote!r}")
        args["remote"] = remote
    for flag, key in (("--timeout", "timeout"), ("--max-silent-time", "max_silent_time")):
        seconds = _seconds(opts, flag)
        if seconds is not None:
            args[key] = seconds
    return args


def report(results: list[dict]) -> tuple[list[str], int]:
    """The outputs to print, and how many derivations failed, each said on stderr: a
    failure in the daemon's words, which name the derivation and its last log lines."""
    failed = 0
    printed: list[str] = []
    for r in results:
        if r["status"] in ("built", "valid") or r.get("identical"):
            printed += list(r["outputs"].values())
            if r.get("attempts", 1) > 1 or r.get("flaky"):
                note = " (flaky)" if r.get("flaky") else ""
                what = f"{_drv_name(r['drv'])}: succeeded on attempt {r['attempts']}{note}\n"
                os.write(2, what.encode())
        else:
            failed += 1
            os.write(2, f"error: {r.get('message') or r['status']}\n".encode())
    return printed, failed


def progress_of(opts: dict[str, str | bool]) -> Progress:
    """What the command shows of the daemon's build events on stderr (the builders' own
    lines too with `--print-build-logs`); its clock starts now."""
    return Progress("--print-build-logs" in opts, os.isatty(2))


def watch(client: BlockingClient, progress: Progress) -> None:
    client.on_log, client.on_idle = progress.update, progress.flush


def build(
    client: BlockingClient, progress: Progress, drvs: list[str], args: dict[str, object]
) -> list[dict]:
    """The `build` request's results; the status line's clock moves while the daemon is
    quiet, and the line is gone once the request ends."""
    if progress.terminal:
        client.on_tick = progress.tick
    try:
        return client.call("build", drvs=drvs, **args)
    finally:
        client.on_tick = None
        progress.finish()


def store_build(argv: list[str]) -> int:
    opts, targets = BUILD.parse(argv)
    if "--commit" in opts:
        return commit(opts, targets)
    if not targets:
        raise UsageError("no targets given")
    args = build_args(opts) | snapshot_args(opts, targets)
    link = str(opts.get("--out-link") or "")
    progress = progress_of(opts)
    with connect(opts) as client:
        watch(client, progress)
        drvs = [d for t in targets for d in evaluate(t, client)]
        check_resumed(args, drvs)
        links: list[tuple[str, str]] = []
        if link or "--dry-run" in opts:
            from daemon.cli.plan import Plan, describe, refuse_clobbering

            plan = Plan(drvs)
            if "--dry-run" in opts:
                built, present = plan.missing(lambda ps: client.call("is-valid", paths=ps))
                os.write(2, (describe(built, present) + "\n").encode())
                return 0
            links = plan.links(link)
            refuse_clobbering(links)
        results = build(client, progress, drvs, args)
        printed, failed = report(results)
        if printed:
            sys.stdout.write("\n".join(printed) + "\n")
        if not failed:
            for name, path in links:
                _link(client, name, path)
    return 1 if failed else 0
