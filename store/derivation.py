"""Derivations: what to build, from what, and where the results go.

A derivation is stored as canonical JSON (sorted keys, no insignificant whitespace) in a
text store path `<hash>-<name>.drv` whose references are its input derivations and input
sources.  Output paths are input-addressed: computed from the derivation's hash modulo
fixed-output inputs, as Nix does, so changing only how a fixed-output input is fetched
does not change (and rebuild) its dependents.  A fixed-output derivation's output path
depends only on its name and expected hash.  See docs/derivations.md.

A derivation may carry an environment delta (`envDelta`, uenv's semantics:
`store.environment`) applied to its builder's environment after `env`, and build
environments entered around its builder (`environments`: `store.buildenv`), and
directories kept when its build stops (`durableDirs`: `store.durabledirs`).  Fields added
since the first format are written only when they say something, so that every
derivation written before them keeps its text, its `.drv` path and its output paths.
Their strict parsing is in `store.drvjson`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import blake3

from store import drvjson
from store.drvjson import DerivationError
from store.environment.delta import Delta
from store.hashing import ALGORITHM, DIGEST_HEX_LEN
from store.paths import InvalidPath, PathKind, store_path, validate_name

# What only some derivations use is imported where it is used: a recipe's evaluation,
# which must start quickly, then does without it (and without `typing`).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Protocol

    from store.buildenv import BuildEnvironment

    class Memo(Protocol):
        """Hashes modulo by `.drv` path: a bounded `store.lru.Lru`, or an evaluation's."""

        def get(self, key: str) -> str | None: ...

        def put(self, key: str, value: str) -> None: ...


SYSTEM = "x86_64-linux"
_CACHE_SIZE = 4096
DRV_SUFFIX = ".drv"
# What a recipe's `output_hash=""` stands for, as Nix's empty `outputHash` stands for
# sha256 of zeros: a hash no content has, so the build runs and reports the one it got.
DUMMY_HASH = f"{ALGORITHM}:{'0' * DIGEST_HEX_LEN}"


@dataclass(frozen=True)
class Output:
    path: str = ""
    # A fixed-output derivation's expected content hash, `blake3:<hex>` of the archive.
    hash: str | None = None


# An output before its path is known, one for all: a recipe makes two for each derivation.
BLANK_OUTPUT = Output()


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
    # Applied to the builder's environment after `env` (`${@NAME@}` sees `env`'s values).
    env_delta: Delta = field(default_factory=Delta)
    # In entering order; their programs are checked against the inputs when added.
    environments: tuple[BuildEnvironment, ...] = ()
    # name -> directory under /build kept when the build stops (`store.durabledirs`).
    durable_dirs: Mapping[str, str] = field(default_factory=dict)

    @property
    def is_fixed_output(self) -> bool:
        # Asked a few times for each derivation a recipe makes: no set built for it.
        out = self.outputs.get("out")
        return out is not None and out.hash is not None and len(self.outputs) == 1

    def output_path(self, name: str = "out") -> str:
        return self.outputs[name].path

    def references(self) -> list[str]:
        return sorted({*self.input_drvs, *self.input_srcs})

    def to_json(self) -> str:
        return drvjson.text(self)

    @classmethod
    def from_json(cls, text: str | bytes) -> Derivation:
        """Parse a `.drv`; every field must be there, with its type, and nothing else
        (the optional ones may be left out): `store.drvjson`."""
        fields = drvjson.fields(text)
        outputs = {k: Output(path, hash) for k, (path, hash) in fields.pop("outputs").items()}
        return cls(outputs=outputs, **fields)


def _with(drv: Derivation, **changes: object) -> Derivation:
    """`dataclasses.replace` without its field checks nor the frozen class's `__init__`
    (a call per field), which cost more than the rest: a copy of its fields, changed."""
    made = object.__new__(Derivation)
    made.__dict__.update(vars(drv), **changes)
    return made


def check_hash(value: object, what: str = "output hash") -> str:
    """A content hash as weft writes it, `blake3:<64 hex digits>`; anything else refused,
    with what to write instead."""
    if not isinstance(value, str):
        raise DerivationError(f"{what} must be a string, not {type(value).__name__}")
    algorithm, colon, digest = value.partition(":")
    if not colon and "-" in value:
        algorithm = value.split("-", 1)[0]  # an SRI hash, as Nix writes them
    if algorithm != ALGORITHM:
        raise DerivationError(
            f"{what} {value!r} is not a {ALGORITHM} hash: weft hashes fixed outputs with "
            f"{ALGORITHM.upper()} over their archive, written '{ALGORITHM}:<{DIGEST_HEX_LEN} hex "
            f"digits>' (a recipe's output_hash=\"\" builds once and reports the hash)"
        )
    if len(digest) != DIGEST_HEX_LEN or digest.strip("0123456789abcdef"):
        raise DerivationError(
            f"{what} {value!r}: the digest must be {DIGEST_HEX_LEN} lowercase hex digits"
        )
    return value


