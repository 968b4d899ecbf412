"""Derivations: what to build, from what, and where the results go.

A derivation is stored as canonical JSON (sorted keys, no insignificant whitespace) in a
text store path `<hash>-<name>.drv` whose references are its input derivations and input
sources.  Output paths are input-addressed: computed from the derivation's hash modulo
fixed-output inputs, as Nix does, so changing only how a fixed-output input is fetched
does not change (and rebuild) its dependents.  A fixed-output derivation's output path
depends only on its name and expected hash.  See docs/derivations.md.
"""

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

import blake3

from store.lru import Lru
from store.paths import PathKind, make_store_path

FORMAT = 1
SYSTEM = "x86_64-linux"
_CACHE_SIZE = 4096


class DerivationError(ValueError):
    """A derivation that is malformed or inconsistent."""


@dataclass(frozen=True)
class Output:
    path: str = ""
    # A fixed-output derivation's expected content hash, `blake3:<hex>` of the archive.
    hash: str | None = None


@dataclass(frozen=True)
class Derivation:
    name: str
    builder: str
    outputs: Mapping[str, Output]
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    input_drvs: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    input_srcs: tuple[str, ...] = ()
    system: str = SYSTEM

    @property
    def is_fixed_output(self) -> bool:
        return set(self.outputs) == {"out"} and self.outputs["out"].hash is not None

    def output_path(self, name: str = "out") -> str:
        return self.outputs[name].path

    def references(self) -> list[str]:
        return sorted({*self.input_drvs, *self.input_srcs})

    def to_json(self) -> str:
        doc = {
            "format": FORMAT,
            "name": self.name,
            "builder": self.builder,
            "args": list(self.args),
            "env": dict(self.env),
            "system": self.system,
            "outputs": {
                k: {"path": o.path, **({"hash": o.hash} if o.hash else {})}
                for k, o in self.outputs.items()
            },
            "inputDrvs": {k: sorted(v) for k, v in self.input_drvs.items()},
            "inputSrcs": sorted(self.input_srcs),
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> "Derivation":
        try:
            doc = json.loads(text)
            if doc.get("format") != FORMAT:
                raise DerivationError(f"unknown derivation format {doc.get('format')!r}")
            return cls(
                name=doc["name"],
                builder=doc["builder"],
                outputs={k: Output(v["path"], v.get("hash")) for k, v in doc["outputs"].items()},
                args=tuple(doc["args"]),
                env=dict(doc["env"]),
                input_drvs={k: tuple(v) for k, v in doc["inputDrvs"].items()},
                input_srcs=tuple(doc["inputSrcs"]),
                system=doc["system"],
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise DerivationError(f"malformed derivation: {e}") from None


Resolver = Callable[[str], Derivation]


class HashModulo:
    """Hashes of derivations modulo fixed-output inputs, with a bounded memo by path (its
    own, or `memo`, which may outlive it: a `.drv` path's hash never changes)."""

    def __init__(self, resolve: Resolver, memo: Lru[str, str] | None = None) -> None:
        self._resolve = resolve
        self._memo = memo if memo is not None else Lru[str, str](_CACHE_SIZE)

    def of_path(self, drv_path: str) -> str:
        known = self._memo.get(drv_path)
        if known is not None:
            return known
        value = self.of(self._resolve(drv_path))
        self._memo.put(drv_path, value)
        return value

    def of(self, drv: Derivation) -> str:
        if drv.is_fixed_output:
            out = drv.outputs["out"]
            return blake3.blake3(f"fixed:out:{out.hash}:{out.path}".encode()).hexdigest()
        # Each input derivation stands in as its own hash modulo: a fixed-output input
        # contributes only what it produces, not how.
        masked = replace(
            drv, input_drvs={self.of_path(p): outs for p, outs in drv.input_drvs.items()}
        )
        return blake3.blake3(masked.to_json().encode()).hexdigest()


def output_name(drv_name: str, output: str) -> str:
    return drv_name if output == "out" else f"{drv_name}-{output}"


def with_output_paths(drv: Derivation, store_dir: str, hashes: HashModulo) -> Derivation:
    """The derivation with its output paths (and the matching variables) filled in."""
    if drv.is_fixed_output:
        expected = drv.outputs["out"].hash
        path = str(make_store_path(PathKind.OUTPUT, f"fixed:out:{expected}", store_dir, drv.name))
        return replace(drv, outputs={"out": Output(path, expected)}, env={**drv.env, "out": path})
    if any(o.hash for o in drv.outputs.values()):
        raise DerivationError(f"{drv.name}: only a single 'out' output can be fixed")
    blank = replace(
        drv,
        outputs={k: Output() for k in drv.outputs},
        env={**drv.env, **{k: "" for k in drv.outputs}},
    )
    digest = hashes.of(blank)
    paths = {
        k: str(
            make_store_path(
                PathKind.OUTPUT, f"blake3:{digest}", store_dir, output_name(drv.name, k)
            )
        )
        for k in drv.outputs
    }
    return replace(drv, outputs={k: Output(p) for k, p in paths.items()}, env={**drv.env, **paths})


def check_output_paths(drv: Derivation, store_dir: str, hashes: HashModulo) -> None:
    """Refuse a derivation whose output paths are not the ones its inputs give."""
    expected = with_output_paths(drv, store_dir, hashes)
    if expected.outputs != drv.outputs or expected.env != drv.env:
        raise DerivationError(f"{drv.name}: output paths do not match the derivation")


def closure_order(roots: Iterable[str], resolve: Resolver) -> list[str]:
    """Derivation paths reachable from `roots`, each after all its input derivations."""
    order: list[str] = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[tuple[str, bool]] = [(r, False) for r in sorted(set(roots), reverse=True)]
    while stack:
        path, expanded = stack.pop()
        if expanded:
            state[path] = 2
            order.append(path)
            continue
        if state.get(path) == 2:
            continue
        if state.get(path) == 1:
            raise DerivationError(f"derivation cycle through {path}")
        state[path] = 1
        stack.append((path, True))
        for dep in sorted(resolve(path).input_drvs, reverse=True):
            if state.get(dep) != 2:
                stack.append((dep, False))
    return order


def drv_name(path: str) -> str:
    """The name in a derivation's store path `<store dir>/<hash>-<name>.drv`: what people
    are shown of it."""
    return path.rsplit("/", 1)[-1].split("-", 1)[-1].removesuffix(".drv")
