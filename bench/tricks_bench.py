"""What each latency trick is worth: weft against weft on the build bench's two graphs.

Each variant is this checkout with other settings (`quick-wakeups = true`,
`share-cpu = false`), or another source tree: a checkout with one trick taken out, named
in `WEFT_BENCH_TREES` as `name=path[,name=path...]` (each tree needs its
`spawner/weft-spare`, which `install.sh` builds).  Variants take turns in rotated order,
round after round, and each round's time is divided by the default's of the same round:
the medians of those ratios are what the table reports (under 1: faster than the
default).
"""

import os
import statistics
import uuid
from pathlib import Path

from bench.build_bench import CHAIN, INDEPENDENT, weft_graphs
from bench.measure import scratch

Row = tuple[str, str, str]
ROUNDS = 5
TREES = "WEFT_BENCH_TREES"
SETTINGS = {
    "quick-wakeups = true": "quick-wakeups = true\n",
    "share-cpu = false": "share-cpu = false\n",
}


def _variants() -> dict[str, tuple[str, Path | None]]:
    variants: dict[str, tuple[str, Path | None]] = {"default": ("", None)}
    variants.update({name: (text, None) for name, text in SETTINGS.items()})
    for entry in filter(None, os.environ.get(TREES, "").split(",")):
        name, _, path = entry.partition("=")
        variants[name] = ("", Path(path))
    return variants


def run() -> list[Row]:
    variants = _variants()
    names = list(variants)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    with scratch("weft-tricks-") as tmp:
        for round_ in range(ROUNDS):
            nonce = uuid.uuid4().hex
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                work = Path(tmp) / f"{round_}-{names.index(name)}"
                work.mkdir()
                settings, tree = variants[name]
                times[name].append(weft_graphs(work, nonce, settings, tree))
    rows: list[Row] = []
    base = times["default"]
    for i, graph in enumerate((f"{INDEPENDENT} independent", f"chain of {CHAIN}")):
        ms = statistics.median(t[i] for t in base) / (INDEPENDENT, CHAIN)[i] * 1000
        rows.append((f"{graph}, default", f"{ms:.1f} ms a build", f"medians of {ROUNDS} rounds"))
        for name in names[1:]:
            ratios = [a[i] / b[i] for a, b in zip(times[name], base, strict=True)]
            rows.append(
                (
                    f"{graph}, {name}",
                    f"{statistics.median(ratios):.2f} of the default's time",
                    "rounds: " + ", ".join(f"{r:.2f}" for r in ratios),
                )
            )
    return rows
