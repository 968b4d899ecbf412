"""Recipes in Python, as Guix uses Scheme.

    from store.recipe import busybox, derivation, source

    bb = busybox()
    hello = derivation("hello", f"{bb}/bin/busybox",
                       ["sh", "-c", f"echo hello > $out"])
    shout = derivation("shout", f"{bb}/bin/busybox",
                       ["sh", "-c", f"tr a-z A-Z < {hello} > $out"])

`str(d)` and `d.out` are a derivation's output path and `d.outputs[name]` any output, so
recipes pass inputs to builders with f-strings.  Store paths named in the builder, its
arguments or its environment are picked up as inputs (derivation outputs of this
evaluation, or paths already in the store); `inputs=` adds more.  Evaluating a recipe
writes sources and `.drv` files into the store it runs against (`using`), which is the
local store or the daemon (`store-build` sends the `.drv`s in one batch once the recipe
has run: a `.drv`'s path is computed here, and `add_text` answers with it at once).

`env_delta=` changes the builder's environment with uenv's semantics
(`store.environment`), after `env`: a `Delta`, a view (below), or the shorthand

    derivation("app", sh, [...], env_delta={
        "CC": "gcc",                                   # set a scalar
        "OLD": None,                                   # unset it
        "PATH": [("prepend", [f"{tools}/bin"])],       # update a list, in order
    })

Store paths in its values are inputs too.  `profile(name, paths, env=...)` makes a
profile: a derivation whose output is the profile file (`store.environment.profile`)
naming `paths` (derivations of this evaluation or store paths, its references) and the
delta `env` (a view `{"version": 1, "values": {...}}`, a `Delta` or the shorthand):

    tools = profile("tools", [hello, shout], env={"EDITOR": "vi"})

Both check the delta when they are called: a bad name, an unknown operation or a value
of the wrong type is a `DeltaError` naming the variable, and nothing is added.

`environments=` names build environments (`store.buildenv`, docs/environments.md), in
entering order, made with `environment`; an action is `action(command, *args,
timeout=SECONDS)` or the list `[command, *args]`:

    logging = environment("logging", wrap_env_enter=[f"{wrap}/bin/hook"],
                          wrap_build=[f"{wrap}/bin/hook"], wrap_env_exit=[f"{wrap}/bin/hook"])
    tools = environment("tools", variables={"CC": "gcc"},
                        enter=action(f"{bb}/bin/sh", "-c", "echo weft_env: X=1", timeout=30))
    app = derivation("app", sh, [...], environments=[logging, tools])

Store paths in actions and variables are inputs; each program must be in one.
`environment` checks what it can alone (names, variables, all three hooks or none,
timeouts), `derivation` the rest: a `BuildEnvError` naming the environment, nothing added.

`durable_dirs=` names directories under `/build` worth keeping when a build stops
(`store.durabledirs`, docs/derivations.md), checked when `derivation` is called: a bad
one is a `DurableDirError` naming it, nothing added.

    app = derivation("app", sh, [...], durable_dirs={"ccache": "/build/ccache"})
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from store import derivation as drvs
from store.derivation import BLANK_OUTPUT, DUMMY_HASH, HashModulo, Output, finish
from store.environment.delta import Delta
from store.recipebusybox import busybox_path

# A recipe's evaluation starts with this module's imports: what only some recipes use
# (environments, deltas, durable directories, profiles) is imported where it is used,
# and `typing` not at all.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Protocol

    from store.buildenv import Action, BuildEnvironment
    from store.recipedelta import EnvDelta
    from store.recipeenv import ActionSpec
    from store.store import Store

# A profile reaches its builder as one environment variable, and Linux refuses an execve
# with a string longer than MAX_ARG_STRLEN (32 pages: 128 KiB), the `name=` included:
# about 2,000 members.
MAX_PROFILE_TEXT = 32 * 4096 - len("weftProfile=") - 1
# The profile's builder: its text, from the environment, into $out.
_PROFILE_SCRIPT = 'printf "%s" "$weftProfile" > "$out"'

if TYPE_CHECKING:

    class RecipeStore(Protocol):
        """What evaluating recipes needs from a store: the local one, or a daemon client.

        One may also have `reuse(path, add) -> str` (`store.recipebusybox`): `path`, a
        source remembered from an earlier evaluation, kept for this one if it is still
        valid, else added again by `add()`; without it, `busybox()` makes its tree each
        time."""

        store_dir: str

        def add_source(self, path: str, name: str) -> str: ...

        def add_text(self, name: str, text: str, references: list[str]) -> str: ...


@dataclass(frozen=True)
class Derivation:
    """A derivation written to the store, as recipes see it."""

    drv: drvs.Derivation
    path: str  # the .drv store path

    @property
    def out(self) -> str:
        return self.drv.output_path("out")

    @property
    def outputs(self) -> dict[str, str]:
        return {k: o.path for k, o in self.drv.outputs.items()}

    def __str__(self) -> str:
        return self.out if "out" in self.drv.outputs else next(iter(self.outputs.values()))


class _Evaluation:
    def __init__(self, store: RecipeStore) -> None:
        self.store = store
        # An output path -> the derivation of this evaluation that makes it, and the
        # output's name.
        self.by_output: dict[str, tuple[Derivation, str]] = {}
        self.by_path: dict[str, drvs.Derivation] = {}
        self.hashes = HashModulo(lambda p: self.by_path[p], _Hashes())
        self.busybox: str | None = None
        self.path_re = re.compile(re.escape(store.store_dir) + r"/[0-9a-z]{32}-[A-Za-z0-9+\-._?=]+")


class _Hashes(dict[str, str]):
    """An evaluation's hashes modulo, by `.drv` path: one for each derivation it made
    (`_Evaluation.by_path` holds those), so no bound, and no lock (it runs in one thread):
    a bounded memo's upkeep costs a recipe more than the hash it keeps."""

    def put(self, key: str, value: str) -> None:
        self[key] = value


