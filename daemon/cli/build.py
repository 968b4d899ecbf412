"""`store-build TARGET...`: build derivations through the daemon; print their outputs.

A target is a `.drv` store path or a recipe file `file.py[:name]`: without a name, the
module's `default`, else every top-level derivation.  Recipes are evaluated here, against
the daemon (sources and `.drv` files are added through it), and the daemon builds.
"""

import os
import sys

from daemon.cli.blocking import BlockingClient
from daemon.cli.common import UsageError, connect, parse
from daemon.wire.protocol import Log, LogKind


class DaemonRecipeStore:
    """Recipes evaluated against the daemon: the store they write into is its store."""

    def __init__(self, client: BlockingClient, store_dir: str) -> None:
        self.client = client
        self.store_dir = store_dir

    def add_source(self, path: str, name: str) -> str:
        return str(self.client.call("add-from-path", path=path, name=name)["path"])

    def add_text(self, name: str, text: str, references: list[str]) -> str:
        return str(
            self.client.call("add-text", name=name, text=text, references=references)["path"]
        )


def _store_dir(client: BlockingClient) -> str:
    return str(client.call("store-dir"))


def evaluate(target: str, client: BlockingClient) -> list[str]:
    """The `.drv` paths a target names."""
    file, _, name = target.partition(":")
    if not file.endswith(".py"):
        return [target]
    # Only here: the recipe machinery (the store's hashing and paths) takes longer to
    # import than a build of a `.drv` path takes, start to finish.
    import runpy

    from store import recipe

    with recipe.using(DaemonRecipeStore(client, _store_dir(client))):
        module = runpy.run_path(os.path.abspath(file), run_name="__recipe__")
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


def _drv_names(drvs: list[str]) -> list[str]:
    # Imported only here, where names are shown: the store's derivation module costs a
    # command ~40 ms to import, which builds followed through a pipe (scripts, the bench)
    # do not pay.
    from store.derivation import drv_name

    return [drv_name(d) for d in drvs]


class Progress:
    """What the daemon says about a build, for people: on a terminal a status line kept
    at the bottom (built/total and what is running), elsewhere plain lines.  The frames'
    `kind` tells a builder's log line (shown with `-L`) and the builds that start and end
    (the status line's) from the rest."""

    def __init__(self, show_logs: bool, terminal: bool) -> None:
        self.show_logs = show_logs
        self.terminal = terminal
        self.done = self.total = 0
        self.running: list[str] = []  # derivation paths
        self._status = False
        self._pending: list[str] = []

    def _write(self, text: str) -> None:
        self._pending.append(text)

    def flush(self) -> None:
        """Write what was gathered: called when the client is about to wait."""
        if self._pending:
            data = "".join(self._pending).encode()
            self._pending.clear()
            while data:
                data = data[os.write(2, data) :]

    def _line(self, text: str) -> None:
        if self._status:
            self._write("\r\x1b[K")
            self._status = False
        self._write(text + "\n")

    def update(self, event: Log) -> None:
        message = event.message
        if event.kind == LogKind.LINE:
            if self.show_logs:
                self._line(message)
        else:
            if event.done is not None and event.total is not None:
                self.done, self.total = event.done, event.total
            if event.kind == LogKind.STARTED and event.drv is not None:
                self.running.append(event.drv)
            elif event.kind == LogKind.BUILT and event.drv in self.running:
                self.running.remove(event.drv)
            if not self.terminal:
                self._line(
                    message if event.done is None else f"[{self.done}/{self.total}] {message}"
                )
        if self.terminal:
            running = ", ".join(_drv_names(self.running)) or "-"
            self._write(f"\r\x1b[K[{self.done}/{self.total} built] running: {running}")
            self._status = True

    def finish(self) -> None:
        if self._status:
            self._write("\r\x1b[K")
            self._status = False
        self.flush()


def _link(client: BlockingClient, link: str, target: str) -> None:
    """`link` -> `target`, replaced atomically, and an indirect GC root for it."""
    link = os.path.abspath(link)
    tmp = f"{link}.tmp-{os.getpid()}"
    os.symlink(target, tmp)
    os.replace(tmp, link)
    client.call("add-root", link=link)


def main(argv: list[str]) -> int:
    opts, targets = parse(
        argv,
        {
            "-j": True,
            "--max-jobs": True,
            "-L": False,
            "--print-build-logs": False,
            "-K": False,
            "--keep-failed": False,
            "--check": False,
            "--keep-going": False,
            "-o": True,
            "--retries": True,
            "--no-retry": False,
        },
    )
    if not targets:
        raise UsageError("no targets given")
    jobs = opts.get("-j") or opts.get("--max-jobs")
    if jobs is not None and not str(jobs).isdigit():
        raise UsageError("-j takes a number")
    retries = opts.get("--retries")
    if retries is not None and not str(retries).isdigit():
        raise UsageError("--retries takes a number")
    if retries is not None and "--no-retry" in opts:
        raise UsageError("give --retries or --no-retry, not both")
    show_logs = "-L" in opts or "--print-build-logs" in opts

    progress = Progress(show_logs, os.isatty(2))
    with connect(opts) as client:
        client.on_log, client.on_idle = progress.update, progress.flush
        drvs = [d for t in targets for d in evaluate(t, client)]
        args: dict[str, object] = {
            "drvs": drvs,
            "keep_going": "--keep-going" in opts,
            "keep_failed": "-K" in opts or "--keep-failed" in opts,
            "check": "--check" in opts,
        }
        if jobs is not None:
            args["max_jobs"] = int(str(jobs))
        if retries is not None or "--no-retry" in opts:
            args["retries"] = int(str(retries or 0))
        try:
            results = client.call("build", **args)
        finally:
            progress.finish()
        failed = 0
        printed: list[str] = []
        for r in results:
            if r["status"] in ("built", "valid") or r.get("identical"):
                printed += list(r["outputs"].values())
                if r.get("attempts", 1) > 1 or r.get("flaky"):
                    (name,) = _drv_names([r["drv"]])
                    note = " (flaky)" if r.get("flaky") else ""
                    os.write(2, f"{name}: succeeded on attempt {r['attempts']}{note}\n".encode())
            else:
                failed += 1
                os.write(2, f"error: {r.get('message') or r['status']}\n".encode())
        if printed:
            sys.stdout.write("\n".join(printed) + "\n")
        link = opts.get("-o")
        if link and not failed:
            for i, path in enumerate(printed):
                _link(client, str(link) if i == 0 else f"{link}-{i + 1}", path)
    return 1 if failed else 0
