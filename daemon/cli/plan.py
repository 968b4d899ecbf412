"""What a build request will do, known from its derivations before it is sent: what
`store-build --dry-run` says will be built and is already there, and the links `-o`
makes, checked before anything is built (a build is not run only to have its link
refused afterwards).

The `.drv` files are read straight from the store, as any local user may; validity is
one `is-valid` request to the daemon.  Only store-build imports this module, and only
for `--dry-run` or `-o`: the derivation code costs a command ~40 ms to import.
"""

import os
from collections.abc import Callable

from daemon.cli.common import CommandError
from store.derivation import Derivation, closure_order


class Plan:
    """The closure of some derivations, read for one command (its size is the graph's)."""

    def __init__(self, roots: list[str]) -> None:
        self.roots = roots
        self.drvs: dict[str, Derivation] = {}
        self.order = closure_order(roots, self.read)

    def read(self, path: str) -> Derivation:
        drv = self.drvs.get(path)
        if drv is None:
            try:
                with open(path, encoding="utf-8") as f:
                    drv = self.drvs[path] = Derivation.from_json(f.read())
            except OSError as e:
                raise CommandError(f"error: cannot read {path}: {e.strerror}") from None
            except ValueError as e:  # not UTF-8, or a DerivationError
                raise CommandError(f"error: {path} is not a derivation: {e}") from None
        return drv

    def missing(self, valid_of: Callable[[list[str]], list[str]]) -> tuple[list[str], list[str]]:
        """The derivations that will be built, inputs first, and the roots' outputs that
        are already valid.  The daemon's rule: a derivation of the closure is built when
        one of its outputs is not valid."""
        outputs = {p: [o.path for o in d.outputs.values()] for p, d in self.drvs.items()}
        valid = set(valid_of([o for p in self.order for o in outputs[p]]))
        built = [p for p in self.order if not set(outputs[p]) <= valid]
        present = [o for r in dict.fromkeys(self.roots) for o in outputs[r] if o in valid]
        return built, present

    def links(self, link: str) -> list[tuple[str, str]]:
        """(link, output path) for `-o LINK`, as Nix names them: the first target's `out`
        is LINK and its `dev` LINK-dev; the second target's are LINK-2, LINK-2-dev, ..."""
        made: list[tuple[str, str]] = []
        for i, root in enumerate(self.roots):
            base = link if i == 0 else f"{link}-{i + 1}"
            for name, out in self.read(root).outputs.items():
                made.append((base if name == "out" else f"{base}-{name}", out.path))
        return made


def refuse_clobbering(links: list[tuple[str, str]]) -> None:
    """Refuse, before building, to replace anything but a symbolic link by a link."""
    for link, _ in links:
        if os.path.lexists(link) and not os.path.islink(link):
            raise CommandError(
                f"error: {link} exists and is not a symbolic link: "
                "remove it, or name the link otherwise with -o"
            )


def _listing(count: int, one: str, many: str, paths: list[str]) -> str:
    head = one if count == 1 else many.format(count)
    return head + "".join(f"\n  {p}" for p in paths)


def describe(built: list[str], present: list[str]) -> str:
    """What `--dry-run` prints, in nix-build's words."""
    parts = []
    if built:
        parts.append(
            _listing(
                len(built),
                "this derivation will be built:",
                "these {} derivations will be built:",
                built,
            )
        )
    if present:
        parts.append(
            _listing(
                len(present),
                "this path is already valid:",
                "these {} paths are already valid:",
                present,
            )
        )
    return "\n".join(parts) or "nothing to build"