# What a derivation without `env_delta` has: one shared, as a `Delta` is immutable.
_NO_DELTA = Delta()

_current: ContextVar[_Evaluation] = ContextVar("weft_recipe_store")


@contextmanager
def using(store: RecipeStore) -> Iterator[None]:
    """Evaluate recipes in the block against `store`."""
    token = _current.set(_Evaluation(store))
    try:
        yield
    finally:
        _current.reset(token)


def _evaluation() -> _Evaluation:
    try:
        return _current.get()
    except LookupError:
        raise RuntimeError("recipes must be evaluated inside store.recipe.using(store)") from None


def source(path: str | os.PathLike[str], name: str | None = None) -> str:
    """Add a local file or directory as a source path; returns its store path.  A
    relative path is taken from the directory of the file that calls `source`, as a Nix
    path literal is from its file's: a recipe evaluates the same from any directory."""
    path = os.fspath(path)
    if not os.path.isabs(path):
        caller = sys._getframe(1).f_globals.get("__file__")
        base = os.path.dirname(os.path.abspath(caller)) if caller else os.getcwd()
        path = os.path.join(base, path)
    path = os.path.abspath(path)
    return _evaluation().store.add_source(path, name or os.path.basename(path))


def busybox() -> str:
    """The bootstrap busybox: Debian's static binary as `<path>/bin/busybox`, with a link
    per applet, so that `<path>/bin` can be a builder's PATH (`store.recipebusybox`)."""
    ev = _evaluation()
    if ev.busybox is None:
        store = ev.store
        ev.busybox = busybox_path(store.store_dir, store.add_source, getattr(store, "reuse", None))
    return ev.busybox