def check_output_name(output: str) -> str:
    """An output name follows the rules of store path names (it ends up in one), as in Nix."""
    if not isinstance(output, str):
        raise InvalidPath(f"output name {output!r} is not a string")
    try:
        validate_name(output)
    except InvalidPath as e:
        raise InvalidPath(f"invalid output name: {e}") from None
    if output.endswith(DRV_SUFFIX):
        raise InvalidPath(f"output name {output!r} may not end in {DRV_SUFFIX!r}")
    return output


def validate(drv: Derivation) -> Derivation:
    """Refuse a derivation whose names would make bad store paths, or look like a
    derivation's (a name ending in `.drv`, which Nix refuses too), whose fixed output's hash
    is not one weft computes, or whose strings cannot reach a builder (NUL bytes)."""
    if not isinstance(drv.name, str) or not drv.name:
        raise InvalidPath(f"derivation name {drv.name!r} is not a non-empty string")
    try:
        validate_name(drv.name + DRV_SUFFIX)
    except InvalidPath as e:
        raise InvalidPath(f"invalid derivation name: {e}") from None
    if drv.name.endswith(DRV_SUFFIX):
        raise InvalidPath(
            f"derivation name {drv.name!r} may not end in {DRV_SUFFIX!r}: its output would "
            "look like a derivation"
        )
    if not drv.outputs:
        raise DerivationError(f"{drv.name}: a derivation needs at least one output")
    for k, out in drv.outputs.items():
        check_output_name(k)
        if k != "out":  # else the name, checked with `.drv` after it above
            validate_name(output_name(drv.name, k))
        if out.hash is not None:
            if set(drv.outputs) != {"out"}:
                raise DerivationError(f"{drv.name}: only a single 'out' output can be fixed")
            check_hash(out.hash, f"{drv.name}: output hash")
    used: set[str] = set()  # each name once: a derivation of many inputs uses their `out`
    for names in drv.input_drvs.values():
        if not names:
            raise DerivationError(f"{drv.name}: an input derivation with no outputs used")
        used.update(names)
    for n in sorted(used, key=str):
        check_output_name(n)
    _check_strings(drv)
    return drv


def _check_strings(drv: Derivation) -> None:
    if not drv.builder:
        raise DerivationError(f"{drv.name}: the builder is empty")
    for key in drv.env:
        if not isinstance(key, str) or not key or "=" in key or "\0" in key:
            raise DerivationError(f"{drv.name}: environment variable name {key!r} is not valid")
    # The builder's command line and environment cross to the spawner as C strings: one
    # join finds a NUL, or a value that is not a string (a TypeError), in all of them.
    try:
        bad = "\0" in "".join([drv.builder, *drv.args, *drv.env.values()])
    except TypeError:
        bad = True
    if bad:
        raise DerivationError(f"{drv.name}: a NUL byte in the builder, its arguments or env")
    # Empty ones, most derivations', pass both checks: they are skipped in the hot loop.
    if drv.env_delta or not isinstance(drv.env_delta, Delta):
        from store.environment.delta import DeltaError
        from store.environment.view import parse_values, to_values

        try:
            # A delta made in Python, not read from JSON, gets the checks a parsed one had.
            parse_values(to_values(drv.env_delta), f"{drv.name}: envDelta: ")
        except DeltaError as e:
            raise DerivationError(str(e)) from None
    if drv.durable_dirs != {}:
        from store.durabledirs import DurableDirError, check_durable_dirs

        try:
            check_durable_dirs(drv.durable_dirs, f"{drv.name}: ")
        except DurableDirError as e:
            raise DerivationError(str(e)) from None


Resolver = Callable[[str], Derivation]


