"""`store-status` and `store-history`: the scheduler's view and the build history.

store-status [--json]               load, parallelism in effect, running builds, queue
store-history [--json] DRV|OUTPUT   every attempt at building a derivation, and the
                                    snapshot it left (store-snapshot)
store-history [--json] --flaky      the derivations marked flaky
store-history --forget DRV|OUTPUT   drop a derivation's attempts and its flaky mark
"""

import sys
import time

from daemon.cli.common import Command, Flag, UsageError, absolute, connect, lines, print_json

JSON = Flag("--json", "print the result as JSON")
STATUS = Command(
    "store-status",
    "[--json]",
    "Show the daemon's scheduler: load, parallelism in effect, running builds, the queue.",
    (JSON,),
)
HISTORY = Command(
    "store-history",
    "[--json] (DRV|OUTPUT | --flaky | --forget DRV|OUTPUT)",
    "Show every attempt at building a derivation (named by its .drv or an output), or\n"
    "the derivations marked flaky; or forget a derivation's attempts and flaky mark.",
    (
        JSON,
        Flag("--flaky", "list the derivations marked flaky, with failed and built counts"),
        Flag("--forget", "drop a derivation's recorded attempts and its flaky mark", "DRV"),
    ),
)


def _pct(value: object) -> str:
    return "-" if value is None else f"{value:.0f}%"


def store_status(argv: list[str]) -> int:
    opts, rest = STATUS.parse(argv)
    if rest:
        raise UsageError("store-status takes no arguments")
    with connect(opts) as client:
        status = client.call("status")
    if "--json" in opts:
        print_json(status)
        return 0
    load = status["load"]
    out = [
        f"pressure: cpu {_pct(load['cpu'])}, memory {_pct(load['memory'])}, "
        f"io {_pct(load['io'])}; load average {load['load1']:.2f} {load['load5']:.2f}; "
        f"{load['mem_available'] / (1 << 30):.1f} GiB available",
        f"parallelism: {status['parallelism']} of max-jobs {status['max_jobs']}"
        + (f" (held back: {', '.join(status['held_back'])})" if status["held_back"] else ""),
        f"running: {len(status['running'])}, queued: {status['queued']}, "
        f"retries waiting: {status['retries_waiting']}, "
        f"evicted waiting: {status['evicted']}",
    ]
    if status["running"]:
        # Imported only when there are builds to name: it costs a command ~40 ms.
        from store.derivation import drv_name

        for r in status["running"]:
            state = ", paused" if r["paused"] else ""
            name = drv_name(r["drv"])
            out.append(f"  {name} (attempt {r['attempt']}, {r['seconds']:g} s{state})")
    lines(out)
    return 0


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _forget(opts: dict[str, str | bool], paths: list[str]) -> int:
    if paths:
        raise UsageError("--forget takes one derivation or output path, and no other")
    with connect(opts) as client:
        gone = client.call("forget-history", drv=absolute(str(opts["--forget"])))
    if "--json" in opts:
        print_json(gone)
        return 0
    mark = "; it is no longer marked flaky" if gone["flaky"] else ""
    lines([f"{gone['drv']}: forgot {gone['attempts']} attempts{mark}"])
    return 0


def store_history(argv: list[str]) -> int:
    opts, paths = HISTORY.parse(argv)
    if "--flaky" in opts and "--forget" in opts:
        raise UsageError("--flaky and --forget do not go together")
    if "--forget" in opts:
        return _forget(opts, paths)
    if "--flaky" in opts:
        if paths:
            raise UsageError("--flaky takes no paths")
        with connect(opts) as client:
            flaky = client.call("history", flaky=True)["flaky"]
        if "--json" in opts:
            print_json(flaky)
        else:
            lines([f"{f['drv']}\tfailed {f['failed']}\tbuilt {f['built']}" for f in flaky])
        return 0
    if len(paths) != 1:
        raise UsageError("give one derivation or output path, or --flaky")
    with connect(opts) as client:
        history = client.call("history", drv=absolute(paths[0]))
    if "--json" in opts:
        print_json(history)
        return 0
    rows = [
        (
            "attempt",
            "started",
            "secs",
            "outcome",
            "exit",
            "jobs",
            "peak cpu/mem/io",
            "paused",
            "snapshot",
        )
    ]
    for a in history["attempts"]:
        p = a["load_peak"]
        rows.append(
            (
                str(a["attempt"]),
                _when(a["start_time"]),
                f"{a['end_time'] - a['start_time']:.1f}",
                a["outcome"],
                "" if a["exit_code"] is None else str(a["exit_code"]),
                str(a["parallelism"]),
                "/".join(_pct(p[r]) for r in ("cpu", "memory", "io")),
                f"{a['paused']:g}" if a["paused"] else "",
                a["snapshot"] or "",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines(["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows])
    sys.stderr.write(f"{history['drv']}" + (" is marked flaky\n" if history["flaky"] else "\n"))
    return 0