def derivation(
    name: str,
    builder: str,
    args: Iterable[str] = (),
    inputs: Iterable[Derivation | str] = (),
    env: Mapping[str, str] | None = None,
    outputs: Iterable[str] = ("out",),
    output_hash: str | None = None,
    env_delta: EnvDelta | None = None,
    environments: Iterable[BuildEnvironment] = (),
    durable_dirs: Mapping[str, str] | None = None,
) -> Derivation:
    """A derivation, checked and written to the store.  `output_hash` makes it
    fixed-output (`blake3:<hex>` of the output's archive); `""` asks for the hash, as an
    empty `outputHash` does in Nix: the build fails and reports the hash it got.
    `env_delta` (a `Delta`, the shorthand mapping or a view) is applied to the builder's
    environment after `env`; `environments` are entered around the builder, in order;
    `durable_dirs` (name -> directory under /build) are kept when its build stops."""
    ev = _evaluation()
    # Each check only when there is something to check: most derivations have no delta,
    # no environments and no durable directories, and each is made in a hot loop.
    delta = _NO_DELTA if env_delta is None else _as_delta(env_delta, f"{name}: env_delta: ")
    envs = _environments(environments, name) if environments else ()
    dirs = _durable_dirs(durable_dirs, name) if durable_dirs else {}
    if isinstance(outputs, str):
        raise drvs.DerivationError(
            f"{name}: outputs must be a list of names, not the string {outputs!r}"
        )
    if output_hash == "":
        sys.stderr.write(
            f"warning: {name}: found empty hash, assuming '{DUMMY_HASH}'; the build will "
            "report the actual hash\n"
        )
        output_hash = DUMMY_HASH
    builder = str(builder)
    args = tuple(map(str, args))
    env = {k: str(v) for k, v in (env or {}).items()}
    texts = [builder, *args, *env.values()]
    if delta:
        from store.recipedelta import delta_strings

        texts += delta_strings(delta)
    if envs:
        from store.recipeenv import strings

        texts += strings(envs)
    input_drvs, input_srcs = _inputs(ev, inputs, texts)
    draft = drvs.Derivation(
        name=name,
        builder=builder,
        outputs={
            o: BLANK_OUTPUT if output_hash is None else Output(hash=output_hash) for o in outputs
        },
        args=args,
        env=env,
        input_drvs=input_drvs,
        input_srcs=input_srcs,
        env_delta=delta,
        environments=envs,
        durable_dirs=dirs,
    )
    if envs:
        from store.buildenv import check_environments

        # What drvcheck checks when the daemon adds it, checked before anything is added.
        used = [ev.by_path[p].outputs[o].path for p, outs in input_drvs.items() for o in outs]
        check_environments(envs, [*input_srcs, *used], f"{name}: ")
    final, text = finish(draft, ev.store.store_dir, ev.hashes)
    path = ev.store.add_text(f"{name}.drv", text, final.references())
    ev.hashes.remember(path, final, text)
    ev.by_path[path] = final
    made = Derivation(final, path)
    for output, out in final.outputs.items():
        ev.by_output[out.path] = (made, output)
    return made


def _inputs(
    ev: _Evaluation, given: Iterable[Derivation | str], texts: Iterable[str]
) -> tuple[dict[str, tuple[str, ...]], tuple[str, ...]]:
    """The input derivations (with the outputs used) and sources: `given`, and the store
    paths named in `texts` (outputs of this evaluation's derivations, or sources)."""
    input_drvs: dict[str, set[str]] = {}
    input_srcs: set[str] = set()

    def use(path: str) -> None:
        known = ev.by_output.get(path)
        if known is not None:
            made, output = known
            input_drvs.setdefault(made.path, set()).add(output)
        else:
            input_srcs.add(path)

    for item in given:
        if isinstance(item, Derivation):
            input_drvs.setdefault(item.path, set()).update(item.outputs)
        else:
            use(str(item))
    # One search over all of them: no path spans a NUL, which no store path holds.
    for found in ev.path_re.findall("\0".join(texts)):
        use(found)
    return {p: tuple(sorted(o)) for p, o in input_drvs.items()}, tuple(sorted(input_srcs))