class HashModulo:
    """Hashes of derivations modulo fixed-output inputs, with a memo by path (its own,
    bounded, or `memo`, which may outlive it: a `.drv` path's hash never changes)."""

    def __init__(self, resolve: Resolver, memo: Memo | None = None) -> None:
        self._resolve = resolve
        if memo is None:
            from store.lru import Lru

            memo = Lru[str, str](_CACHE_SIZE)
        self._memo = memo

    def of_path(self, drv_path: str) -> str:
        known = self._memo.get(drv_path)
        if known is not None:
            return known
        return self._walk(drv_path)[drv_path]

    def of(self, drv: Derivation) -> str:
        return _hash_modulo(drv, self.input_hashes(drv))

    def input_hashes(self, drv: Derivation) -> dict[str, str]:
        """The hashes of `drv`'s input derivations (none if it is fixed-output)."""
        known: dict[str, str] = {}
        if not drv.is_fixed_output:
            for p in drv.input_drvs:
                known[p] = self._memo.get(p) or self._walk(p)[p]
        return known

    def remember(self, drv_path: str, drv: Derivation, text: str) -> None:
        """`drv`, just written at `drv_path` as `text`: its hash, when that is cheap to
        know now (fixed-output, or no input derivations: then it is its text's), so that
        the derivations made from it do not read it again."""
        if not drv.input_drvs and not drv.is_fixed_output:
            self._memo.put(drv_path, _digest(text))
        elif drv.is_fixed_output:
            self._memo.put(drv_path, _hash_modulo(drv, {}))

    def _walk(self, root: str) -> dict[str, str]:
        """The hashes of `root` and of those of its inputs not remembered, inputs first,
        without recursion: a chain of derivations may be thousands deep."""
        done: dict[str, str] = {}
        expanding: set[str] = set()
        stack: list[tuple[str, bool]] = [(root, False)]
        while stack:
            path, expanded = stack.pop()
            if path in done:
                continue
            drv = self._resolve(path)
            if expanded:
                expanding.discard(path)
                done[path] = _hash_modulo(drv, done)
                self._memo.put(path, done[path])
                continue
            if path in expanding:
                raise DerivationError(f"derivation cycle through {path}")
            expanding.add(path)
            stack.append((path, True))
            for dep in () if drv.is_fixed_output else drv.input_drvs:
                hit = done.get(dep) or self._memo.get(dep)
                if hit is not None:
                    done[dep] = hit
                else:
                    stack.append((dep, False))
        return done


def _hash_modulo(drv: Derivation, inputs: Mapping[str, str]) -> str:
    """`drv`'s hash modulo fixed-output inputs, given its inputs' (all of them, unless it
    is fixed-output)."""
    if drv.is_fixed_output:
        out = drv.outputs["out"]
        return blake3.blake3(f"fixed:out:{out.hash}:{out.path}".encode()).hexdigest()
    return _digest(drvjson.text(drv, input_drvs=_masked(drv, inputs)))


def _masked(drv: Derivation, inputs: Mapping[str, str]) -> dict[str, Iterable[str]]:
    # Each input derivation stands in as its own hash modulo: a fixed-output input
    # contributes only what it produces, not how.
    return {inputs[p]: outs for p, outs in drv.input_drvs.items()}


def _digest(text: str) -> str:
    # `hexdigest` costs the binding half again what `digest().hex()` does.
    return blake3.blake3(text.encode()).digest().hex()


def output_name(drv_name: str, output: str) -> str:
    return drv_name if output == "out" else f"{drv_name}-{output}"


def with_output_paths(drv: Derivation, store_dir: str, hashes: HashModulo) -> Derivation:
    """The derivation, checked (`validate`), with its output paths (and the matching
    variables) filled in."""
    return _with_output_paths(validate(drv), store_dir, hashes, None)


def finish(drv: Derivation, store_dir: str, hashes: HashModulo) -> tuple[Derivation, str]:
    """`with_output_paths`, and the text of the derivation it makes (`to_json`): a recipe's
    derivation, written once hashed."""
    fixed = drvjson.fixed_parts(validate(drv))
    made = _with_output_paths(drv, store_dir, hashes, fixed)
    return made, drvjson.text(made, fixed=fixed)


def _with_output_paths(
    drv: Derivation, store_dir: str, hashes: HashModulo, fixed: drvjson.Fixed | None
) -> Derivation:
    if drv.is_fixed_output:
        expected = drv.outputs["out"].hash
        path = store_path(PathKind.OUTPUT, f"fixed:out:{expected}", store_dir, drv.name)
        return _with(drv, outputs={"out": Output(path, expected)}, env={**drv.env, "out": path})
    # Hashed as it would be with empty output paths and variables, without being made so.
    blank = {k: BLANK_OUTPUT for k in drv.outputs}
    blank_env = {**drv.env, **{k: "" for k in drv.outputs}}
    masked = _masked(drv, hashes.input_hashes(drv))
    digest = _digest(drvjson.text(drv, blank, blank_env, masked, fixed))
    paths = {}
    for k in drv.outputs:
        name = output_name(drv.name, k)
        paths[k] = store_path(PathKind.OUTPUT, f"blake3:{digest}", store_dir, name)
    return _with(drv, outputs={k: Output(p) for k, p in paths.items()}, env={**drv.env, **paths})


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
        seen = state.get(path)
        if seen == 2:
            continue
        if seen == 1:
            raise DerivationError(f"derivation cycle through {path}")
        inputs = resolve(path).input_drvs
        if not inputs:  # most of a large graph: done at once
            state[path] = 2
            order.append(path)
            continue
        state[path] = 1
        stack.append((path, True))
        for dep in sorted(inputs, reverse=True):
            if state.get(dep) != 2:
                stack.append((dep, False))
    return order


def drv_name(path: str) -> str:
    """The name in a derivation's store path `<store dir>/<hash>-<name>.drv`: what people
    are shown of it."""
    return path.rsplit("/", 1)[-1].split("-", 1)[-1].removesuffix(DRV_SUFFIX)
