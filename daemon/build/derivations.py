"""The derivations a build request names, and everything they need: read, checked, and
kept for the next requests.

A `.drv` path's contents never change, so a derivation read and checked once (its output
paths are the ones its inputs give, as Nix checks) is kept, with its hash modulo, in a
bounded LRU: a request for a graph built before reads no `.drv` file again, and one just
added through the daemon (`learn`) none at all.
"""

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import trio

from store.derivation import (
    Derivation,
    DerivationError,
    HashModulo,
    check_output_paths,
    closure_order,
)
from store.lru import Lru
from store.paths import InvalidPath
from store.pins import PinOwner
from store.store import Store

T = TypeVar("T")
# Derivations (and hashes modulo) kept from one request to the next: a few tens of MB.
KNOWN_DERIVATIONS = 8192


@dataclass(frozen=True)
class Graph:
    """The derivations of a request's closure, by path, and their order, inputs first;
    the outputs found valid when it was loaded with them (`Derivations.load`)."""

    drvs: dict[str, Derivation]
    order: list[str]
    valid: frozenset[str] = frozenset()

    def inputs(self, path: str) -> list[str]:
        """What `path`'s sandbox shows: the outputs of its input derivations that it uses,
        and its sources."""
        drv = self.drvs[path]
        used = [self.drvs[d].outputs[n].path for d, names in drv.input_drvs.items() for n in names]
        return [*used, *drv.input_srcs]


def not_a_derivation(path: str) -> DerivationError:
    return DerivationError(f"{path} is not a valid derivation in the store")


class Derivations:
    def __init__(self, store: Store, known: int = KNOWN_DERIVATIONS) -> None:
        self.store = store
        self._checked = Lru[str, Derivation](known)
        self._hashes = Lru[str, str](known)

    def load(self, roots: list[str], pin: Callable[[list[str]], None] | None = None) -> Graph:
        """The derivations of `roots`' closure, read and checked, inputs first (in a worker
        thread).  Each must be valid in the store, which one query asks; those checked
        before come from the cache.  With `pin`, everything the graph names (derivations,
        sources, outputs) is pinned with it first, and the same query finds which outputs
        are valid (`Graph.valid`): a graph with nothing to build costs one query."""
        drvs: dict[str, Derivation] = {}
        read: list[str] = []
        resolve = functools.partial(self._resolve, drvs, read)
        order = closure_order(roots, resolve)
        produced: list[str] = []
        if pin is not None:
            produced = [o.path for p in order for o in drvs[p].outputs.values()]
            pin([*order, *(s for p in order for s in drvs[p].input_srcs), *produced])
        valid = self.store.valid_paths([*order, *produced])
        for path in order:
            if path not in valid:
                raise not_a_derivation(path)
        hashes = HashModulo(resolve, self._hashes)
        for path in read:
            check_output_paths(drvs[path], self.store.store_dir, hashes)
            self._checked.put(path, drvs[path])
        return Graph(drvs, order, frozenset(valid.intersection(produced)))

    def _resolve(self, drvs: dict[str, Derivation], read: list[str], path: str) -> Derivation:
        drv = drvs.get(path) or self._checked.get(path)
        if drv is None:
            drv = self._read(path)
            read.append(path)
        drvs[path] = drv
        return drv

    def _read(self, path: str) -> Derivation:
        try:
            self.store.parse(path)
            if not path.endswith(".drv"):
                raise InvalidPath(path)
            return Derivation.from_json(Path(path).read_text())
        except (InvalidPath, OSError):
            raise not_a_derivation(path) from None

    def learn(self, path: str, text: str) -> None:
        """A `.drv` just added (as `text`), checked in the adding worker thread as Nix
        checks a derivation it registers: a build of it then finds it checked.  One the
        store checked as it registered it comes parsed from there; one that does not
        check out is left for the build to refuse; one known already (a recipe evaluated
        again adds the same `.drv`s) is not read again."""
        if self._checked.get(path) is not None:
            return
        drv = self.store.checked_derivation(path)
        if drv is not None:
            self._checked.put(path, drv)
            return
        try:
            drv = Derivation.from_json(text)
            resolve = functools.partial(self._resolve_added, path, drv)
            check_output_paths(drv, self.store.store_dir, HashModulo(resolve, self._hashes))
        except DerivationError:
            return
        self._checked.put(path, drv)

    def _resolve_added(self, added: str, drv: Derivation, path: str) -> Derivation:
        return drv if path == added else self._checked.get(path) or self._read(path)


async def pinned(store: Store, owner: PinOwner, paths: list[str], then: Callable[[], T]) -> T:
    """`then()`, once `paths` are pinned for `owner`: one worker-thread trip for both.
    A request pins everything it reads or makes until it is over, so that a collection
    running meanwhile takes none of it."""

    def pin_then() -> T:
        store.pins.pin(owner, paths)
        return then()

    return await trio.to_thread.run_sync(pin_then)