def _environments(given: Iterable[BuildEnvironment], name: str) -> tuple[BuildEnvironment, ...]:
    from store.recipeenv import checked

    return checked(given, name)


def _as_delta(given: EnvDelta, where: str) -> Delta:
    from store.recipedelta import as_delta

    return as_delta(given, where)


def _durable_dirs(given: Mapping[str, str], name: str) -> dict[str, str]:
    from store.durabledirs import check_durable_dirs

    return dict(check_durable_dirs(given, f"{name}: "))


def action(command: object, *args: object, timeout: float | None = None) -> Action:
    """`command` (a program in an input store path: a string, or a derivation's output)
    run with `args` (made strings, as a builder's are), killed after `timeout` seconds
    (None: only the build's own limits).  Checked in `environment`, which names it."""
    from store.buildenv import Action, BuildEnvError

    if not isinstance(command, str | os.PathLike | Derivation):
        raise BuildEnvError(f"an action's command is a program's path, not {command!r}")
    return Action(str(command), tuple(str(a) for a in args), timeout)


def environment(
    name: str,
    enter: ActionSpec | None = None,
    exit: ActionSpec | None = None,
    wrap_env_enter: ActionSpec | None = None,
    wrap_build: ActionSpec | None = None,
    wrap_env_exit: ActionSpec | None = None,
    variables: Mapping[str, object] | None = None,
) -> BuildEnvironment:
    """A build environment for `derivation(..., environments=[...])`: `variables` set
    for its actions and everything after, `enter` and `exit` run around the builder, and
    if it is a wrapper all three hooks.  Checked now, but for what needs the derivation
    (its inputs, the other environments): `store.recipeenv`."""
    from store.recipeenv import make_environment

    hooks = dict(enter=enter, exit=exit, wrap_env_enter=wrap_env_enter)
    hooks |= dict(wrap_build=wrap_build, wrap_env_exit=wrap_env_exit)
    return make_environment(name, hooks, variables, action)


def profile(
    name: str, paths: Iterable[Derivation | str], env: EnvDelta | None = None
) -> Derivation:
    """A profile of `paths` (derivations of this evaluation, or store paths), in that
    order, with the delta `env`: a view `{"version": 1, "values": {...}}`, a `Delta`, or
    the shorthand mapping.  Everything is checked before anything is added."""
    ev = _evaluation()
    delta = _as_delta(env, f"profile {name}: ") if env is not None else _NO_DELTA
    if isinstance(paths, str | Derivation):
        raise drvs.DerivationError(f"profile {name}: paths must be a list, not one path")
    members = tuple(str(p) for p in paths)
    for m in members:
        if not ev.path_re.fullmatch(m):
            raise drvs.DerivationError(f"profile {name}: member {m!r} is not a store path")
    from store.environment.profile import Profile  # only recipes that make profiles

    text = Profile(name, members, delta).to_json()
    if len(text.encode()) > MAX_PROFILE_TEXT:
        raise drvs.DerivationError(
            f"profile {name}: {len(text.encode()):,} bytes of profile, over the "
            f"{MAX_PROFILE_TEXT:,} its builder's environment can carry (MAX_PROFILE_TEXT)"
        )
    bb = busybox()
    return derivation(
        name, f"{bb}/bin/busybox", ["sh", "-c", _PROFILE_SCRIPT], env={"weftProfile": text}
    )


class LocalStore:
    """Evaluate recipes straight into a `Store` on this machine (no daemon)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.store_dir = store.store_dir

    def add_source(self, path: str, name: str) -> str:
        return self.store.add_path(path, name).path

    def add_text(self, name: str, text: str, references: list[str]) -> str:
        return self.store.add_text(name, text, references).path

    def reuse(self, path: str, add: Callable[[], str]) -> str:
        return path if self.store.is_valid(path) else add()
