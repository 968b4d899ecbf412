"""store-build's snapshot options (docs/snapshots.md): the scopes a build's stops keep,
the snapshot it resumes from, and `--commit`, which snapshots a running build instead of
building.

The scopes are checked here, by the rule the daemon applies (`store.durabledirs`), before
the daemon is contacted: a typo or a broken pair is a usage error (exit 2), not a request
refused after recipes were evaluated.  The daemon checks them again, merged over its
`weft.toml`, which only it knows.  `store.durabledirs` is imported only when a scope is
given: it costs a command ~35 ms.
"""

from daemon.cli.common import Flag, UsageError, absolute, connect, lines

FLAGS = (
    Flag(
        "--on-pause",
        "what a pause keeps: full (frozen) or data (evicted)",
        "SCOPE",
        default="snapshot-on-pause, else full",
    ),
    Flag(
        "--on-commit",
        "what a failed build's snapshot keeps: full or data",
        "SCOPE",
        default="snapshot-on-commit, else data with durable dirs",
    ),
    Flag("--resume-from", "start the one target's build from this snapshot", "SNAPSHOT"),
    Flag("--commit", "snapshot the running build of DRV now; print its path", "DRV"),
)

# What `--commit` goes with: it builds nothing, so no other build option means anything.
_COMMIT_TAKES = frozenset({"--commit", "--on-commit", "--state-dir", "--socket"})


def _checked(on_pause: str | None, on_commit: str | None) -> None:
    """Refuse an unknown scope or a pair breaking the subset rule, in the rule's words."""
    if on_pause is None and on_commit is None:
        return
    from store.durabledirs import ScopeError, check_scopes

    try:
        check_scopes(on_pause, on_commit)
    except ScopeError as e:
        raise UsageError(f"error: {e}") from None


def snapshot_args(opts: dict[str, str | bool], targets: list[str]) -> dict[str, object]:
    """The `build` request's snapshot arguments from the command's options.  Targets
    each name at least one derivation, so that two are too many to resume is known
    already."""
    on_pause, on_commit = opts.get("--on-pause"), opts.get("--on-commit")
    _checked(
        None if on_pause is None else str(on_pause), None if on_commit is None else str(on_commit)
    )
    args: dict[str, object] = {}
    if on_pause is not None:
        args["on_pause"] = on_pause
    if on_commit is not None:
        args["on_commit"] = on_commit
    if "--resume-from" in opts:
        args["resume_from"] = absolute(str(opts["--resume-from"]))
        if len(targets) > 1:
            raise UsageError(
                f"--resume-from seeds one derivation's build; {len(targets)} targets were given"
            )
    return args


def check_resumed(args: dict[str, object], drvs: list[str]) -> None:
    """`--resume-from` seeds one build: the targets must name exactly one derivation."""
    if "resume_from" in args and len(drvs) != 1:
        raise UsageError(
            f"--resume-from seeds one derivation's build; the target names {len(drvs)}"
        )


def commit(opts: dict[str, str | bool], targets: list[str]) -> int:
    """`store-build --commit DRV [--on-commit SCOPE]`: snapshot DRV's running build, print
    the snapshot's path.  None running is the daemon's error (exit 1)."""
    if targets:
        raise UsageError("--commit snapshots a running build and builds nothing: no targets")
    extra = sorted(set(opts) - _COMMIT_TAKES)
    if extra:
        raise UsageError(f"--commit takes --on-commit and no other option, not {extra[0]}")
    scope = opts.get("--on-commit")
    _checked(None, None if scope is None else str(scope))
    drv = absolute(str(opts["--commit"]))
    with connect(opts) as client:
        record = client.call("snapshot-commit", drv=drv, **({"scope": scope} if scope else {}))
    lines([record["path"]])
    return 0
